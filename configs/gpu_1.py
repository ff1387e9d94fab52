"""1 H100(s), bf16: a 12-layer 64-expert top-4 model (one device: no redundant slots)."""
from configs import RLConfig, SFTConfig, TaskConfig, TrainConfig
from foremoe_jax.model import ModelConfig
from foremoe_jax.rl.task import CharTokenizer


def get_config() -> TrainConfig:
  model = ModelConfig(vocab_size=CharTokenizer().vocab_size, d_model=1024, num_layers=12, num_heads=16,
                      num_kv_heads=4, head_dim=64, d_ff_dense=2816, num_experts=64, top_k=4, d_ff_expert=512,
                      slots_per_device=64, max_seq_len=64, dtype="bfloat16", param_dtype="float32")
  return TrainConfig(name="gpu_1", model=model, mesh_data=1, mesh_expert=1,
                     task=TaskConfig(num_digits=3, ops="+-"),
                     sft=SFTConfig(steps=1000, batch_size=64, lr=1e-3, warmup_steps=50,
                                   eval_prompts=128),
                     rl=RLConfig(steps=20, prompts_per_step=64, group_size=8, rows_per_shard=16,
                                 tokens_per_shard=512, max_new_tokens=6, num_minibatches=4))
