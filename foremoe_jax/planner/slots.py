"""The expert layout (its one check and the home placement), slot bookkeeping shared by all policies,
and the dispatcher's rounding rule.

Batched over B independent (micro-step, layer) problems. Shapes: D devices, S slots per device,
G = D*S global slots (g = d*S + j), E experts. `slot_expert_BxG` holds -1 for an empty slot.
"""

from __future__ import annotations

import numpy as np


def check_layout(num_experts: int, num_devices: int, slots_per_device: int | None = None,
                 top_k: int | None = None) -> int:
  """S (`slots_per_device`, default E/D) for E experts over D expert-parallel devices, or a ValueError
  naming the broken rule: E divisible by D (the home layout), S*D >= E (every expert a slot),
  1 <= top_k <= E. The one check the model, the MoE layer, the planner and the tables share."""
  if num_experts % num_devices:
    raise ValueError(f"num_experts={num_experts} is not divisible by the expert axis size D={num_devices}")
  slots = slots_per_device or num_experts // num_devices
  if slots * num_devices < num_experts:
    raise ValueError(f"slots_per_device={slots} x D={num_devices} < num_experts={num_experts}: "
                     "some expert would have no slot")
  if top_k is not None and not 1 <= top_k <= num_experts:
    raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
  return slots


def home_placement(num_experts: int, num_devices: int, slots_per_device: int) -> np.ndarray:
  """int32 [D, S]: expert e on device e // (E/D), slot e % (E/D); redundant slots empty (-1)."""
  check_layout(num_experts, num_devices, slots_per_device)
  per_device = num_experts // num_devices
  slot_expert_DxS = np.full((num_devices, slots_per_device), -1, np.int32)
  slot_expert_DxS[:, :per_device] = np.arange(num_experts, dtype=np.int32).reshape(num_devices, per_device)
  return slot_expert_DxS


def copies_per_expert(slot_expert_BxG: np.ndarray, num_experts: int) -> np.ndarray:
  """int64 [B, E]: how many slots hold each expert."""
  batch = slot_expert_BxG.shape[0]
  held = slot_expert_BxG >= 0
  flat = (np.arange(batch)[:, None] * num_experts + slot_expert_BxG)[held]
  return np.bincount(flat, minlength=batch * num_experts).reshape(batch, num_experts)


def stable_argsort(keys_BxN: np.ndarray) -> np.ndarray:
  """argsort(axis=1, kind="stable") of integer keys; keys that fit int16 are sorted as int16, which numpy
  radix-sorts (several times faster than its merge sort on wider integers; a stable order is unique)."""
  if keys_BxN.size and keys_BxN.min() >= -2**15 and keys_BxN.max() < 2**15:
    keys_BxN = keys_BxN.astype(np.int16)
  return np.argsort(keys_BxN, axis=1, kind="stable")


# device_first_mask: pairwise comparisons up to this many slots per device, a sort beyond: each is the
# faster one on its side on one core (BENCHMARKS.md, numbers behind choices).
PAIRWISE_MAX_SLOTS = 16


def first_copy_mask(slot_expert_BxG: np.ndarray, order_G: np.ndarray | None = None) -> np.ndarray:
  """bool [B, G]: the first slot holding each expert when slots are visited in `order_G` (default g)."""
  order_G = np.arange(slot_expert_BxG.shape[1]) if order_G is None else order_G
  visited_BxG = slot_expert_BxG[:, order_G]
  by_expert = stable_argsort(visited_BxG)
  sorted_BxG = np.take_along_axis(visited_BxG, by_expert, axis=1)
  first_sorted = np.ones_like(sorted_BxG, dtype=bool)
  first_sorted[:, 1:] = sorted_BxG[:, 1:] != sorted_BxG[:, :-1]
  first_sorted &= sorted_BxG >= 0
  first_visited = np.empty_like(first_sorted)
  np.put_along_axis(first_visited, by_expert, first_sorted, axis=1)
  first_BxG = np.empty_like(first_visited)
  first_BxG[:, order_G] = first_visited
  return first_BxG


def device_first_mask(slot_expert_BxDxS: np.ndarray) -> np.ndarray:
  """bool [B, D, S]: the first slot of each expert on its device (a same-device duplicate adds nothing)."""
  se = slot_expert_BxDxS
  num_slots = se.shape[-1]
  if num_slots > PAIRWISE_MAX_SLOTS:  # S^2 / 2 comparisons would each cost a numpy call
    return first_copy_mask(se.reshape(-1, num_slots)).reshape(se.shape)
  first = se >= 0
  # Pairwise over the few slots of a device: cheaper than a sort per device.
  for j in range(1, num_slots):
    for i in range(j):
      first[..., j] &= se[..., i] != se[..., j]
  return first


