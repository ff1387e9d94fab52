"""Rollout -> micro-batches with static shapes, and the routed counts the planner sees.

Micro-step m's batch is `[n*R, T]`: n batch shards (data x expert, data-major, as the mesh shards the
batch) of R rows each, filled by `packing.pack_micro_batches`; T is the rollout's width (prompt +
`max_new_tokens`). Two layouts (`rl.pack_sequences`):
- one sequence per row (default): every position of every row goes through the MoE layers, so the counts
  include padding: positions past a sequence's end replay spread-out routes (no artificial hot expert) and
  padding rows are whole rows of them.
- packed: several sequences back to back per row (first-fit decreasing, `packing.py`); the batch adds
  `segment_ids` (0 = padding, 1.. = the row's sequences) and `positions` (restarting at 0 per sequence).
  The model masks attention across segments and routes padding nowhere, so the counts hold real tokens
  only; `adv` is per token `[n*R, T]`, since a row holds sequences of different advantages.
`StepBatches.real_token_share` is the share of the step's row positions that hold real tokens.
"""
import dataclasses
import functools

import numpy as np

from foremoe_jax.rl.packing import Packing, gather_packed, pack_micro_batches, place_rows, segments_and_positions


@dataclasses.dataclass(frozen=True)
class StepBatches:
  micro_batches: list[dict]  # per micro-step: numpy arrays, see `build_step_batches`
  counts_MxLxDxE: np.ndarray  # int64 (token, expert) pairs per source expert rank, all routed positions
  packing: Packing
  real_token_share: float  # real tokens (prompt + response) / row positions (M * n * R * T) of the step


def spread_routes(shape_NxTxLxK: tuple[int, ...], num_experts: int) -> np.ndarray:
  """Distinct experts per token that cycle over all experts: padding's replayed routes."""
  n, t, l, k = shape_NxTxLxK
  base_NxTxL = (np.arange(n * t * l).reshape(n, t, l) * k) % num_experts
  return ((base_NxTxL[..., None] + np.arange(k)) % num_experts).astype(np.int32)


