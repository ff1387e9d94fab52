"""Qwen3-30B-A3B's shape (48 layers, 128 experts, top-8, hidden 2048, expert hidden 768, 32 q / 4 kv heads,
head_dim 128, vocab 151936): shape-only use (`nnx.eval_shape`, planner and transfer sizing)."""
from configs import TrainConfig
from foremoe_jax.model import ModelConfig


def get_config() -> TrainConfig:
  model = ModelConfig(vocab_size=151936, d_model=2048, num_layers=48, num_heads=32, num_kv_heads=4, head_dim=128,
                      d_ff_dense=6144, num_experts=128, top_k=8, d_ff_expert=768, slots_per_device=128 // 8 + 1,
                      max_seq_len=4096, rope_theta=1e6, dtype="bfloat16", param_dtype="bfloat16")
  return TrainConfig(name="qwen3_30b_a3b", model=model, mesh_data=1, mesh_expert=8)
