"""Relabel devices and slots of a placement to overlap a reference placement (fewer weight transfers).

Device loads do not depend on which physical device gets which pack of experts, nor on slot order inside
a device, so any placement can be permuted to keep as many experts as possible where the reference
(home for a base, the base for a micro-step) already has them.
"""

from __future__ import annotations

import numpy as np

from foremoe_jax.planner import slots


def overlap_counts(placement_BxDxS: np.ndarray, reference_BxDxS: np.ndarray, num_experts: int) -> np.ndarray:
  """float64 [B, D, D]: experts device i of the placement and device j of the reference both hold.

  A gather-sum over each device's distinct experts (D*S*D per problem) rather than a matmul of holds
  indicators (D*E*D): it is cheaper, and stays off BLAS, whose threads crowd a planner that runs beside
  the trainer (on a GPU host they slowed planning several times: BENCHMARKS.md, numbers behind choices).
  """
  batch, num_devices, _ = placement_BxDxS.shape
  rows = np.arange(batch)[:, None, None]
  ref_holds_BxExD = np.zeros((batch, num_experts + 1, num_devices), np.uint8)
  ref_holds_BxExD[rows, reference_BxDxS, np.arange(num_devices)[None, :, None]] = 1  # -1: the spare row
  ref_holds_BxExD[:, num_experts] = 0
  # Each expert once per device: repeats (and empty slots) go to the spare row.
  experts = np.where(slots.device_first_mask(placement_BxDxS), placement_BxDxS, -1)
  return ref_holds_BxExD[rows, experts].sum(2, dtype=np.float64)


def match_devices(placement_BxDxS: np.ndarray, reference_BxDxS: np.ndarray, num_experts: int,
                  num_nodes: int = 1) -> np.ndarray:
  """int [B, D]: source device for each reference device, by greedy max-overlap matching.

  Devices only match inside their node (devices are node-major), so a hierarchical placement keeps
  its groups on their nodes.
  """
  batch, num_devices, _ = placement_BxDxS.shape
  overlap = overlap_counts(placement_BxDxS, reference_BxDxS, num_experts)
  node_D = np.arange(num_devices) // (num_devices // num_nodes)
  overlap[:, node_D[:, None] != node_D[None, :]] = -0.5  # below any same-node pair, above a used one (-1)
  source_BxD = np.empty((batch, num_devices), np.int64)
  rows = np.arange(batch)
  for _ in range(num_devices):
    best = np.argmax(overlap.reshape(batch, -1), axis=1)
    source, target = np.divmod(best, num_devices)
    source_BxD[rows, target] = source
    overlap[rows, source, :] = -1.0
    overlap[rows, :, target] = -1.0
  return source_BxD


def align_placement(placement_BxDxS: np.ndarray, reference_BxDxS: np.ndarray, num_experts: int,
                    num_nodes: int = 1) -> np.ndarray:
  """int32 [B, D, S]: placement relabeled so that most experts sit in the reference's device and slot."""
  placement_BxDxS = np.asarray(placement_BxDxS)
  reference_BxDxS = np.broadcast_to(reference_BxDxS, placement_BxDxS.shape)
  source_BxD = match_devices(placement_BxDxS, reference_BxDxS, num_experts, num_nodes)
  moved = np.take_along_axis(placement_BxDxS, source_BxD[:, :, None], axis=1)
  num_slots = moved.shape[-1]
  aligned = align_slots(moved.reshape(-1, num_slots), reference_BxDxS.reshape(-1, num_slots))
  return aligned.reshape(moved.shape).astype(np.int32)


def _occurrence(row_RxS: np.ndarray) -> np.ndarray:
  """int [R, S]: how many earlier slots of its row hold the same value."""
  order, start = slots.expert_segments(row_RxS)
  rank = np.empty_like(order)
  np.put_along_axis(rank, order, np.arange(row_RxS.shape[1]) - start, axis=1)
  return rank


