"""Token splits over replicas: water-filled slot loads, integer per-(source, slot) counts, shares.

Batched over B (micro-step, layer) problems. Shapes: D devices, S slots per device, G = D*S, E experts.
The exact split is a small convex problem: each replicated expert's pairs may go to any of its slots,
and we want the most even device loads. `waterfill_slot_loads` solves it by block coordinate descent,
`integer_slot_loads` rounds per expert, `split_by_source` decides which source sends what (local first).
"""

from __future__ import annotations

import functools

import numpy as np

from foremoe_jax.planner import bins, pairs, slots

# Water-filling stops once no slot load moves by this many pairs in a sweep (loads are rounded anyway).
CONVERGED_PAIRS = 0.5
# Height of a missing bin in water-filling: finite (no inf - inf), far above any load.
NO_BIN = 1e300


def merge_same_device_copies(slot_expert_BxDxS: np.ndarray, x_BxDxS: np.ndarray) -> np.ndarray:
  """Moves the load of same-device duplicate copies onto the device's first copy (same device load)."""
  se = slot_expert_BxDxS
  first = slots.device_first_mask(se)
  merged = np.where(first, x_BxDxS, 0.0)
  # Only devices holding a duplicate need the sums (few: the greedy never places one).
  dup = ((se >= 0) & ~first).any(-1)
  if dup.any():
    se_NxS, x_NxS = se[dup], x_BxDxS[dup]
    same_NxSxS = se_NxS[:, :, None] == se_NxS[:, None, :]
    merged[dup] = np.where(first[dup], (same_NxSxS * x_NxS[:, None, :]).sum(-1), 0.0)
  return merged


def even_slot_loads(slot_expert_BxDxS: np.ndarray, w_BxE: np.ndarray) -> np.ndarray:
  """float [B, G]: each expert's pairs spread evenly over its copies (EPLB's split), duplicates merged."""
  batch, num_devices, num_slots = slot_expert_BxDxS.shape
  se_BxG = slot_expert_BxDxS.reshape(batch, -1)
  copies_BxE = slots.copies_per_expert(se_BxG, w_BxE.shape[1])
  experts = np.where(se_BxG >= 0, se_BxG, 0)
  per_copy = np.take_along_axis(w_BxE / np.maximum(copies_BxE, 1), experts, axis=1)
  x_BxDxS = np.where(se_BxG >= 0, per_copy, 0.0).reshape(slot_expert_BxDxS.shape)
  return merge_same_device_copies(slot_expert_BxDxS, x_BxDxS).reshape(batch, -1)


def replica_table(slot_expert_BxDxS: np.ndarray, num_experts: int, most_copies_first: bool = False) -> np.ndarray:
  """int [B, K, R]: slots of each replicated expert (one per device), -1 padded; K experts, R copies.
  Experts in id order, or by decreasing copies (ties in id order) with most_copies_first."""
  batch = slot_expert_BxDxS.shape[0]
  se_BxG = slot_expert_BxDxS.reshape(batch, -1)
  first_BxG = slots.device_first_mask(slot_expert_BxDxS).reshape(batch, -1)
  counted = np.where(first_BxG, se_BxG, -1)
  copies_BxE = slots.copies_per_expert(counted, num_experts)
  copies_BxG = np.take_along_axis(copies_BxE, np.maximum(counted, 0), axis=1)
  active = first_BxG & (copies_BxG >= 2)
  if not active.any():
    return np.full((batch, 0, 0), -1, np.int64)
  if most_copies_first:
    # One sort key: fewer copies, then the expert id; slots of no replicated expert last.
    most = int(copies_BxE.max())
    keyed = np.where(active, (most - copies_BxG) * (num_experts + 1) + se_BxG, (most - 1) * (num_experts + 1))
  else:
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


