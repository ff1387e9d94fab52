"""The Plan: per-(micro-step, layer) placements and token splits of one optimizer step, and its checks."""

from __future__ import annotations

import dataclasses

import numpy as np

from foremoe_jax.planner import slots
from foremoe_jax.planner.config import PlanConfig

SHARE_TOLERANCE = 1e-4


@dataclasses.dataclass(frozen=True)
class Plan:
  """slot_expert int32 [M, L, D, S] (-1 = empty); slot_share float32 [M, L, D_src, G]; base int32 [L, D, S].

  slot_share[m, l, s, g] is the fraction of source s's pairs for expert slot_expert[m, l, g] that go to
  global slot g = d*S + j. `base` is the step-level placement that the transfer moves home -> base once
  per step; each micro-step's placement differs from it only in the slots listed by `moves`.
  """

  slot_expert: np.ndarray
  slot_share: np.ndarray
  base: np.ndarray
  policy: str
  config: PlanConfig
  # From the planner's integer split (None where a plan is built otherwise): pairs per slot, int64
  # [M, L, G], and per (m, l) the largest (source, destination) pair count, int64 [M, L]: what the
  # padded all_to_all must hold.
  slot_load: np.ndarray | None = None
  pair_need: np.ndarray | None = None
  # bool [M, L, D, S]: the slots starting a tenure whose replica comes over the host path (from the
  # pinned-host copy, `foremoe_jax.host_transfer`); the other refills over the link. None: all over the link.
  host_path: np.ndarray | None = None

  @property
  def num_micro_steps(self) -> int:
    return self.slot_expert.shape[0]

  def slot_pairs(self, counts_MxLxDxE) -> np.ndarray:
    """int64 [M, L, D_src, G]: pairs each source sends to each slot, by the dispatcher's rounding rule."""
    return slots.slot_token_counts(self.slot_expert, self.slot_share, np.asarray(counts_MxLxDxE))

  def device_load(self, counts_MxLxDxE) -> np.ndarray:
    """float64 [M, L, D]: pairs each device computes."""
    per_slot = self.slot_pairs(counts_MxLxDxE).sum(-2)
    cfg = self.config
    return per_slot.reshape(*per_slot.shape[:2], cfg.num_devices, cfg.slots_per_device).sum(-1).astype(np.float64)

  def imbalance(self, counts_MxLxDxE) -> float:
    """Sum over (m, l) of the max device load / sum over (m, l) of the mean device load (1.0 = perfect)."""
    load = self.device_load(counts_MxLxDxE)
    mean = load.mean(-1).sum()
    return float(load.max(-1).sum() / mean) if mean > 0 else 1.0

  def moved_mask(self) -> np.ndarray:
    """bool [M, L, D, S]: slots whose expert differs from the base (a transfer in that micro-step)."""
    return self.slot_expert != self.base[None]

  def moves(self, m: int) -> np.ndarray:
    """int64 [K, 5] for micro-step m: rows (layer, device, slot, expert, source global slot in base).

    The transfer fills slot (device, slot) with `expert`, copied from `source`, the base slot holding
    that expert (its first copy; every expert a micro-step uses is in the base). An empty target
    (expert -1) just drops its weights; its source is -1.
    """
    layer, device, slot = np.nonzero(self.moved_mask()[m])
    expert = self.slot_expert[m, layer, device, slot].astype(np.int64)
    base_G = self.base.reshape(self.base.shape[0], -1)
    first_L = np.where(slots.first_copy_mask(base_G), base_G, -2)
    match = first_L[layer] == expert[:, None]
    source = np.where(expert >= 0, np.argmax(match, axis=1), -1)
    return np.stack([layer, device, slot, expert, source], axis=1).astype(np.int64)

  def validate(self) -> None:
    """Raises ValueError naming the first broken invariant."""
    cfg = self.config
    num_micro = self.slot_expert.shape[0] if self.slot_expert.ndim == 4 else -1
    num_layers = self.base.shape[0] if self.base.ndim == 3 else -1
    shape_se = (num_micro, num_layers, cfg.num_devices, cfg.slots_per_device)
    expect = {
        "slot_expert": (self.slot_expert, shape_se, np.int32),
        "slot_share": (self.slot_share, (num_micro, num_layers, cfg.num_devices, cfg.num_slots), np.float32),
        "base": (self.base, (num_layers, cfg.num_devices, cfg.slots_per_device), np.int32),
    }
    for name, (array, shape, dtype) in expect.items():
      if not isinstance(array, np.ndarray) or array.dtype != dtype:
        raise ValueError(f"Plan.{name} must be a numpy {np.dtype(dtype).name} array, got "
                         f"{getattr(array, 'dtype', type(array))}")
      if array.shape != shape or min(shape) < 1:
        raise ValueError(f"Plan.{name} has shape {array.shape}, expected {shape}")
    for name, placement in (("slot_expert", self.slot_expert), ("base", self.base)):
      _check_placement(name, placement.reshape(-1, cfg.num_slots), cfg.num_experts)
    if self.host_path is not None:
      if not isinstance(self.host_path, np.ndarray) or self.host_path.dtype != bool or \
          self.host_path.shape != shape_se:
        raise ValueError(f"Plan.host_path must be a numpy bool array of shape {shape_se}, got "
                         f"{getattr(self.host_path, 'dtype', type(self.host_path))} {np.shape(self.host_path)}")
      if (self.host_path & ~(self.moved_mask() & (self.slot_expert >= 0))).any():
        raise ValueError("Plan.host_path marks a slot that is not refilled with an expert in its micro-step")
    _check_shares(self.slot_expert.reshape(-1, cfg.num_slots),
                  self.slot_share.reshape(-1, cfg.num_devices, cfg.num_slots), cfg.num_experts)


