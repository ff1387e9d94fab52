"""Token splits over replicas: water-filled slot loads, integer per-(source, slot) counts, shares.

Batched over B (micro-step, layer) problems. Shapes: D devices, S slots per device, G = D*S, E experts.
The exact split is a small convex problem: each replicated expert's pairs may go to any of its slots,
and we want the most even device loads. `waterfill_slot_loads` solves it by block coordinate descent,
`integer_slot_loads` rounds per expert, `split_by_source` decides which source sends what (local first).
"""

from __future__ import annotations

import numpy as np

from foremoe_jax.planner import pairs, slots

# Water-filling stops once no slot load moves by this many pairs in a sweep (loads are rounded anyway).
CONVERGED_PAIRS = 0.5
# Height of a missing bin in water-filling: finite (no inf - inf), far above any load.
NO_BIN = 1e300


def merge_same_device_copies(slot_expert_BxDxS: np.ndarray, x_BxDxS: np.ndarray) -> np.ndarray:
  """Moves the load of same-device duplicate copies onto the device's first copy (same device load)."""
  se = slot_expert_BxDxS
  same_BxDxSxS = se[..., :, None] == se[..., None, :]
  merged = (same_BxDxSxS * x_BxDxS[..., None, :]).sum(-1)
  return np.where(slots.device_first_mask(se), merged, 0.0)


def even_slot_loads(slot_expert_BxDxS: np.ndarray, w_BxE: np.ndarray) -> np.ndarray:
  """float [B, G]: each expert's pairs spread evenly over its copies (EPLB's split), duplicates merged."""
  batch, num_devices, num_slots = slot_expert_BxDxS.shape
  se_BxG = slot_expert_BxDxS.reshape(batch, -1)
  copies_BxE = slots.copies_per_expert(se_BxG, w_BxE.shape[1])
  experts = np.where(se_BxG >= 0, se_BxG, 0)
  per_copy = np.take_along_axis(w_BxE / np.maximum(copies_BxE, 1), experts, axis=1)
  x_BxDxS = np.where(se_BxG >= 0, per_copy, 0.0).reshape(slot_expert_BxDxS.shape)
  return merge_same_device_copies(slot_expert_BxDxS, x_BxDxS).reshape(batch, -1)


def replica_table(slot_expert_BxDxS: np.ndarray, num_experts: int) -> np.ndarray:
  """int [B, K, R]: slots of each replicated expert (one per device), -1 padded; K experts, R copies."""
  batch = slot_expert_BxDxS.shape[0]
  se_BxG = slot_expert_BxDxS.reshape(batch, -1)
  first_BxG = slots.device_first_mask(slot_expert_BxDxS).reshape(batch, -1)
  counted = np.where(first_BxG, se_BxG, -1)
  copies_BxE = slots.copies_per_expert(counted, num_experts)
  experts = np.where(counted >= 0, counted, 0)
  active = first_BxG & (np.take_along_axis(copies_BxE, experts, axis=1) >= 2)
  if not active.any():
    return np.full((batch, 0, 0), -1, np.int64)
  keyed = np.where(active, se_BxG, num_experts)
  order_BxG, start_BxG = slots.expert_segments(keyed)
  sorted_active = np.take_along_axis(active, order_BxG, axis=1)
  rank = np.arange(keyed.shape[1]) - start_BxG
  begins = sorted_active & (rank == 0)
  group = np.cumsum(begins, axis=1) - 1
  table = np.full((batch, int(begins.sum(1).max()), int(rank[sorted_active].max()) + 1), -1, np.int64)
  rows = np.broadcast_to(np.arange(batch)[:, None], keyed.shape)
  table[rows[sorted_active], group[sorted_active], rank[sorted_active]] = order_BxG[sorted_active]
  return table


def _waterfill(others_BxR: np.ndarray, amount_B: np.ndarray) -> np.ndarray:
  """Pours `amount` onto bins of heights `others` (NO_BIN = no bin) up to their lowest common level."""
  heights = np.sort(others_BxR, axis=1)
  levels = (amount_B[:, None] + np.cumsum(heights, axis=1)) / np.arange(1, heights.shape[1] + 1)
  wet = (heights < levels).sum(1)
  level = np.take_along_axis(levels, np.maximum(wet - 1, 0)[:, None], axis=1)
  return np.maximum(level - others_BxR, 0.0)


