"""The GPU presets: one bf16 model (12 layers, 64 experts, top-4) with EP over `num_gpus` H100s.

Batch sizes scale with the GPU count; with more than one GPU each device has one redundant slot.
"""
from configs import RLConfig, SFTConfig, TaskConfig, TrainConfig
from foremoe_jax.model import ModelConfig
from foremoe_jax.moe import ExpertsConfig
from foremoe_jax.rl.task import CharTokenizer

NUM_EXPERTS = 64


def gpu_config(num_gpus: int) -> TrainConfig:
  slots = NUM_EXPERTS // num_gpus + (num_gpus > 1)
  model = ModelConfig(vocab_size=CharTokenizer().vocab_size, d_model=1024, num_layers=12, num_heads=16,
                      num_kv_heads=4, head_dim=64, d_ff_dense=2816,
                      moe=ExpertsConfig(num_experts=NUM_EXPERTS, top_k=4, d_ff_expert=512, slots_per_device=slots),
                      max_seq_len=64, dtype="bfloat16",
                      param_dtype="float32")
  return TrainConfig(name=f"gpu_{num_gpus}", model=model, mesh_data=1, mesh_expert=num_gpus,
                     task=TaskConfig(num_digits=3, ops="+-"),
                     sft=SFTConfig(steps=1000, batch_size=64 * num_gpus, lr=1e-3, warmup_steps=50,
                                   eval_prompts=128 * num_gpus),
                     rl=RLConfig(steps=20, prompts_per_step=64 * num_gpus, group_size=8, rows_per_shard=16,
                                 tokens_per_shard=512, max_new_tokens=6, num_minibatches=4, table_sizes="plan"))
