"""Rollout -> micro-batches with static shapes, and the routed counts the planner sees.

Micro-step m's batch is `[n*R, T]`: n batch shards (data x expert, data-major, as the mesh shards the
batch) of R rows each, filled by `packing.pack_micro_batches`. Every position of every row goes through
the MoE layers, so the counts include padding: rows past a sequence's end replay spread-out routes
(no artificial hot expert) and padding rows are whole rows of them.
"""
import dataclasses

import numpy as np

from foremoe_jax.rl.packing import Packing, gather_packed, pack_micro_batches


@dataclasses.dataclass(frozen=True)
class StepBatches:
  micro_batches: list[dict]  # per micro-step: numpy arrays, see `build_step_batches`
  counts_MxLxDxE: np.ndarray  # int64 (token, expert) pairs per source expert rank, all positions
  packing: Packing


def spread_routes(shape_NxTxLxK: tuple[int, ...], num_experts: int) -> np.ndarray:
  """Distinct experts per token that cycle over all experts: padding's replayed routes."""
  n, t, l, k = shape_NxTxLxK
  base_NxTxL = (np.arange(n * t * l).reshape(n, t, l) * k) % num_experts
  return ((base_NxTxL[..., None] + np.arange(k)) % num_experts).astype(np.int32)


def counts_of(replay_MxBxTxLxK: np.ndarray, expert_devices: int, rows_per_shard: int, num_experts: int):
  """int64 [M, L, D, E]: pairs each source expert rank sends to each expert (shard i is rank i % D)."""
  m, b, t, l, k = replay_MxBxTxLxK.shape
  source_B = (np.arange(b) // rows_per_shard) % expert_devices
  flat = ((np.arange(m)[:, None, None, None, None] * l + np.arange(l)[None, None, None, :, None]) * expert_devices
          + source_B[None, :, None, None, None]) * num_experts + replay_MxBxTxLxK
  counts = np.bincount(flat.reshape(-1), minlength=m * l * expert_devices * num_experts)
  return counts.reshape(m, l, expert_devices, num_experts).astype(np.int64)


def build_step_batches(tokens_NxT, routes_NxTxLxK, mask_NxT, lengths_N, *, num_shards: int,
                       expert_devices: int, rows_per_shard: int, tokens_per_shard: int, num_experts: int,
                       num_minibatches: int, seed: int = 0) -> StepBatches:
  """Packs whole sequences into micro-steps; each micro-batch holds `tokens`, `replay`, `mask` and
  `num_tokens` (the masked tokens of its mini-batch: the GRPO loss denominator). `with_advantages`
  adds the advantages once rewards are known (the planner runs meanwhile)."""
  tokens_NxT, routes, mask_NxT = (np.asarray(a) for a in (tokens_NxT, routes_NxTxLxK, mask_NxT))
  lengths_N = np.asarray(lengths_N)
  n, t = tokens_NxT.shape
  past_end_NxT = np.arange(t)[None, :] >= lengths_N[:, None]
  routes = np.where(past_end_NxT[..., None, None], spread_routes(routes.shape, num_experts), routes)
  packing = pack_micro_batches(lengths_N, num_shards, None, tokens_per_device=tokens_per_shard,
                               rows_per_bin=rows_per_shard, seed=seed)
  m = packing.num_micro_steps
  if m % num_minibatches:
    extra = num_minibatches - m % num_minibatches  # whole mini-batches: pad with empty micro-steps
    packing = pack_micro_batches(lengths_N, num_shards, m + extra, tokens_per_device=tokens_per_shard,
                                 rows_per_bin=rows_per_shard, seed=seed)
    m = packing.num_micro_steps

  def packed(x, fill):
    return gather_packed(x, packing, fill).reshape(m, num_shards * rows_per_shard, *x.shape[1:])

  pad_routes = spread_routes((1, t, *routes.shape[2:]), num_experts)[0]
  replay = gather_packed(routes, packing, 0)
  replay[packing.seq_idx_MxDxR < 0] = pad_routes
  replay = replay.reshape(m, num_shards * rows_per_shard, *routes.shape[1:])
  tokens, mask = packed(tokens_NxT, 0), packed(mask_NxT, 0)
  per_mb = m // num_minibatches
  mb_tokens = mask.reshape(num_minibatches, per_mb, -1).sum(axis=(1, 2))
  batches = [{"tokens": tokens[i].astype(np.int32), "replay": replay[i].astype(np.int32),
              "mask": mask[i].astype(np.int32),
              "num_tokens": np.float32(max(mb_tokens[i // per_mb], 1))} for i in range(m)]
  return StepBatches(batches, counts_of(replay, expert_devices, rows_per_shard, num_experts), packing)


def with_advantages(step: StepBatches, advantages_N) -> list[dict]:
  """The micro-batches with `adv` [n*R] (0 on padding rows)."""
  adv_MxB = gather_packed(np.asarray(advantages_N, np.float32), step.packing, 0.0)
  adv_MxB = adv_MxB.reshape(len(step.micro_batches), -1)
  return [{**batch, "adv": adv_MxB[i]} for i, batch in enumerate(step.micro_batches)]
