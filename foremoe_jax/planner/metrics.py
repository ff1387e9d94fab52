"""Plan quality metrics for benchmarks and logs: balance, transfers, all-to-all traffic, estimated time."""

from __future__ import annotations

import numpy as np

from foremoe_jax.planner.plan import Plan
from foremoe_jax.planner.slots import home_placement
from foremoe_jax.planner.tenures import new_tenures


def per_micro_step_imbalance(plan: Plan, counts_MxLxDxE) -> np.ndarray:
  """float [M]: per micro-step, sum over layers of the max device load / sum of the mean device load."""
  load = plan.device_load(counts_MxLxDxE)
  mean = load.mean(-1).sum(-1)
  return np.where(mean > 0, load.max(-1).sum(-1) / np.maximum(mean, 1e-12), 1.0)


def remote_pairs(plan: Plan, counts_MxLxDxE) -> np.ndarray:
  """int [M, L, D_src]: pairs each source sends to slots on other devices (all-to-all traffic)."""
  pairs = plan.slot_pairs(counts_MxLxDxE)
  num_devices = plan.config.num_devices
  device_G = np.arange(plan.config.num_slots) // plan.config.slots_per_device
  remote = device_G[None, :] != np.arange(num_devices)[:, None]
  return (pairs * remote).sum(-1)


def slots_changed_between_micro_steps(plan: Plan) -> np.ndarray:
  """int [M-1, L]: slots whose expert differs from the previous micro-step's (transfers not skippable)."""
  return (plan.slot_expert[1:] != plan.slot_expert[:-1]).sum((2, 3))


def base_slots_off_home(plan: Plan) -> np.ndarray:
  """int [L]: base slots holding another expert than the home layout (moved once per step)."""
  cfg = plan.config
  home = home_placement(cfg.num_experts, cfg.num_devices, cfg.slots_per_device)
  return (plan.base != home[None]).sum((1, 2))


def estimated_step_s(plan: Plan, counts_MxLxDxE) -> float:
  """Cost-model time of the step's expert layers: per (m, l) the slowest device, exposed transfers and
  dispatch (the most-sending source), plus the once-per-step home -> base moves (largest per device)."""
  cost = plan.config.cost
  load = plan.device_load(counts_MxLxDxE)
  short, long = new_tenures(plan.slot_expert, plan.base)
  per_layer = cost.layer_s(load.max(-1), short, long, remote_pairs(plan, counts_MxLxDxE).max(-1))
  cfg = plan.config
  home = home_placement(cfg.num_experts, cfg.num_devices, cfg.slots_per_device)
  base_moves = (plan.base != home[None]).sum(-1).max(-1)
  return float(per_layer.sum() + base_moves.sum() * cost.base_move_s)


def summary(plan: Plan, counts_MxLxDxE) -> dict:
  """The benchmark table's columns for one plan."""
  counts = np.asarray(counts_MxLxDxE)
  moved = plan.moved_mask()
  remote = remote_pairs(plan, counts)
  changed = slots_changed_between_micro_steps(plan)
  return {
      "imbalance": plan.imbalance(counts),
      "base_off_home": float(base_slots_off_home(plan).mean()),
      "off_base": float(moved.sum((2, 3)).mean()),
      "off_base_max_per_device": int(moved.sum(-1).max()),
      "changed": float(changed.mean()) if changed.size else 0.0,
      "changed_per_device": float(changed.mean()) / plan.config.num_devices if changed.size else 0.0,
      "host_path": float(plan.host_path.sum((2, 3)).mean()) if plan.host_path is not None else 0.0,
      "remote_fraction": float(remote.sum() / max(counts.sum(), 1)),
      "a2a_mb_per_ml": float(remote.sum(-1).mean() * plan.config.cost.a2a_s_per_token
                             * plan.config.cost.a2a_bytes_per_s / 1e6),
      "est_ms_per_step": 1e3 * estimated_step_s(plan, counts),
  }
