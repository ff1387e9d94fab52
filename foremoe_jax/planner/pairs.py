"""Pair-aware split: which source sends a replicated expert's pairs to which of its devices.

The padded all_to_all gives every (source, destination) chunk, the self chunk included, one capacity:
the step-wide max pair count. Slot loads (and so device loads) are fixed before this step; what is
left free is the mix of sources behind each replica. Block coordinate descent on the sum of squared
(source, destination) pair counts P[d, s], one block per replicated expert and two of its devices: the
pairs each of the two copies takes stay fixed, the sources' mix between them is re-solved exactly
(a water-filling in one multiplier), then rounded so that every count stays a whole number.
Batched over B (micro-step, layer) problems; Python loops run over replicated experts only.
"""

from __future__ import annotations

import math

import numpy as np

# Bisection steps for a block's multiplier: the bracket shrinks to 2^-10 of the largest count; the
# interpolation between its ends then hits the sum exactly (rounding follows anyway).
BISECTIONS = 10
# First round of balance_pairs: the problems whose max pair count is within this fraction of the max.
NEAR_MAX = 0.7
# Padded capacity buckets per power of two: at most 1/BUCKETS_PER_OCTAVE padding, few compiled shapes.
BUCKETS_PER_OCTAVE = 8


def bucket(n: int) -> int:
  """The padded capacity compiled for a need of n rows per (source, destination): rounded up to 8,
  then to one of BUCKETS_PER_OCTAVE steps per power of two (the executor's rule; the planner prices it)."""
  n = max(8, math.ceil(n / 8) * 8)
  step = max(8, 2 ** (n.bit_length() - 1) // BUCKETS_PER_OCTAVE)
  return math.ceil(n / step) * step


def fixed_pair_max(counts_MxLxDxE: np.ndarray, bases_NxLxDxS: np.ndarray) -> np.ndarray:
  """int64 [N, L]: per base and layer, the largest (source, destination) pair count over the micro-steps
  from the experts the base holds once. No split can move those pairs: the padded capacity is at least this."""
  num_micro, num_layers, num_devices, num_experts = counts_MxLxDxE.shape
  # One batched matmul per base with a one-hot of the owners: float32 sums of whole counts are exact.
  counts_LxRxE = counts_MxLxDxE.transpose(1, 0, 2, 3).reshape(num_layers, -1, num_experts).astype(np.float32)
  rows_LxG = np.arange(num_layers)[:, None]
  out = []
  for base_LxDxS in bases_NxLxDxS:
    slot_expert_LxG = base_LxDxS.reshape(num_layers, -1)
    device_G = np.arange(slot_expert_LxG.shape[1]) // base_LxDxS.shape[2]
    owner_LxExD = np.zeros((num_layers, num_experts + 1, num_devices), np.float32)
    np.add.at(owner_LxExD, (rows_LxG, slot_expert_LxG, device_G), 1.0)  # -1 (empty) lands in row E
    owner_LxExD *= owner_LxExD.sum(-1, keepdims=True) == 1  # replicated experts' pairs can move
    out.append(np.matmul(counts_LxRxE, owner_LxExD[:, :num_experts]).max((1, 2)))
  return np.stack(out).astype(np.int64)


def pair_counts(pairs_BxGxD: np.ndarray, num_devices: int) -> np.ndarray:
  """[B, D_dst, D_src]: pairs each source sends to each device (slots summed)."""
  batch, num_slots, num_src = pairs_BxGxD.shape
  return pairs_BxGxD.reshape(batch, num_devices, num_slots // num_devices, num_src).sum(2)


def _clip_fill(h_BxN: np.ndarray, cap_BxN: np.ndarray, amount_B: np.ndarray) -> np.ndarray:
  """[B, N]: t = clip(h + nu, 0, cap) with the nu per row that makes sum(t) = amount (0 <= amount <= sum(cap)).

  sum(t) is nondecreasing in nu: bisection (cheaper than sorting kinks), then the exact sum by
  interpolating between the bracket's two clipped points (which keeps 0 <= t <= cap).
  """
  amount = amount_B[:, None]
  lo = (-h_BxN).min(1, keepdims=True)
  hi = (cap_BxN - h_BxN).max(1, keepdims=True)
  for _ in range(BISECTIONS):
    mid = 0.5 * (lo + hi)
    below = np.clip(h_BxN + mid, 0.0, cap_BxN).sum(1, keepdims=True) < amount
    lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
  t_lo, t_hi = np.clip(h_BxN + lo, 0.0, cap_BxN), np.clip(h_BxN + hi, 0.0, cap_BxN)
  f_lo, f_hi = t_lo.sum(1, keepdims=True), t_hi.sum(1, keepdims=True)
  weight = np.clip((amount - f_lo) / np.maximum(f_hi - f_lo, 1e-12), 0.0, 1.0)
  return t_lo + weight * (t_hi - t_lo)


def _round_keeping_sum(t_BxN: np.ndarray, cap_BxN: np.ndarray, total_B: np.ndarray) -> np.ndarray:
  """int64 [B, N]: floor or ceil of each t (within [0, cap]), summing to total: rounded running sums."""
  ends = np.floor(np.cumsum(t_BxN, axis=1) + 0.5)
  ends[:, -1] = total_B
  out = np.diff(ends, axis=1, prepend=0.0).astype(np.int64)
  return np.clip(out, 0, cap_BxN)


def _balance_rows(table_BxKxR: np.ndarray, pairs_BxGxD: np.ndarray, num_slots: int, sweeps: int) -> np.ndarray:
  """pairs_BxGxD, updated in place by block coordinate descent over every problem (module docstring)."""
  num_devices = pairs_BxGxD.shape[1] // num_slots
  pairs = pairs_BxGxD
  p_BxDxD = pair_counts(pairs, num_devices)
  for _ in range(sweeps):
    for k in range(table_BxKxR.shape[1]):
      for i in range(table_BxKxR.shape[2] - 1):
        # Only the problems where this expert has an i+1-th device (few, for large i).
        rows = np.nonzero(table_BxKxR[:, k, i + 1] >= 0)[0]
        if rows.size == 0:
          continue
        g1, g2 = table_BxKxR[rows, k, i], table_BxKxR[rows, k, i + 1]
        d1, d2 = g1 // num_slots, g2 // num_slots
        y1, y2 = pairs[rows, g1], pairs[rows, g2]
        cap = y1 + y2
        others1, others2 = p_BxDxD[rows, d1] - y1, p_BxDxD[rows, d2] - y2
        # Minimizes (others1 + t)^2 + (others2 + cap - t)^2 summed over sources, with sum(t) fixed.
        total = y1.sum(1)
        t = _clip_fill((others2 + cap - others1) / 2.0, cap.astype(np.float64), total.astype(np.float64))
        new1 = _round_keeping_sum(t, cap, total)
        pairs[rows, g1], pairs[rows, g2] = new1, cap - new1
        p_BxDxD[rows, d1], p_BxDxD[rows, d2] = others1 + new1, others2 + cap - new1
  return pairs


def balance_pairs(table_BxKxR: np.ndarray, pairs_BxGxD: np.ndarray, num_slots: int, sweeps: int,
                  near_max: float = NEAR_MAX) -> np.ndarray:
  """pairs_BxGxD, updated in place: the same slot totals and per-source expert totals, a flatter P[d, s].

  table_BxKxR: the slots of each replicated expert, one per device, -1 padded (`split.replica_table`);
  num_slots: S per device. No slot's total changes, so device loads stay exactly as planned.
  Only the step-wide max of P sets the all_to_all capacity, so only the problems that could hold it are
  balanced: first those within `near_max` of the max, then any left above the balanced ones' new max
  (problems are independent, so the step-wide max is never above that of balancing all; near_max=0
  balances all).
  """
  if sweeps < 1 or table_BxKxR.shape[1] == 0:
    return pairs_BxGxD
  num_devices = pairs_BxGxD.shape[1] // num_slots
  pairs = pairs_BxGxD
  need_B = pair_counts(pairs, num_devices).max((1, 2))
  done_B = np.zeros(need_B.shape, bool)
  todo_B = need_B >= near_max * need_B.max()
  while todo_B.any():
    rows = np.nonzero(todo_B)[0]
    pairs[rows] = _balance_rows(table_BxKxR[rows], pairs[rows], num_slots, sweeps)
    need_B[rows] = pair_counts(pairs[rows], num_devices).max((1, 2))
    done_B |= todo_B
    todo_B = ~done_B & (need_B > need_B[done_B].max())
  return pairs
