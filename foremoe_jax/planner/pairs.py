"""Pair-aware split: which source sends a replicated expert's pairs to which of its devices.

The padded all_to_all gives every (source, destination) chunk, the self chunk included, one capacity
per micro-step: the max pair count over its layers, bucketed (`micro_capacities`). Slot loads (and so
device loads) are fixed before this step; what is left free is the mix of sources behind each replica.
Block coordinate descent on the sum of squared (source, destination) pair counts P[d, s], one block per
replicated expert and two of its devices: the pairs each of the two copies takes stay fixed, the
sources' mix between them is re-solved exactly (a water-filling in one multiplier), then rounded so
that every count stays a whole number.
Batched over B (micro-step, layer) problems; Python loops run over each problem's blocks in turn
(the p-th block of every problem at once), never over problems.
"""

from __future__ import annotations

import numpy as np

# Bisection steps for a block's multiplier: the bracket shrinks to 2^-10 of the largest count; the
# interpolation between its ends then hits the sum exactly (rounding follows anyway).
BISECTIONS = 10
# First rounds of balance_pairs: the problems whose max pair count is within this fraction of their
# micro-step's max.
NEAR_MAX = 0.7
# Padded capacity buckets per power of two (default): at most 1/BUCKETS_PER_OCTAVE padding; each
# bucket a micro-step meets compiles its programs once (`PlanConfig.capacity_buckets` sets it per plan).
BUCKETS_PER_OCTAVE = 16


def check_buckets(per_octave, name: str) -> None:
  """ValueError unless `per_octave` (capacity buckets per power of two) is a power of two >= 1."""
  if not isinstance(per_octave, int) or isinstance(per_octave, bool) or per_octave < 1 or per_octave & (per_octave - 1):
    raise ValueError(f"{name}={per_octave!r} must be a power of two >= 1")


