"""CPU default: 8 virtual devices (data=1, expert=8), a 2-layer 16-expert top-2 model.

A short SFT warm start on one-digit addition leaves a policy that is right about three times in four;
GRPO then raises the sampled reward within a few minutes on 2 cores.
"""
from configs import RLConfig, SFTConfig, TaskConfig, TrainConfig
from foremoe_jax.model import ModelConfig
from foremoe_jax.moe import ExpertsConfig
from foremoe_jax.rl.task import CharTokenizer


def get_config() -> TrainConfig:
  model = ModelConfig(vocab_size=CharTokenizer().vocab_size, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=16, d_ff_dense=128,
                      moe=ExpertsConfig(num_experts=16, top_k=2, d_ff_expert=64, slots_per_device=16 // 8 + 1),
                      max_seq_len=32)
  return TrainConfig(name="cpu_tiny", model=model, mesh_data=1, mesh_expert=8,
                     task=TaskConfig(num_digits=1, ops="+"), sft=SFTConfig(steps=60, batch_size=64, ckpt_every=30),
                     rl=RLConfig(steps=15, prompts_per_step=32, group_size=8, max_new_tokens=3, lr=3e-4,
                                 num_minibatches=4,
                                 # 8 virtual devices on a few CPU cores: copies are cheap next to compute.
                                 plan_matmul_tflops=0.05, plan_link_gbs=10.0, plan_a2a_gbs=10.0))