def waterfill_slot_loads(slot_expert_BxDxS, x_BxG, num_experts: int, sweeps: int,
                         tolerance: float = CONVERGED_PAIRS) -> np.ndarray:
  """float [B, G]: per-slot loads with the most even device loads reachable by re-splitting replicas.

  Block coordinate descent on the sum of squared device loads, one replicated expert per block: each
  block re-pours that expert's pairs over its devices (water-filling). The min-norm point of this load
  polytope also minimizes the max load (Fujishige), and no block step raises the max, so starting from
  EPLB's even split the result is never worse than it. `x_BxG` must already hold each expert's total.
  Stops early once a sweep moves no slot load by `tolerance` pairs or more.
  """
  batch, num_devices, num_slots = slot_expert_BxDxS.shape
  table_BxKxR = replica_table(slot_expert_BxDxS, num_experts)
  # Most copies first in each problem, so that block k runs only on the problems with a k-th replicated
  # expert, and only as wide as their k-th expert's copies (most experts have 2, a few up to D).
  copies_BxK = (table_BxKxR >= 0).sum(-1)
  order_BxK = np.argsort(-copies_BxK, axis=1, kind="stable")
  table_BxKxR = np.take_along_axis(table_BxKxR, order_BxK[:, :, None], axis=1)
  copies_BxK = np.take_along_axis(copies_BxK, order_BxK, axis=1)
  # Flat indices; padding points at one extra trailing slot (always 0) on an extra device of height NO_BIN.
  x_flat = np.append(np.asarray(x_BxG, dtype=np.float64).reshape(-1), 0.0)
  load_flat = np.append(x_flat[:-1].reshape(batch, num_devices, num_slots).sum(-1).reshape(-1), NO_BIN)
  blocks = []
  for k in range(table_BxKxR.shape[1]):
    rows_N = np.nonzero(copies_BxK[:, k])[0]
    table_NxR = table_BxKxR[rows_N, k, :copies_BxK[rows_N, k].max()]
    valid_NxR = table_NxR >= 0
    blocks.append((np.where(valid_NxR, rows_N[:, None] * (num_devices * num_slots) + table_NxR, x_flat.size - 1),
                   np.where(valid_NxR, rows_N[:, None] * num_devices + table_NxR // num_slots, load_flat.size - 1)))
  for _ in range(sweeps):
    largest_change = 0.0
    for slot, device in blocks:
      old = x_flat[slot]
      new = _waterfill(load_flat[device] - old, old.sum(1))
      x_flat[slot] = new
      new -= old
      load_flat[device] += new
      largest_change = max(largest_change, float(np.abs(new).max(initial=0.0)))
    if largest_change < tolerance:
      break
  return x_flat[:-1].reshape(batch, -1)


def integer_slot_loads(slot_expert_BxG: np.ndarray, x_BxG: np.ndarray, w_BxE: np.ndarray) -> np.ndarray:
  """int64 [B, G]: per-slot pair counts summing to each expert's total (largest remainder rounding)."""
  held = slot_expert_BxG >= 0
  x = np.where(held, np.maximum(x_BxG, 0.0), 0.0)
  floor = np.floor(x + 1e-9)
  frac = np.clip(x - floor, 0.0, 1.0)
  experts = np.where(held, slot_expert_BxG, 0)
  batch, num_experts = w_BxE.shape
  flat = (np.arange(batch)[:, None] * num_experts + experts)[held]
  floor_sum = np.bincount(flat, weights=floor[held], minlength=batch * num_experts).reshape(batch, -1)
  deficit_BxE = np.rint(w_BxE - floor_sum)
  # Rank the slots of each expert by decreasing fraction; the first `deficit` of them get one more pair.
  key = np.where(held, slot_expert_BxG + 0.5 * (1.0 - frac), -1.0)
  order = np.argsort(key, axis=1, kind="stable")
  sorted_experts = np.take_along_axis(slot_expert_BxG, order, axis=1)
  _, start = slots.expert_segments(sorted_experts)
  rank_sorted = np.arange(key.shape[1]) - start
  rank = np.empty_like(rank_sorted)
  np.put_along_axis(rank, order, rank_sorted, axis=1)
  bump = held & (rank < np.take_along_axis(deficit_BxE, experts, axis=1))
  return (floor + bump).astype(np.int64)


def split_by_source(slot_expert_BxDxS, slot_pairs_BxG, counts_BxDxE) -> np.ndarray:
  """int64 [B, G, D_src]: pairs each source sends to each slot, so that each slot gets `slot_pairs`.

  A replica first takes the pairs of its own device (no all-to-all traffic); the rest of each expert's
  sources fill the rest of its slots in order (north-west corner rule). Slots of one expert must sum to
  that expert's total count.
  """
  batch, num_devices, num_slots = slot_expert_BxDxS.shape
  se_BxG = slot_expert_BxDxS.reshape(batch, -1)
  experts = np.maximum(se_BxG, 0)
  slot_G = np.arange(se_BxG.shape[1])
  device_G = slot_G // num_slots
  rows = np.arange(batch)[:, None]
  counts_BxExD = np.ascontiguousarray(np.swapaxes(counts_BxDxE, 1, 2))
  first = slots.device_first_mask(slot_expert_BxDxS).reshape(batch, -1)
  local_BxG = np.where(first, np.minimum(counts_BxExD[rows, experts, device_G], slot_pairs_BxG), 0)
  rows_BxG = np.broadcast_to(rows, se_BxG.shape)
  counts_BxExD[rows_BxG[first], experts[first], np.broadcast_to(device_G, se_BxG.shape)[first]] -= local_BxG[first]
  remaining_BxGxD = counts_BxExD[rows, experts]
  remaining_BxGxD[se_BxG < 0] = 0
  room_BxG = slot_pairs_BxG - local_BxG
  room_start = slots.segmented_exclusive_cumsum(room_BxG, se_BxG)[:, :, None]
  src_end = np.cumsum(remaining_BxGxD, axis=2)
  pairs_BxGxD = np.minimum(src_end, room_start + room_BxG[:, :, None])
  pairs_BxGxD -= np.maximum(src_end - remaining_BxGxD, room_start)
  np.maximum(pairs_BxGxD, 0, out=pairs_BxGxD)
  pairs_BxGxD[rows, slot_G, device_G] += local_BxG
  return pairs_BxGxD


def even_split_by_source(slot_expert_BxG: np.ndarray, counts_BxDxE: np.ndarray) -> np.ndarray:
  """int64 [B, G, D_src]: EPLB's even split, as integers: n // r per copy, the remainder rotated by source."""
  num_experts = counts_BxDxE.shape[2]
  copies_BxE = slots.copies_per_expert(slot_expert_BxG, num_experts)
  copies_BxG = np.maximum(np.take_along_axis(copies_BxE, np.maximum(slot_expert_BxG, 0), axis=1), 1)[:, :, None]
  rank_BxG = slots.segmented_exclusive_cumsum((slot_expert_BxG >= 0).astype(np.int64), slot_expert_BxG)
  n_BxGxD = slots.pairs_per_slot_source(slot_expert_BxG, counts_BxDxE)
  source_D = np.arange(counts_BxDxE.shape[1])
  extra = (rank_BxG[:, :, None] + source_D) % copies_BxG < n_BxGxD % copies_BxG
  return n_BxGxD // copies_BxG + extra


def shares_from_pairs(slot_expert_BxG: np.ndarray, pairs_BxGxD: np.ndarray, counts_BxDxE: np.ndarray) -> np.ndarray:
  """float32 [B, D_src, G]: pairs / n, so the dispatcher's rint(cumsum(share) * n) gives back the pairs.

  A source with no pairs for an expert sends its (empty) share to the expert's first copy.
  """
  n_BxGxD = slots.pairs_per_slot_source(slot_expert_BxG, counts_BxDxE)
  share = pairs_BxGxD.astype(np.float32)
  share /= np.maximum(n_BxGxD, 1).astype(np.float32)
  no_pairs = n_BxGxD == 0
  share[no_pairs] = np.broadcast_to(slots.first_copy_mask(slot_expert_BxG)[:, :, None], share.shape)[no_pairs]
  share[slot_expert_BxG < 0] = 0.0
  return np.ascontiguousarray(np.swapaxes(share, 1, 2))


def plan_shares(slot_expert_BxDxS, counts_BxDxE, slot_pairs_BxG=None, pair_sweeps: int = 0,
                chunk: int = 8) -> np.ndarray:
  """float32 [B, D_src, G]: shares realizing `slot_pairs` exactly, or EPLB's even split if None."""
  return plan_split(slot_expert_BxDxS, counts_BxDxE, slot_pairs_BxG, pair_sweeps, chunk)[0]


def split_stats(pairs_BxGxD: np.ndarray, num_devices: int) -> tuple[np.ndarray, np.ndarray]:
  """(pairs per slot int64 [B, G], pair need int64 [B]: the largest (source, destination) pair count)."""
  return pairs_BxGxD.sum(-1), pairs.pair_counts(pairs_BxGxD, num_devices).max((1, 2), initial=0)


def even_split_stats(slot_expert_BxDxS, counts_BxDxE, chunk: int = 8):
  """(slot loads int64 [B, G], pair need int64 [B]) of EPLB's even split, without its shares."""
  batch, num_devices, _ = slot_expert_BxDxS.shape
  se_BxG = slot_expert_BxDxS.reshape(batch, -1)
  stats = [split_stats(even_split_by_source(se_BxG[lo:lo + chunk], counts_BxDxE[lo:lo + chunk]), num_devices)
           for lo in range(0, batch, chunk)]
  return np.concatenate([s[0] for s in stats]), np.concatenate([s[1] for s in stats])


def plan_split(slot_expert_BxDxS, counts_BxDxE, slot_pairs_BxG=None, pair_sweeps: int = 0, chunk: int = 8):
  """(shares float32 [B, D_src, G], slot loads int64 [B, G], pair need int64 [B]) of `plan_shares`.

  The pair need of a problem is its largest (source, destination) pair count: what its padded
  all_to_all must hold. With `pair_sweeps`, the sources' mix behind each replica is flattened over
  (source, destination) pairs (`pairs.balance_pairs`, over all B at once). The rest works in chunks of
  B so that the [chunk, G, D] temporaries stay in cache.
  """
  batch, num_devices, num_slots = slot_expert_BxDxS.shape
  num_experts = counts_BxDxE.shape[2]
  parts = [slice(lo, lo + chunk) for lo in range(0, batch, chunk)]
  se_BxG = slot_expert_BxDxS.reshape(batch, -1)
  if slot_pairs_BxG is None:
    pairs_BxGxD = [even_split_by_source(se_BxG[part], counts_BxDxE[part]) for part in parts]
  else:
    pairs_BxGxD = np.empty((batch, num_devices * num_slots, num_devices), np.int64)
    for part in parts:
      pairs_BxGxD[part] = split_by_source(slot_expert_BxDxS[part], slot_pairs_BxG[part], counts_BxDxE[part])
    table_BxKxR = replica_table(slot_expert_BxDxS, num_experts)
    pairs_BxGxD = pairs.balance_pairs(table_BxKxR, pairs_BxGxD, num_slots, pair_sweeps)
    pairs_BxGxD = [pairs_BxGxD[part] for part in parts]
  share_BxDxG = np.empty((batch, num_devices, num_devices * num_slots), np.float32)
  load_BxG = np.empty((batch, num_devices * num_slots), np.int64)
  need_B = np.empty(batch, np.int64)
  for part, chunk_pairs in zip(parts, pairs_BxGxD):
    share_BxDxG[part] = shares_from_pairs(se_BxG[part], chunk_pairs, counts_BxDxE[part])
    load_BxG[part], need_B[part] = split_stats(chunk_pairs, num_devices)
  return share_BxDxG, load_BxG, need_B