def expert_segments(slot_expert_BxG: np.ndarray):
  """Slots grouped by expert, increasing g inside a group (the dispatcher's replica order).

  Returns (order_BxG, start_BxG): order sorts slots by (expert, g), empty slots first; start_BxG[b, i]
  is the sorted position where the group of sorted position i begins.
  """
  order_BxG = stable_argsort(slot_expert_BxG)
  sorted_BxG = np.take_along_axis(slot_expert_BxG, order_BxG, axis=1)
  positions = np.broadcast_to(np.arange(sorted_BxG.shape[1]), sorted_BxG.shape)
  begins = np.ones_like(sorted_BxG, dtype=bool)
  begins[:, 1:] = sorted_BxG[:, 1:] != sorted_BxG[:, :-1]
  start_BxG = np.maximum.accumulate(np.where(begins, positions, 0), axis=1)
  return order_BxG, start_BxG


def segmented_exclusive_cumsum(values_BxG: np.ndarray, slot_expert_BxG: np.ndarray) -> np.ndarray:
  """[B, G]: for each slot, the sum of `values` over the earlier slots (smaller g) holding its expert."""
  order_BxG, start_BxG = expert_segments(slot_expert_BxG)
  sorted_vals = np.take_along_axis(values_BxG, order_BxG, axis=1)
  exclusive = np.cumsum(sorted_vals, axis=1) - sorted_vals
  within = exclusive - np.take_along_axis(exclusive, start_BxG, axis=1)
  out = np.empty_like(within)
  np.put_along_axis(out, order_BxG, within, axis=1)
  return out


def pairs_per_slot_source(slot_expert_BxG: np.ndarray, counts_BxDxE: np.ndarray) -> np.ndarray:
  """[B, G, D_src]: counts[b, s, slot_expert[b, g]], 0 on empty slots (source last: contiguous gathers)."""
  counts_BxExD = np.ascontiguousarray(np.swapaxes(counts_BxDxE, 1, 2))
  n_BxGxD = counts_BxExD[np.arange(counts_BxExD.shape[0])[:, None], np.maximum(slot_expert_BxG, 0)]
  n_BxGxD[slot_expert_BxG < 0] = 0
  return n_BxGxD


def slot_token_counts(slot_expert_DxS, slot_share_DxG, counts_DxE) -> np.ndarray:
  """int64 [..., D_src, G]: the pairs each source sends to each global slot, exactly as the dispatcher does.

  For source s and expert e with n pairs, the replicas of e (ordered by g) get consecutive ranges with
  integer boundaries rint(cumsum(share) * n) (half to even, like jnp.round); the last ends at n.
  Leading batch dimensions are allowed on all three arguments.
  """
  slot_expert = np.asarray(slot_expert_DxS)
  share = np.asarray(slot_share_DxG, dtype=np.float64)
  counts = np.asarray(counts_DxE)
  lead = slot_expert.shape[:-2]
  num_src, num_slots = share.shape[-2:]
  se_BxG = slot_expert.reshape(-1, num_slots)
  share_BxDxG = share.reshape(-1, num_src, num_slots)
  n_BxDxG = np.swapaxes(pairs_per_slot_source(se_BxG, counts.reshape(-1, num_src, counts.shape[-1])), 1, 2)

  order_BxG, start_BxG = expert_segments(se_BxG)
  batch = se_BxG.shape[0]
  order3 = np.broadcast_to(order_BxG[:, None, :], (batch, num_src, num_slots))
  start3 = np.broadcast_to(start_BxG[:, None, :], (batch, num_src, num_slots))
  share_sorted = np.take_along_axis(share_BxDxG, order3, axis=2)
  n_sorted = np.take_along_axis(n_BxDxG, order3, axis=2)
  cum = np.cumsum(share_sorted, axis=2)
  before_group = np.take_along_axis(cum - share_sorted, start3, axis=2)
  ends = np.rint((cum - before_group) * n_sorted).astype(np.int64)
  is_last = np.ones((batch, num_slots), bool)
  is_last[:, :-1] = start_BxG[:, 1:] != start_BxG[:, :-1]
  ends = np.where(is_last[:, None, :], n_sorted, np.minimum(ends, n_sorted))
  starts = np.zeros_like(ends)
  starts[:, :, 1:] = ends[:, :, :-1]
  starts = np.where((np.arange(num_slots) == start_BxG)[:, None, :], 0, starts)
  taken_sorted = np.maximum(ends - starts, 0)
  taken = np.empty_like(taken_sorted)
  np.put_along_axis(taken, order3, taken_sorted, axis=2)
  taken = np.where(se_BxG[:, None, :] >= 0, taken, 0)
  return taken.reshape(*lead, num_src, num_slots)
