"""EPLB-equivalent placement (DeepSeek's policy, re-implemented from its description), batched over B.

Global mode (one group, one node):
1. Replication: every expert gets one slot; each extra slot goes, one at a time, to the expert with the
   highest load per copy.
2. Balanced packing: copies, heaviest (load / copies) first, go to the least-loaded device that still has
   a free slot, so every device gets exactly S slots.
Hierarchical mode (expert groups, nodes): groups are first packed onto nodes the same way, then each
node replicates and packs its own experts onto its devices. Copies of one expert may share a device.
Physical copies are ordered as in EPLB (every expert once, then the extra copies in the order given), so
ties resolve the same way.
"""

from __future__ import annotations

import numpy as np


def replicate(w_BxE: np.ndarray, num_slots: int):
  """Gives num_slots - E extra slots, one at a time, to the expert with the greatest load per copy.

  Returns (copies int64 [B, E], extra_expert int64 [B, num_slots - E]: the expert of each extra copy).
  """
  batch, num_experts = w_BxE.shape
  copies_BxE = np.ones((batch, num_experts), np.int64)
  extra_BxX = np.empty((batch, num_slots - num_experts), np.int64)
  rows = np.arange(batch)
  for i in range(num_slots - num_experts):
    extra_BxX[:, i] = np.argmax(w_BxE / copies_BxE, axis=1)
    copies_BxE[rows, extra_BxX[:, i]] += 1
  return copies_BxE, extra_BxX


def balanced_packing(item_w_BxN: np.ndarray, num_packs: int, per_pack: int):
  """Heaviest item first into the least-loaded pack with room (ties: earlier item, lowest pack index).

  Returns (pack_BxN, position_BxN): each item's pack and its position inside the pack.
  """
  batch, num_items = item_w_BxN.shape
  if num_items != num_packs * per_pack:
    raise ValueError(f"{num_items} items do not fill {num_packs} packs of {per_pack}")
  if per_pack == 1:  # as EPLB: item i is pack i
    return np.broadcast_to(np.arange(num_items), (batch, num_items)).copy(), np.zeros((batch, num_items), np.int64)
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


def eplb_placement(w_BxE: np.ndarray, num_devices: int, slots_per_device: int, num_groups: int = 1,
                   num_nodes: int = 1) -> np.ndarray:
  """int32 [B, D, S]: EPLB's placement of experts with loads w (devices node-major).

  Hierarchical when the E experts form num_groups groups that divide evenly over num_nodes nodes (each
  node owning D / num_nodes devices); otherwise global, as EPLB falls back.
  """
  batch, num_experts = w_BxE.shape
  if num_groups % num_nodes or num_experts % num_groups or num_devices % num_nodes:
    num_groups = num_nodes = 1
  group_size = num_experts // num_groups
  # 1. Groups onto nodes; relabel experts node-major ("meta-logical" order).
  group_pack, group_position = balanced_packing(w_BxE.reshape(batch, num_groups, group_size).sum(-1), num_nodes,
                                                num_groups // num_nodes)
  expert_E = np.arange(num_experts)
  meta_of_expert = ((group_pack * (num_groups // num_nodes) + group_position)[:, expert_E // group_size] * group_size
                    + expert_E % group_size)
  expert_of_meta = np.argsort(meta_of_expert, axis=1)
  # 2. Replicate inside each node; physical copies are every expert once, then the extras.
  per_node = num_experts // num_nodes
  w_node = np.take_along_axis(w_BxE, expert_of_meta, axis=1).reshape(batch * num_nodes, per_node)
  copies, extra = replicate(w_node, num_devices * slots_per_device // num_nodes)
  copy_meta = np.concatenate([np.broadcast_to(np.arange(per_node), (w_node.shape[0], per_node)), extra], axis=1)
  copy_w = np.take_along_axis(w_node / copies, copy_meta, axis=1)
  # 3. Copies onto the node's devices.
  pack, position = balanced_packing(copy_w, num_devices // num_nodes, slots_per_device)
  meta = np.empty((w_node.shape[0], num_devices // num_nodes, slots_per_device), np.int64)
  rows = np.broadcast_to(np.arange(w_node.shape[0])[:, None], pack.shape)
  meta[rows, pack, position] = copy_meta
  meta = meta.reshape(batch, num_nodes, -1) + (np.arange(num_nodes) * per_node)[None, :, None]
  placement = np.take_along_axis(expert_of_meta, meta.reshape(batch, -1), axis=1)
  return placement.reshape(batch, num_devices, slots_per_device).astype(np.int32)