def counts_of(replay_MxBxTxLxK: np.ndarray, expert_devices: int, rows_per_shard: int, num_experts: int,
              routed_MxBxT: np.ndarray | None = None, first_shard: int = 0):
  """int64 [M, L, D, E]: pairs each source expert rank sends to each expert (shard i is rank i % D; the
  rows are shards `first_shard`, `first_shard + 1`, ...); `routed_MxBxT`: only these positions (None: all)."""
  m, b, t, l, k = replay_MxBxTxLxK.shape
  source_B = (first_shard + np.arange(b) // rows_per_shard) % expert_devices
  flat = ((np.arange(m)[:, None, None, None, None] * l + np.arange(l)[None, None, None, :, None]) * expert_devices
          + source_B[None, :, None, None, None]) * num_experts + replay_MxBxTxLxK
  if routed_MxBxT is not None:
    flat = flat[np.broadcast_to(routed_MxBxT[..., None, None], flat.shape)]
  counts = np.bincount(flat.reshape(-1), minlength=m * l * expert_devices * num_experts)
  return counts.reshape(m, l, expert_devices, num_experts).astype(np.int64)


def step_packing(lengths_N, *, num_shards: int, rows_per_shard: int, tokens_per_shard: int, num_minibatches: int,
                 row_len: int | None = None, seed=0, num_micro_steps: int | None = None) -> Packing:
  """`pack_micro_batches` into exactly `num_micro_steps`, or (None) the fewest that fit rounded up to whole
  mini-batches (padded with empty micro-steps)."""
  pack = functools.partial(pack_micro_batches, lengths_N, num_shards, tokens_per_device=tokens_per_shard,
                           rows_per_bin=rows_per_shard, row_len=row_len, seed=seed)
  packing = pack(num_micro_steps)
  m = packing.num_micro_steps
  if num_micro_steps is None and m % num_minibatches:
    packing = pack(m + num_minibatches - m % num_minibatches)
  return packing


def build_step_batches(tokens_NxT, routes_NxTxLxK, mask_NxT, lengths_N, *, num_shards: int,
                       expert_devices: int, rows_per_shard: int, tokens_per_shard: int, num_experts: int,
                       num_minibatches: int, seed=0, pack_sequences: bool = False, packing: Packing | None = None,
                       first_shard: int = 0) -> StepBatches:
  """Packs whole sequences into micro-steps; each micro-batch holds `tokens`, `replay`, `mask` and
  `num_tokens` (the masked tokens of its mini-batch: the GRPO loss denominator), and packed
  (`pack_sequences`) `segment_ids` and `positions`. `with_advantages` adds the advantages once rewards
  are known (the planner runs meanwhile). `packing`: one made already (`step_packing`); `first_shard`:
  the global index of the first of the `num_shards` shards these rows fill (it sets their expert ranks)."""
  tokens_NxT, routes, mask_NxT = (np.asarray(a) for a in (tokens_NxT, routes_NxTxLxK, mask_NxT))
  lengths_N = np.asarray(lengths_N)
  n, t = tokens_NxT.shape
  if packing is None:
    packing = step_packing(lengths_N, num_shards=num_shards, rows_per_shard=rows_per_shard,
                           tokens_per_shard=tokens_per_shard, num_minibatches=num_minibatches,
                           row_len=t if pack_sequences else None, seed=seed)
  m = packing.num_micro_steps
  share = float(lengths_N.sum() / (m * num_shards * rows_per_shard * t))
  pad_routes = spread_routes((1, t, *routes.shape[2:]), num_experts)[0]
  build = _packed_batches if pack_sequences else _row_batches
  batches, counts = build(tokens_NxT, routes, mask_NxT, packing, pad_routes, expert_devices, num_experts, first_shard)
  per_mb = m // num_minibatches
  mb_tokens = np.array([b["mask"].sum() for b in batches]).reshape(num_minibatches, per_mb).sum(axis=1)
  for i, batch in enumerate(batches):
    batch["num_tokens"] = np.float32(max(mb_tokens[i // per_mb], 1))
  return StepBatches(batches, counts, packing, share)


def _row_batches(tokens_NxT, routes, mask_NxT, packing, pad_routes, expert_devices, num_experts, first_shard):
  """One sequence per row: rows `[n*R, T]` and their counts, padding positions and rows included."""
  m, (num_shards, rows) = packing.num_micro_steps, packing.seq_idx_MxDxR.shape[1:]
  past_end_NxT = np.arange(tokens_NxT.shape[1])[None, :] >= packing.length_N[:, None]
  routes = np.where(past_end_NxT[..., None, None], spread_routes(routes.shape, num_experts), routes)

  def packed(x, fill):
    return gather_packed(x, packing, fill).reshape(m, num_shards * rows, *x.shape[1:])

  replay = gather_packed(routes, packing, 0)
  replay[packing.seq_idx_MxDxR < 0] = pad_routes
  replay = replay.reshape(m, num_shards * rows, *routes.shape[1:])
  tokens, mask = packed(tokens_NxT, 0), packed(mask_NxT, 0)
  batches = [{"tokens": tokens[i].astype(np.int32), "replay": replay[i].astype(np.int32),
              "mask": mask[i].astype(np.int32)} for i in range(m)]
  return batches, counts_of(replay, expert_devices, rows, num_experts, first_shard=first_shard)


def _packed_batches(tokens_NxT, routes, mask_NxT, packing, pad_routes, expert_devices, num_experts, first_shard):
  """Several sequences per row: rows `[n*R, T]` with segment ids and positions; counts of real tokens."""
  m, num_shards, rows, t = packing.num_micro_steps, packing.tokens_MxD.shape[1], packing.num_rows, packing.row_len
  # A sequence's last token predicts nothing of its own; packed, the next column is another sequence's.
  late_N = (mask_NxT * (np.arange(mask_NxT.shape[1])[None, :] >= packing.length_N[:, None] - 1)).any(axis=1)
  if late_N.any():
    n = int(np.flatnonzero(late_N)[0])
    raise ValueError(f"build_step_batches: the mask of sequence {n} (length {packing.length_N[n]}) marks its last "
                     f"position or one past its end; packed, that would predict the next sequence's first token")

  def packed(x, fill):
    return place_rows(x, packing, fill).reshape(m, num_shards * rows, t, *x.shape[2:])

  segment, positions = (a.reshape(m, num_shards * rows, t) for a in segments_and_positions(packing))
  replay = packed(routes, pad_routes)  # padding's replayed ids are valid but route nowhere (masked)
  tokens, mask = packed(tokens_NxT, 0), packed(mask_NxT, 0)
  batches = [{"tokens": tokens[i].astype(np.int32), "replay": replay[i].astype(np.int32),
              "mask": mask[i].astype(np.int32), "segment_ids": segment[i], "positions": positions[i]}
             for i in range(m)]
  return batches, counts_of(replay, expert_devices, rows, num_experts, routed_MxBxT=segment > 0,
                            first_shard=first_shard)


def with_advantages(step: StepBatches, advantages_N) -> list[dict]:
  """The micro-batches with `adv`: [n*R] one sequence per row (0 on padding rows), [n*R, T] packed (per
  token, 0 on padding)."""
  adv_N, packing, m = np.asarray(advantages_N, np.float32), step.packing, len(step.micro_batches)
  if packing.row_len is None:
    adv = gather_packed(adv_N, packing, 0.0).reshape(m, -1)
  else:
    adv = place_rows(np.broadcast_to(adv_N[:, None], (adv_N.size, packing.row_len)), packing, 0.0)
    adv = adv.reshape(m, -1, packing.row_len)
  return [{**batch, "adv": adv[i]} for i, batch in enumerate(step.micro_batches)]
