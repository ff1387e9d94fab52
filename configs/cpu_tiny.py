"""CPU default: 8 virtual devices (data=1, expert=8), a 2-layer 16-expert top-2 model; SFT in minutes."""
from configs import SFTConfig, TaskConfig, TrainConfig
from foremoe_jax.model import ModelConfig
from foremoe_jax.rl.task import CharTokenizer


def get_config() -> TrainConfig:
  model = ModelConfig(vocab_size=CharTokenizer().vocab_size, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=16, d_ff_dense=128, num_experts=16, top_k=2, d_ff_expert=64,
                      slots_per_device=16 // 8 + 1, max_seq_len=32)
  return TrainConfig(name="cpu_tiny", model=model, mesh_data=1, mesh_expert=8,
                     task=TaskConfig(num_digits=2, ops="+"), sft=SFTConfig(steps=600, batch_size=64, ckpt_every=300))