def align_slots(moved_RxS: np.ndarray, reference_RxS: np.ndarray) -> np.ndarray:
  """[R, S]: each row's experts reordered so that an expert the reference row holds sits in the
  reference's slot (its n-th copy in the reference's n-th slot of it), the others filling the remaining
  slots in their original order. A loop over slots for few slots, sorts beyond (each the faster one on its
  side on one core, where D is small: BENCHMARKS.md, numbers behind choices)."""
  if moved_RxS.shape[1] <= slots.PAIRWISE_MAX_SLOTS:
    return _align_slots_loop(moved_RxS, reference_RxS)
  return _align_slots_sorted(moved_RxS, reference_RxS)


def _align_slots_loop(moved_RxS: np.ndarray, reference_RxS: np.ndarray) -> np.ndarray:
  aligned = np.full_like(moved_RxS, -1)
  taken = np.zeros(moved_RxS.shape, bool)
  placed = np.zeros(moved_RxS.shape, bool)
  # Experts the reference holds on this device go to the reference's slot...
  for j in range(moved_RxS.shape[1]):
    want = reference_RxS[:, j:j + 1]
    candidates = (moved_RxS == want) & (want >= 0) & ~taken
    k = np.argmax(candidates, axis=-1)[:, None]
    found = candidates.any(-1, keepdims=True)
    aligned[:, j:j + 1] = np.where(found, np.take_along_axis(moved_RxS, k, axis=-1), -1)
    np.put_along_axis(taken, k, np.take_along_axis(taken, k, axis=-1) | found, axis=-1)
    placed[:, j] = found[:, 0]
  # ...and the others fill the remaining slots in their original order.
  for j in range(moved_RxS.shape[1]):
    k = np.argmax(~taken, axis=-1)[:, None]
    fill = ~placed[:, j:j + 1] & np.take_along_axis(~taken, k, axis=-1)
    aligned[:, j:j + 1] = np.where(fill, np.take_along_axis(moved_RxS, k, axis=-1), aligned[:, j:j + 1])
    np.put_along_axis(taken, k, np.take_along_axis(taken, k, axis=-1) | fill, axis=-1)
  return aligned


def _align_slots_sorted(moved_RxS: np.ndarray, reference_RxS: np.ndarray) -> np.ndarray:
  """align_slots by (row, expert, occurrence) keys: an n-th copy in the reference finds the n-th copy
  in the row by one search; the i-th free slot takes the i-th expert left over."""
  num_rows, num_slots = moved_RxS.shape
  # (row, expert, occurrence) as one key per slot; empty slots (-1) never match.
  span = (max(int(moved_RxS.max(initial=0)), int(reference_RxS.max(initial=0))) + 2) * num_slots
  row_base = np.arange(num_rows, dtype=np.int64)[:, None] * span
  moved_key = row_base + (moved_RxS + 1).astype(np.int64) * num_slots + _occurrence(moved_RxS)
  ref_key = row_base + (reference_RxS + 1).astype(np.int64) * num_slots + _occurrence(reference_RxS)
  order = np.argsort(moved_key, axis=None)
  at = np.minimum(np.searchsorted(moved_key.ravel()[order], ref_key.ravel()), moved_key.size - 1)
  source_flat = order[at]
  placed_RxS = ((moved_key.ravel()[source_flat] == ref_key.ravel()) & (reference_RxS.ravel() >= 0)).reshape(
      num_rows, num_slots)
  aligned = np.where(placed_RxS, reference_RxS, -1)
  taken = np.zeros(num_rows * num_slots, bool)
  taken[source_flat[placed_RxS.ravel()]] = True
  taken_RxS = taken.reshape(num_rows, num_slots)
  # Equal counts: the i-th free slot (in slot order) takes the i-th expert left over (in slot order).
  free_slots = np.argsort(placed_RxS, axis=1, kind="stable")
  left_over = np.argsort(taken_RxS, axis=1, kind="stable")
  free_count = (~placed_RxS).sum(1, keepdims=True)
  fill = np.arange(num_slots)[None, :] < free_count
  rows = np.broadcast_to(np.arange(num_rows)[:, None], fill.shape)
  aligned[rows[fill], free_slots[fill]] = moved_RxS[rows[fill], left_over[fill]]
  return aligned