def _check_placement(name: str, slot_expert_BxG: np.ndarray, num_experts: int) -> None:
  if slot_expert_BxG.min() < -1 or slot_expert_BxG.max() >= num_experts:
    raise ValueError(f"Plan.{name} holds experts outside [-1, {num_experts})")
  missing = slots.copies_per_expert(slot_expert_BxG, num_experts) == 0
  if missing.any():
    b, e = np.argwhere(missing)[0]
    raise ValueError(f"Plan.{name}: expert {e} has no slot in placement {b} (flattened (m, l) index)")


def _check_shares(slot_expert_BxG: np.ndarray, share_BxDxG: np.ndarray, num_experts: int) -> None:
  if not np.isfinite(share_BxDxG).all() or share_BxDxG.min() < 0:
    raise ValueError("Plan.slot_share must be finite and >= 0")
  if (share_BxDxG * (slot_expert_BxG[:, None, :] < 0)).any():
    raise ValueError("Plan.slot_share is nonzero on an empty slot")
  batch, num_src, num_slots = share_BxDxG.shape
  held = np.broadcast_to(slot_expert_BxG[:, None, :] >= 0, share_BxDxG.shape)
  flat = ((np.arange(batch)[:, None, None] * num_src + np.arange(num_src)[None, :, None]) * num_experts
          + slot_expert_BxG[:, None, :])
  sums = np.bincount(flat[held], weights=share_BxDxG[held].astype(np.float64),
                     minlength=batch * num_src * num_experts).reshape(batch, num_src, num_experts)
  present = slots.copies_per_expert(slot_expert_BxG, num_experts)[:, None, :] > 0
  bad = present & (np.abs(sums - 1.0) > SHARE_TOLERANCE)
  if bad.any():
    b, s, e = np.argwhere(bad)[0]
    raise ValueError(f"Plan.slot_share of source {s} over the copies of expert {e} sums to "
                     f"{sums[b, s, e]:.6f}, not 1 (flattened (m, l) index {b})")