def waterfill_slot_loads(slot_expert_BxDxS, x_BxG, num_experts: int, sweeps: int,
                         tolerance: float = CONVERGED_PAIRS, placement_B=None) -> np.ndarray:
  """float [B, G]: per-slot loads with the most even device loads reachable by re-splitting replicas.

  Block coordinate descent on the sum of squared device loads, one replicated expert per block: each
  block re-pours that expert's pairs over its devices (water-filling). The min-norm point of this load
  polytope also minimizes the max load (Fujishige), and no block step raises the max, so starting from
  EPLB's even split the result is never worse than it. `x_BxG` must already hold each expert's total.
  Stops early once a sweep moves no slot load by `tolerance` pairs or more.
  placement_B: if given, slot_expert holds U distinct placements [U, D, S] and problem b uses
  placement placement_B[b] (problems that share a placement share its replica table).
  """
  batch = np.shape(x_BxG)[0]
  num_devices, num_slots = slot_expert_BxDxS.shape[1:]
  if placement_B is None:
    placement_B = np.arange(batch)
  # Most copies first in each problem, so that block k runs only on the problems with a k-th replicated
  # expert, and only as wide as their k-th expert's copies (most experts have 2, a few up to D).
  table_UxKxR = replica_table(slot_expert_BxDxS, num_experts, most_copies_first=True)
  copies_BxK = (table_UxKxR >= 0).sum(-1)[placement_B]
  # Flat indices; padding points at one extra trailing slot (always 0) on an extra device of height NO_BIN.
  x_flat = np.append(np.asarray(x_BxG, dtype=np.float64).reshape(-1), 0.0)
  load_flat = np.append(x_flat[:-1].reshape(batch, num_devices, num_slots).sum(-1).reshape(-1), NO_BIN)
  # Per block, bins along axis 0; its slots belong to no other block, so it keeps their loads itself.
  blocks = []
  for k in range(table_UxKxR.shape[1]):
    rows_N = np.nonzero(copies_BxK[:, k])[0]
    table_RxN = table_UxKxR[placement_B[rows_N], k, :copies_BxK[rows_N, k].max()].T
    valid_RxN = table_RxN >= 0
    slot_RxN = np.where(valid_RxN, rows_N * (num_devices * num_slots) + table_RxN, x_flat.size - 1)
    device_RxN = np.where(valid_RxN, rows_N * num_devices + table_RxN // num_slots, load_flat.size - 1)
    blocks.append([slot_RxN, device_RxN, x_flat[slot_RxN]])
  for _ in range(sweeps):
    largest_change = 0.0
    for block in blocks:
      _, device, old = block
      new = bins.pour(load_flat[device] - old, bins.sums(old))
      block[2] = new
      change = new - old
      load_flat[device] += change
      largest_change = max(largest_change, float(np.abs(change).max(initial=0.0)))
    if largest_change < tolerance:
      break
  for slot, _, x in blocks:
    x_flat[slot] = x
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
  return _fill_by_source(slot_expert_BxDxS, counts_BxDxE,
                         *_local_first(slot_expert_BxDxS, slot_pairs_BxG, counts_BxDxE))


def _local_first(slot_expert_BxDxS, slot_pairs_BxG, counts_BxDxE):
  """split_by_source's per-slot part, int [B, G] each: the pairs a slot takes from its own device (its
  expert's first copy there only), and the range of the expert's other pairs it takes (start, end)."""
  batch, num_devices, num_slots = slot_expert_BxDxS.shape
  se_BxG = slot_expert_BxDxS.reshape(batch, -1)
  device_G = np.arange(se_BxG.shape[1]) // num_slots
  first_BxG = slots.device_first_mask(slot_expert_BxDxS).reshape(batch, -1)
  own_BxG = counts_BxDxE[np.arange(batch)[:, None], device_G, np.maximum(se_BxG, 0)]
  local_BxG = np.where(first_BxG, np.minimum(own_BxG, slot_pairs_BxG), 0)
  room_BxG = slot_pairs_BxG - local_BxG
  room_start_BxG = slots.segmented_exclusive_cumsum(room_BxG, se_BxG)
  return local_BxG, room_start_BxG, room_start_BxG + room_BxG


def _fill_by_source(slot_expert_BxDxS, counts_BxDxE, local_BxG, room_start_BxG, room_end_BxG,
                    out_BxGxD=None) -> np.ndarray:
  """split_by_source's per-(slot, source) part, from `_local_first` (into out_BxGxD if given)."""
  batch, num_devices, num_slots = slot_expert_BxDxS.shape
  se_BxG = slot_expert_BxDxS.reshape(batch, -1)
  experts = np.maximum(se_BxG, 0)
  slot_G = np.arange(se_BxG.shape[1])
  device_G = slot_G // num_slots
  rows = np.arange(batch)[:, None]
  counts_BxExD = np.swapaxes(counts_BxDxE, 1, 2).copy()  # written below; with D = 1 the swap is a view
  local = local_BxG > 0  # only first copies take local pairs
  rows_BxG = np.broadcast_to(rows, se_BxG.shape)
  counts_BxExD[rows_BxG[local], experts[local], np.broadcast_to(device_G, se_BxG.shape)[local]] -= local_BxG[local]
  remaining_BxGxD = counts_BxExD[rows, experts]
  remaining_BxGxD[se_BxG < 0] = 0
  src_end = np.cumsum(remaining_BxGxD, axis=2)
  # The overlap of each source's range of the expert's other pairs with the slot's range.
  pairs_BxGxD = np.minimum(src_end, room_end_BxG[:, :, None], out=out_BxGxD)
  pairs_BxGxD -= np.maximum(src_end - remaining_BxGxD, room_start_BxG[:, :, None])
  np.maximum(pairs_BxGxD, 0, out=pairs_BxGxD)
  pairs_BxGxD[rows, slot_G, device_G] += local_BxG
  return pairs_BxGxD


def even_split_by_source(slot_expert_BxG: np.ndarray, counts_BxDxE: np.ndarray) -> np.ndarray:
  """int64 [B, G, D_src]: EPLB's even split, as integers: n // r per copy, the remainder rotated by source."""
  n_BxGxD = slots.pairs_per_slot_source(slot_expert_BxG, counts_BxDxE)
  return _even_split(n_BxGxD, *_copy_ranks(slot_expert_BxG, counts_BxDxE.shape[2]))


def _copy_ranks(slot_expert_BxG: np.ndarray, num_experts: int):
  """(copies of each slot's expert (0 if empty), the slot's rank among them by g), int [B, G]."""
  copies_BxE = slots.copies_per_expert(slot_expert_BxG, num_experts)
  held = slot_expert_BxG >= 0
  copies_BxG = np.where(held, np.take_along_axis(copies_BxE, np.maximum(slot_expert_BxG, 0), axis=1), 0)
  return copies_BxG, slots.segmented_exclusive_cumsum(held.astype(np.int64), slot_expert_BxG)


@functools.lru_cache(maxsize=None)
def _turns(max_copies: int, num_src: int) -> np.ndarray:
  """float [T, D_src], read-only: (rank + source) % copies, row copies * (copies - 1) / 2 + rank."""
  copies = np.repeat(np.arange(1, max_copies + 1), np.arange(1, max_copies + 1))
  rank = np.arange(copies.size) - copies * (copies - 1) // 2
  turns = ((rank[:, None] + np.arange(num_src)) % copies[:, None]).astype(np.float64)
  turns.setflags(write=False)
  return turns


def _even_split(n_BxGxD: np.ndarray, copies_BxG: np.ndarray, rank_BxG: np.ndarray) -> np.ndarray:
  """even_split_by_source from n = pairs_per_slot_source and `_copy_ranks`. A single copy takes all its n,
  so only the slots of replicated experts divide, in float64: exact on these whole numbers, and several
  times faster than numpy's integer division."""
  shared = copies_BxG > 1
  pairs_BxGxD = n_BxGxD.copy()
  if shared.any():
    copies_K = copies_BxG[shared]
    turns = _turns(int(copies_K.max()), n_BxGxD.shape[2])
    turn_KxD = np.take(turns, copies_K * (copies_K - 1) // 2 + rank_BxG[shared], axis=0)
    copies_K = copies_K[:, None].astype(np.float64)
    n_KxD = n_BxGxD[shared].astype(np.float64)
    quotient = np.floor(n_KxD / copies_K)
    pairs_BxGxD[shared] = quotient + (turn_KxD < n_KxD - quotient * copies_K)
  return pairs_BxGxD


def write_shares(first_BxG: np.ndarray, pairs_BxGxD: np.ndarray, n_BxGxD: np.ndarray, share_BxDxG: np.ndarray):
  """Writes pairs / n (n = pairs_per_slot_source) as float32 [B, D_src, G] into share_BxDxG, so the
  dispatcher's rint(cumsum(share) * n) gives back the pairs.

  A source with no pairs for an expert sends its (empty) share to the expert's first copy (first_BxG:
  `slots.first_copy_mask`); empty slots (n = 0, no first copy) get 0.
  """
  # float32(pairs) / float32(n), as the dispatcher's float32 arithmetic expects.
  share_BxGxD = pairs_BxGxD.astype(np.float32)
  n_BxGxD = n_BxGxD.astype(np.float32)
  no_pairs = n_BxGxD == 0
  share_BxGxD /= np.maximum(n_BxGxD, 1, out=n_BxGxD)
  np.copyto(share_BxGxD, first_BxG[:, :, None], where=no_pairs)
  share_BxDxG[...] = np.swapaxes(share_BxGxD, 1, 2)


def plan_shares(slot_expert_BxDxS, counts_BxDxE, slot_pairs_BxG=None, pair_sweeps: int = 0,
                chunk: int = 8) -> np.ndarray:
  """float32 [B, D_src, G]: shares realizing `slot_pairs` exactly, or EPLB's even split if None."""
  return plan_split(slot_expert_BxDxS, counts_BxDxE, slot_pairs_BxG, pair_sweeps, chunk)[0]


def split_stats(pairs_BxGxD: np.ndarray, num_devices: int) -> tuple[np.ndarray, np.ndarray]:
  """(pairs per slot int64 [B, G], pair need int64 [B]: the largest (source, destination) pair count)."""
  return pairs_BxGxD.sum(-1), pairs.pair_counts(pairs_BxGxD, num_devices).max((1, 2), initial=0)


def plan_split(slot_expert_BxDxS, counts_BxDxE, slot_pairs_BxG=None, pair_sweeps: int = 0, chunk: int = 8):
  """(shares float32 [B, D_src, G], slot loads int64 [B, G], pair need int64 [B]) of `plan_shares`.

  The pair need of a problem is its largest (source, destination) pair count: what its padded
  all_to_all must hold. The work runs in chunks of B so that the [chunk, G, D] temporaries stay in cache.
  """
  if slot_pairs_BxG is not None:
    pairs_BxGxD, load_BxG, need_B = exact_pairs(slot_expert_BxDxS, counts_BxDxE, slot_pairs_BxG, pair_sweeps, chunk)
    return exact_shares(slot_expert_BxDxS, counts_BxDxE, pairs_BxGxD, chunk), load_BxG, need_B
  batch, num_devices, num_slots = slot_expert_BxDxS.shape
  se_BxG = slot_expert_BxDxS.reshape(batch, -1)
  share_BxDxG = np.empty((batch, num_devices, num_devices * num_slots), np.float32)
  load_BxG = np.empty((batch, num_devices * num_slots), np.int64)
  need_B = np.empty(batch, np.int64)
  copies_BxG, rank_BxG = _copy_ranks(se_BxG, counts_BxDxE.shape[2])
  first_BxG = slots.first_copy_mask(se_BxG)
  for lo in range(0, batch, chunk):
    part = slice(lo, lo + chunk)
    n_BxGxD = slots.pairs_per_slot_source(se_BxG[part], counts_BxDxE[part])
    chunk_pairs = _even_split(n_BxGxD, copies_BxG[part], rank_BxG[part])
    write_shares(first_BxG[part], chunk_pairs, n_BxGxD, share_BxDxG[part])
    load_BxG[part], need_B[part] = split_stats(chunk_pairs, num_devices)
  return share_BxDxG, load_BxG, need_B


def exact_pairs(slot_expert_BxDxS, counts_BxDxE, slot_pairs_BxG, pair_sweeps: int = 0, chunk: int = 8, stop=None,
                num_layers: int | None = None):
  """(pairs int64 [B, G, D_src], slot loads int64 [B, G], pair need int64 [B]) of the exact split:
  `split_by_source`, then with `pair_sweeps` the sources' mix behind each replica flattened over
  (source, destination) pairs (`pairs.balance_pairs`, over all B at once, by micro-step: the problems
  are micro-step-major with num_layers per micro-step; None: all one micro-step).

  stop(busiest_B, need_B): for a caller that only needs to know whether the split is worse than
  something; called between balancing rounds with lower bounds of each problem's busiest-device load
  and of its pair need (int64 [B] each). True ends the work, and exact_pairs returns None.
  """
  batch, num_devices, num_slots = slot_expert_BxDxS.shape
  pairs_BxGxD = np.empty((batch, num_devices * num_slots, num_devices), np.int64)
  load_BxG = np.empty((batch, num_devices * num_slots), np.int64)
  p_BxDxD = np.empty((batch, num_devices, num_devices), np.int64)
  local_BxG, room_start_BxG, room_end_BxG = _local_first(slot_expert_BxDxS, slot_pairs_BxG, counts_BxDxE)
  for lo in range(0, batch, chunk):
    part = slice(lo, lo + chunk)
    _fill_by_source(slot_expert_BxDxS[part], counts_BxDxE[part], local_BxG[part], room_start_BxG[part],
                    room_end_BxG[part], out_BxGxD=pairs_BxGxD[part])
    load_BxG[part], p_BxDxD[part] = pairs_BxGxD[part].sum(-1), pairs.pair_counts(pairs_BxGxD[part], num_devices)
  # Balancing moves pairs between the slots of a problem, never in or out: its busiest device keeps at
  # least the mean load until its own round is done, and some source sends that device at least 1/D of it.
  busiest_floor_B = -(-load_BxG.sum(1) // num_devices)
  balanced_B = np.zeros(batch, bool)
  gave_up = False

  def round_done(done_B):
    nonlocal gave_up
    # The rounding can shift a pair between a balanced expert's two slots: reload the new rows.
    load_BxG[done_B & ~balanced_B] = pairs_BxGxD[done_B & ~balanced_B].sum(-1)
    balanced_B[:] = done_B
    if stop is not None:
      busiest_B = np.where(done_B, load_BxG.reshape(batch, num_devices, num_slots).sum(-1).max(-1), busiest_floor_B)
      need_B = np.where(done_B, p_BxDxD.max((1, 2)), -(-busiest_B // num_devices))
      gave_up = stop(busiest_B, need_B)
    return gave_up

  pairs.balance_pairs(replica_table(slot_expert_BxDxS, counts_BxDxE.shape[2]), pairs_BxGxD, num_slots,
                      pair_sweeps, p_BxDxD=p_BxDxD, stop=round_done, num_layers=num_layers)
  if gave_up:
    return None
  return pairs_BxGxD, load_BxG, p_BxDxD.max((1, 2), initial=0)


def exact_shares(slot_expert_BxDxS, counts_BxDxE, pairs_BxGxD, chunk: int = 8) -> np.ndarray:
  """float32 [B, D_src, G]: the shares that realize pairs_BxGxD (from `exact_pairs`)."""
  batch, num_devices, num_slots = slot_expert_BxDxS.shape
  se_BxG = slot_expert_BxDxS.reshape(batch, -1)
  first_BxG = slots.first_copy_mask(se_BxG)
  share_BxDxG = np.empty((batch, num_devices, num_devices * num_slots), np.float32)
  for lo in range(0, batch, chunk):
    part = slice(lo, lo + chunk)
    n_BxGxD = slots.pairs_per_slot_source(se_BxG[part], counts_BxDxE[part])
    write_shares(first_BxG[part], pairs_BxGxD[part], n_BxGxD, share_BxDxG[part])
  return share_BxDxG
