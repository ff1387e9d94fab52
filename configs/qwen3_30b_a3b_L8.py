"""qwen3_30b_a3b at 8 layers, for one to four GPUs: EP over every visible device (D = jax.device_count()).

At another EP size set both `--set mesh_expert=D --set model.moe.slots_per_device=S` (S = 128/D + 1 for
D > 1). Adam moments in float32 from EP 2 on; at EP 1 they are bf16, since the 8-layer model's bf16
weights (~11 GB), float32 moments (~45 GB) and float32 gradient accumulators (~22 GB) would fill an
80 GB card before the base slots and activations.
"""
import dataclasses

import jax

from configs import SFTConfig, TrainConfig
from configs.qwen3_30b_a3b import NUM_EXPERTS, qwen3_model, qwen3_rl


def get_config() -> TrainConfig:
  devices = jax.device_count()
  if NUM_EXPERTS % devices:
    raise ValueError(f"qwen3_30b_a3b_L8: {NUM_EXPERTS} experts do not split over {devices} devices; "
                     "set mesh_expert and model.moe.slots_per_device")
  rl = dataclasses.replace(qwen3_rl("float32" if devices > 1 else "bfloat16"), prompts_per_step=8 * devices)
  return TrainConfig(name="qwen3_30b_a3b_L8", model=qwen3_model(8, devices, max_seq_len=512 + rl.max_new_tokens),
                     mesh_data=1, mesh_expert=devices, sft=SFTConfig(steps=0, batch_size=8 * devices,
                                                                     eval_prompts=8 * devices), rl=rl)
