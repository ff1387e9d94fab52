"""Relabel devices and slots of a placement to overlap a reference placement (fewer weight transfers).

Device loads do not depend on which physical device gets which pack of experts, nor on slot order inside
a device, so any placement can be permuted to keep as many experts as possible where the reference
(home for a base, the base for a micro-step) already has them.
"""

from __future__ import annotations

import numpy as np


def overlap_counts(placement_BxDxS: np.ndarray, reference_BxDxS: np.ndarray, num_experts: int) -> np.ndarray:
  """float64 [B, D, D]: experts device i of the placement and device j of the reference both hold.

  A gather-sum over each device's distinct experts (D*S*D per problem) rather than a matmul of holds
  indicators (D*E*D): it is cheaper, and stays off BLAS, whose threads crowd a planner that runs beside
  the trainer (2-3x slower planning with 32 OpenBLAS threads on a GPU host, BENCHMARKS.md).
  """
  batch, num_devices, _ = placement_BxDxS.shape
  rows = np.arange(batch)[:, None, None]
  ref_holds_BxExD = np.zeros((batch, num_experts + 1, num_devices), np.uint8)
  ref_holds_BxExD[rows, reference_BxDxS, np.arange(num_devices)[None, :, None]] = 1  # -1: the spare row
  ref_holds_BxExD[:, num_experts] = 0
  # Each expert once per device: sorted slots, repeats sent to the spare row.
  experts = np.sort(placement_BxDxS, axis=-1)
  experts[..., 1:][experts[..., 1:] == experts[..., :-1]] = -1
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
  aligned = np.full_like(moved, -1)
  taken = np.zeros(moved.shape, bool)
  placed = np.zeros(moved.shape, bool)
  # Experts the reference holds on this device go to the reference's slot...
  for j in range(num_slots):
    want = reference_BxDxS[..., j:j + 1]
    candidates = (moved == want) & (want >= 0) & ~taken
    k = np.argmax(candidates, axis=-1)[..., None]
    found = candidates.any(-1, keepdims=True)
    aligned[..., j:j + 1] = np.where(found, np.take_along_axis(moved, k, axis=-1), -1)
    np.put_along_axis(taken, k, np.take_along_axis(taken, k, axis=-1) | found, axis=-1)
    placed[..., j] = found[..., 0]
  # ...and the others fill the remaining slots in their original order.
  for j in range(num_slots):
    k = np.argmax(~taken, axis=-1)[..., None]
    fill = ~placed[..., j:j + 1] & np.take_along_axis(~taken, k, axis=-1)
    aligned[..., j:j + 1] = np.where(fill, np.take_along_axis(moved, k, axis=-1), aligned[..., j:j + 1])
    np.put_along_axis(taken, k, np.take_along_axis(taken, k, axis=-1) | fill, axis=-1)
  return aligned.astype(np.int32)