def bucket(n, per_octave: int = BUCKETS_PER_OCTAVE):
  """The padded capacity compiled for a need of n rows per (source, destination): rounded up to 8,
  then to one of `per_octave` steps per power of two (the executor's rule; the planner prices it).
  An int for a scalar n; elementwise (int64) on arrays."""
  n = np.maximum(8, np.ceil(np.asarray(n) / 8).astype(np.int64) * 8)
  # frexp's exponent is n's bit length (exact: needs stay far below 2^53).
  step = np.maximum(8, np.left_shift(1, np.frexp(n)[1].astype(np.int64) - 1) // per_octave)
  capacity = -(-n // step) * step
  return int(capacity) if capacity.ndim == 0 else capacity


def micro_capacities(need_MxL: np.ndarray, per_octave: int = BUCKETS_PER_OCTAVE) -> np.ndarray:
  """int64 [M]: each micro-step's padded capacity: its layers' largest pair need, bucketed. One program
  runs all layers of a micro-step, so they share one capacity; micro-steps each get their own."""
  need_MxL = np.asarray(need_MxL)
  return bucket(need_MxL.reshape(len(need_MxL), -1).max(1, initial=0), per_octave)


def fixed_pair_max(counts_MxLxDxE: np.ndarray, bases_NxLxDxS: np.ndarray) -> np.ndarray:
  """int64 [N, M, L]: per base, micro-step and layer, the largest (source, destination) pair count from
  the experts the base holds once. No split can move those pairs: that micro-step's padded capacity is at
  least this."""
  num_micro, num_layers, num_devices, num_experts = counts_MxLxDxE.shape
  num_bases, _, _, num_slots = bases_NxLxDxS.shape
  # Per layer, each expert's pairs per (micro-step, source) as one contiguous row, then a zero row: a
  # device's pair counts are the sum of the rows of the experts it holds once, S row gathers per layer.
  rows_LxExR = np.zeros((num_layers, num_experts + 1, num_micro * num_devices), np.int64)
  rows_LxExR[:, :num_experts] = counts_MxLxDxE.transpose(1, 3, 0, 2).reshape(num_layers, num_experts, -1)
  expert_LxNxG = np.where(bases_NxLxDxS >= 0, bases_NxLxDxS, num_experts).transpose(1, 0, 2, 3).reshape(
      num_layers, num_bases, -1)
  flat = (np.arange(num_layers * num_bases).reshape(num_layers, num_bases, 1) * (num_experts + 1) + expert_LxNxG)
  copies = np.bincount(flat.ravel(), minlength=num_layers * num_bases * (num_experts + 1))
  # Replicated experts' pairs can move; empty slots point at the zero row too.
  expert_LxNxG = np.where(copies[flat] == 1, expert_LxNxG, num_experts).reshape(num_layers, num_bases,
                                                                                 num_devices, num_slots)
  out = np.empty((num_bases, num_micro, num_layers), np.int64)
  for layer in range(num_layers):
    total_NxDxR = np.take(rows_LxExR[layer], expert_LxNxG[layer, :, :, 0], axis=0)
    for j in range(1, num_slots):
      total_NxDxR += np.take(rows_LxExR[layer], expert_LxNxG[layer, :, :, j], axis=0)
    out[:, :, layer] = total_NxDxR.max(1).reshape(num_bases, num_micro, num_devices).max(2)
  return out


def pair_counts(pairs_BxGxD: np.ndarray, num_devices: int) -> np.ndarray:
  """[B, D_dst, D_src]: pairs each source sends to each device (slots summed)."""
  batch, num_slots, num_src = pairs_BxGxD.shape
  return pairs_BxGxD.reshape(batch, num_devices, num_slots // num_devices, num_src).sum(2)


def _clip_fill(h_BxN: np.ndarray, cap_BxN: np.ndarray, amount_B: np.ndarray) -> np.ndarray:
  """[B, N]: t = clip(h + nu, 0, cap) with the nu per row that makes sum(t) = amount (0 <= amount <= sum(cap)).

  sum(t) is nondecreasing in nu: bisection (cheaper than sorting kinks), then the exact sum by
  interpolating between the bracket's two clipped points (which keeps 0 <= t <= cap).
  The bisection's sums are exact (halves of whole pair counts and bracket points on a 2^-BISECTIONS
  grid), so its test sum(clip(h + nu, 0, cap)) < amount is made as sum(clip(nu, -h, cap - h)) <
  amount - sum(h): the same answers, one pass less.
  """
  low, high = -h_BxN, cap_BxN - h_BxN
  lo, hi = low.min(1, keepdims=True), high.max(1, keepdims=True)
  rest = amount_B[:, None] - h_BxN.sum(1, keepdims=True)
  t = np.empty_like(h_BxN)
  for _ in range(BISECTIONS):
    mid = 0.5 * (lo + hi)
    below = np.minimum(np.maximum(low, mid, out=t), high, out=t).sum(1, keepdims=True) < rest
    lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
  t_lo = np.minimum(np.maximum(h_BxN + lo, 0.0), cap_BxN)
  t_hi = np.minimum(np.maximum(h_BxN + hi, 0.0), cap_BxN)
  f_lo, f_hi = t_lo.sum(1, keepdims=True), t_hi.sum(1, keepdims=True)
  weight = np.clip((amount_B[:, None] - f_lo) / np.maximum(f_hi - f_lo, 1e-12), 0.0, 1.0)
  return t_lo + weight * (t_hi - t_lo)


def _round_keeping_sum(t_BxN: np.ndarray, cap_BxN: np.ndarray, total_B: np.ndarray) -> np.ndarray:
  """int64 [B, N]: floor or ceil of each t (within [0, cap]), summing to total: rounded running sums."""
  ends = np.floor(np.cumsum(t_BxN, axis=1) + 0.5)
  ends[:, -1] = total_B
  out = np.diff(ends, axis=1, prepend=0.0).astype(np.int64)
  return np.clip(out, 0, cap_BxN)


def _block_sequence(table_NxKxR: np.ndarray):
  """Each problem's blocks (devices i and i+1 of its k-th replicated expert) in (k, i) order, padded:
  (g1 int [N, P], g2 int [N, P], blocks int [N]). Problems are independent, so step p can run the p-th
  block of all of them: P Python steps (at most the extra slots of a problem) instead of one per (k, i)."""
  num = table_NxKxR.shape[0]
  first_NxX, second_NxX = table_NxKxR[:, :, :-1].reshape(num, -1), table_NxKxR[:, :, 1:].reshape(num, -1)
  row, col = np.nonzero(second_NxX >= 0)
  blocks_N = np.bincount(row, minlength=num)
  position = np.arange(row.size) - np.repeat(np.cumsum(blocks_N) - blocks_N, blocks_N)
  g1_NxP = np.zeros((num, int(blocks_N.max(initial=0))), np.int64)
  g2_NxP = np.zeros_like(g1_NxP)
  g1_NxP[row, position], g2_NxP[row, position] = first_NxX[row, col], second_NxX[row, col]
  return g1_NxP, g2_NxP, blocks_N


def _balance_rows(table_NxKxR: np.ndarray, pairs_BxGxD: np.ndarray, p_BxDxD: np.ndarray, rows_N: np.ndarray,
                  num_slots: int, sweeps: int) -> None:
  """Block coordinate descent (module docstring) on problems rows_N of pairs_BxGxD and their pair
  counts p_BxDxD (pair_counts of pairs_BxGxD), both in place."""
  _, num_slots_total, num_devices = pairs_BxGxD.shape
  # Rows of D sources, by flat index: np.take and one index beat fancy indexing with two.
  pairs_RxD, p_RxD = pairs_BxGxD.reshape(-1, num_devices), p_BxDxD.reshape(-1, num_devices)
  g1_NxP, g2_NxP, blocks_N = _block_sequence(table_NxKxR)
  d1_NxP = rows_N[:, None] * num_devices + g1_NxP // num_slots
  d2_NxP = rows_N[:, None] * num_devices + g2_NxP // num_slots
  g1_NxP += rows_N[:, None] * num_slots_total
  g2_NxP += rows_N[:, None] * num_slots_total
  for _ in range(sweeps):
    for step in range(g1_NxP.shape[1]):
      local = np.nonzero(blocks_N > step)[0]
      g1, g2, d1, d2 = g1_NxP[local, step], g2_NxP[local, step], d1_NxP[local, step], d2_NxP[local, step]
      y1, y2 = np.take(pairs_RxD, g1, axis=0), np.take(pairs_RxD, g2, axis=0)
      cap = y1 + y2
      others1, others2 = np.take(p_RxD, d1, axis=0) - y1, np.take(p_RxD, d2, axis=0) - y2
      # Minimizes (others1 + t)^2 + (others2 + cap - t)^2 summed over sources, with sum(t) fixed.
      total = y1.sum(1)
      t = _clip_fill((others2 + cap - others1) / 2.0, cap.astype(np.float64), total.astype(np.float64))
      new1 = _round_keeping_sum(t, cap, total)
      pairs_RxD[g1], pairs_RxD[g2] = new1, cap - new1
      p_RxD[d1], p_RxD[d2] = others1 + new1, others2 + cap - new1


def balance_pairs(table_BxKxR: np.ndarray, pairs_BxGxD: np.ndarray, num_slots: int, sweeps: int,
                  near_max: float = NEAR_MAX, p_BxDxD: np.ndarray | None = None, stop=None,
                  num_layers: int | None = None) -> np.ndarray:
  """pairs_BxGxD, updated in place: the same slot totals and per-source expert totals, a flatter P[d, s].

  table_BxKxR: the slots of each replicated expert, one per device, -1 padded (`split.replica_table`);
  num_slots: S per device. No slot's total changes, so device loads stay as planned (up to a pair the
  rounding's clip to [0, cap] can move between an expert's two slots).
  num_layers: the problems are micro-step-major (b = m * num_layers + l); None: all one micro-step.
  Only each micro-step's max of P sets its all_to_all capacity, so only the problems that could hold it
  are balanced, per micro-step: those within `near_max` of their micro-step's max, then any left above
  their micro-step's balanced ones' new max (problems are independent, so no micro-step's max is ever
  above that of balancing all; near_max=0 balances all). Of the first, those within `near_max` of the
  step's max go in a round of their own: the largest capacities are the likeliest to make `stop` give up.
  p_BxDxD: their pair_counts, if the caller has them; kept up to date in place.
  stop: called after each round with bool [B], the problems balanced so far (final from then on);
  True ends the balancing there, unfinished.
  """
  if sweeps < 1 or table_BxKxR.shape[1] == 0:
    return pairs_BxGxD
  if p_BxDxD is None:
    p_BxDxD = pair_counts(pairs_BxGxD, pairs_BxGxD.shape[1] // num_slots)
  need_B = p_BxDxD.max((1, 2))
  done_B = np.zeros(need_B.shape, bool)
  # Views by micro-step: they follow need_B and done_B.
  need_MxL, done_MxL = (a.reshape(-1, num_layers or a.size) for a in (need_B, done_B))
  near_B = (need_MxL >= near_max * need_MxL.max(1, keepdims=True)).ravel()
  todo_B = need_B >= near_max * need_B.max()  # near the step's max: a subset of near_B
  while todo_B.any():
    rows = np.nonzero(todo_B)[0]
    _balance_rows(table_BxKxR[rows], pairs_BxGxD, p_BxDxD, rows, num_slots, sweeps)
    need_B[rows] = p_BxDxD[rows].max((1, 2))
    done_B |= todo_B
    if stop is not None and stop(done_B):
      break
    todo_B = near_B & ~done_B
    if not todo_B.any():  # each micro-step's max is done: the rest only above its done ones' max
      todo_B = (~done_MxL & (need_MxL > np.where(done_MxL, need_MxL, -1).max(1, keepdims=True))).ravel()
  return pairs_BxGxD
