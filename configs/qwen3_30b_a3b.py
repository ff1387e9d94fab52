"""Qwen3-30B-A3B's shape (48 layers, 128 experts of width 768, top-8, hidden 2048, 32 q / 4 kv heads of
128, vocab 151936) with RL settings for responses of 1-8K tokens, EP 8 (one 8-GPU host).

bf16 weights; Adam moments in bf16 here, since float32 ones do not fit 80 GB at EP 8 (README, memory
table: 82.5 GiB before activations); `--set rl.adam_dtype=float32` where they fit (H200). Micro-steps as
veRL / slime form them: whole sequences packed under a per-device token budget (`rl.tokens_per_shard`,
veRL's `ppo_max_token_len_per_gpu`), several back to back in each of `rl.rows_per_shard` rows of the
rollout's width (`rl.pack_sequences`, their "remove padding" at fixed shapes), `rl.num_minibatches`
optimizer steps per rollout. Start from a Hugging Face checkpoint (`--init-from`, `--sft-steps 0`).

Long rows: blockwise attention (no [rows, heads, T, T] scores) and per-block remat; the GRPO loss takes
log-probs a chunk of columns at a time (`model.logprob_chunk`, no [rows, T, V] logits). `scan_layers` stays
off: the HF converter loads and exports unrolled blocks only (`--set model.scan_layers=true` for runs
that do not start from a checkpoint: one block body compiled instead of 48).
"""
from configs import RLConfig, SFTConfig, TrainConfig
from foremoe_jax.model import ModelConfig
from foremoe_jax.moe import ExpertsConfig

NUM_EXPERTS = 128


def qwen3_model(num_layers: int, expert_devices: int, max_seq_len: int) -> ModelConfig:
  """The Qwen3-30B-A3B layer at `num_layers` depth; one redundant slot per device when D > 1."""
  slots = NUM_EXPERTS // expert_devices + (expert_devices > 1)
  return ModelConfig(vocab_size=151936, d_model=2048, num_layers=num_layers, num_heads=32, num_kv_heads=4,
                     head_dim=128, d_ff_dense=6144,
                     moe=ExpertsConfig(num_experts=NUM_EXPERTS, top_k=8, d_ff_expert=768, slots_per_device=slots),
                     max_seq_len=max_seq_len, rope_theta=1e6, dtype="bfloat16",
                     param_dtype="bfloat16", attention="blockwise", attention_block=512, remat="block")


def qwen3_rl(adam_dtype: str, max_new_tokens: int = 8192) -> RLConfig:
  """GRPO over 32 prompts x 8 samples, responses up to 8K tokens; micro-steps of <= 16K real tokens per
  device packed into 4 rows of the rollout's width (the budget binds, not the sequence count; padding
  is routed to no expert), 4 optimizer steps per rollout; 2 capacity buckets per octave (few compiles)."""
  return RLConfig(steps=100, prompts_per_step=32, group_size=8, max_new_tokens=max_new_tokens, lr=1e-6,
                  rows_per_shard=4, tokens_per_shard=16384, pack_sequences=True, num_minibatches=4,
                  capacity_buckets=2, adam_dtype=adam_dtype, table_sizes="plan")


def get_config() -> TrainConfig:
  rl = qwen3_rl("bfloat16")
  model = qwen3_model(48, 8, max_seq_len=512 + rl.max_new_tokens)
  return TrainConfig(name="qwen3_30b_a3b", model=model, mesh_data=1, mesh_expert=8,
                     sft=SFTConfig(steps=0, batch_size=64, eval_prompts=64), rl=rl)
