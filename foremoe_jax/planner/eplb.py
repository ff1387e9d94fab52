"""EPLB-equivalent placement (DeepSeek's global policy), batched over B independent problems.

1. Replication: every expert gets one slot; each extra slot goes, one at a time, to the expert with the
   highest load per copy.
2. Balanced packing: copies, heaviest (load / copies) first, go to the least-loaded device that still has
   a free slot, so every device gets exactly S slots.
Copies of one expert may share a device, as in EPLB. The hierarchical (node, group) mode is not built.
"""

from __future__ import annotations

import numpy as np


def replicate(w_BxE: np.ndarray, num_slots: int) -> np.ndarray:
  """int64 [B, E]: copies per expert after giving num_slots - E extra slots by greatest load per copy."""
  batch, num_experts = w_BxE.shape
  copies_BxE = np.ones((batch, num_experts), np.int64)
  rows = np.arange(batch)
  for _ in range(num_slots - num_experts):
    copies_BxE[rows, np.argmax(w_BxE / copies_BxE, axis=1)] += 1
  return copies_BxE


def balanced_packing(item_w_BxN: np.ndarray, num_packs: int, per_pack: int):
  """Heaviest item first into the least-loaded pack with room (ties: lowest pack index).

  Returns (pack_BxN, position_BxN): each item's pack and its position inside the pack.
  """
  batch, num_items = item_w_BxN.shape
  if num_items != num_packs * per_pack:
    raise ValueError(f"{num_items} items do not fill {num_packs} packs of {per_pack}")
  order_BxN = np.argsort(-item_w_BxN, axis=1, kind="stable")
  load_BxP = np.zeros((batch, num_packs))
  fill_BxP = np.zeros((batch, num_packs), np.int64)
  pack_BxN = np.empty((batch, num_items), np.int64)
  position_BxN = np.empty((batch, num_items), np.int64)
  rows = np.arange(batch)
  for i in range(num_items):
    item = order_BxN[:, i]
    pack = np.argmin(np.where(fill_BxP < per_pack, load_BxP, np.inf), axis=1)
    pack_BxN[rows, item] = pack
    position_BxN[rows, item] = fill_BxP[rows, pack]
    load_BxP[rows, pack] += item_w_BxN[rows, item]
    fill_BxP[rows, pack] += 1
  return pack_BxN, position_BxN


def eplb_placement(w_BxE: np.ndarray, num_devices: int, slots_per_device: int) -> np.ndarray:
  """int32 [B, D, S]: EPLB's placement of experts with loads w (global policy)."""
  batch, num_experts = w_BxE.shape
  num_slots = num_devices * slots_per_device
  copies_BxE = replicate(w_BxE, num_slots)
  copy_expert_BxG = np.repeat(np.tile(np.arange(num_experts), batch), copies_BxE.ravel()).reshape(batch, num_slots)
  copy_w_BxG = np.take_along_axis(w_BxE / copies_BxE, copy_expert_BxG, axis=1)
  pack_BxG, position_BxG = balanced_packing(copy_w_BxG, num_devices, slots_per_device)
  placement = np.empty((batch, num_devices, slots_per_device), np.int32)
  rows = np.broadcast_to(np.arange(batch)[:, None], pack_BxG.shape)
  placement[rows, pack_BxG, position_BxG] = copy_expert_BxG
  return placement
