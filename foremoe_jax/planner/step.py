"""plan_step: one optimizer step's counts -> Plan, for every policy behind one call."""

from __future__ import annotations

import numpy as np

from foremoe_jax.planner import align, eplb, foremoe, slots, split, tenures
from foremoe_jax.planner.config import PlanConfig
from foremoe_jax.planner.plan import Plan


def check_counts(counts, cfg: PlanConfig, name: str = "counts") -> np.ndarray:
  """int64 [M, L, D, E] from any integral, non-negative array of that shape; ValueError otherwise."""
  array = np.asarray(counts)
  if array.ndim != 4:
    raise ValueError(f"{name} must have rank 4 [M, L, D, E], got shape {array.shape}")
  if array.shape[2:] != (cfg.num_devices, cfg.num_experts):
    raise ValueError(f"{name} has shape {array.shape}; its last two axes must be "
                     f"(num_devices={cfg.num_devices}, num_experts={cfg.num_experts})")
  if array.shape[0] < 1 or array.shape[1] < 1:
    raise ValueError(f"{name} needs at least one micro-step and one layer, got shape {array.shape}")
  if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
    raise ValueError(f"{name} must be numeric, got dtype {array.dtype}")
  if np.issubdtype(array.dtype, np.floating) and not (np.isfinite(array).all() and (array == np.round(array)).all()):
    raise ValueError(f"{name} must hold whole numbers of (token, expert) pairs")
  if (array < 0).any():
    raise ValueError(f"{name} has negative entries")
  return array.astype(np.int64, copy=False)


def _plan(counts, placement_MxLxDxS, base_LxDxS, cfg: PlanConfig, slot_pairs_BxG=None) -> Plan:
  """A Plan with exact shares for slot_pairs, or EPLB's even split over copies when it is None."""
  num_micro, num_layers, num_devices, num_slots = placement_MxLxDxS.shape
  batch = num_micro * num_layers
  share, load, need = split.plan_split(np.ascontiguousarray(placement_MxLxDxS).reshape(batch, num_devices, num_slots),
                                      counts.reshape(batch, num_devices, -1), slot_pairs_BxG, cfg.pair_sweeps)
  return _make_plan(placement_MxLxDxS, share, base_LxDxS, cfg, load, need)


def host_path_mask(placement_MxLxDxS: np.ndarray, base_LxDxS: np.ndarray, load_MxLxG: np.ndarray,
                   cfg: PlanConfig) -> np.ndarray:
  """bool [M, L, D, S]: per (m, l) and device, the slots starting a tenure there that the cost model's best
  split (`CostModel.host_moves`) fetches over the host path: the first of its one-micro-step tenures
  and the first of its longer ones, as many of each as the split sends there."""
  num_micro, num_layers, num_devices, num_slots = placement_MxLxDxS.shape
  short, long = tenures.tenure_starts(placement_MxLxDxS, base_LxDxS)
  busiest = load_MxLxG.reshape(num_micro, num_layers, num_devices, num_slots).sum(-1).max(-1)
  compute = busiest[..., None] * cfg.cost.token_compute_s
  host_short, host_long = cfg.cost.host_moves(short.sum(-1), long.sum(-1), compute)
  return ((short & (np.cumsum(short, -1) <= host_short[..., None]))
          | (long & (np.cumsum(long, -1) <= host_long[..., None])))


def _make_plan(placement_MxLxDxS, share_BxDxG, base_LxDxS, cfg: PlanConfig, load_BxG, need_B) -> Plan:
  """The Plan of a split already made (per-(m, l) arrays flattened over B = M*L)."""
  num_micro, num_layers, num_devices = placement_MxLxDxS.shape[:3]
  load = load_BxG.reshape(num_micro, num_layers, -1)
  return Plan(placement_MxLxDxS.astype(np.int32), share_BxDxG.reshape(num_micro, num_layers, num_devices, -1),
              base_LxDxS.astype(np.int32), cfg.policy, cfg, load, need_B.reshape(num_micro, num_layers),
              host_path_mask(placement_MxLxDxS, base_LxDxS, load, cfg))


def _step_placement(w_LxE: np.ndarray, cfg: PlanConfig) -> np.ndarray:
  """EPLB's placement of the summed counts, relabeled to keep experts at home where it can."""
  placement = eplb.eplb_placement(w_LxE.astype(np.float64), cfg.num_devices, cfg.slots_per_device,
                                  cfg.eplb_groups, cfg.eplb_nodes)
  home = slots.home_placement(cfg.num_experts, cfg.num_devices, cfg.slots_per_device)
  return align.align_placement(placement, home, cfg.num_experts, cfg.eplb_nodes)


def plan_step(counts, cfg: PlanConfig, history=None) -> Plan:
  """Plans one optimizer step. counts: int [M, L, D, E]; history: the previous step's counts or None."""
  counts = check_counts(counts, cfg)
  policy = cfg.policy
  if policy == "eplb_history" and history is None:
    policy = "static"
  if cfg.num_devices == 1:  # one device holds every token: any placement is the home layout's load, and
    policy = "static"       # planning it anyway took the GIL from the RL step's dispatch (BENCHMARKS.md, RL step)
  return PLANNERS[policy](counts, cfg, history)


def _repeated(base_LxDxS: np.ndarray, num_micro: int) -> np.ndarray:
  """[M, L, D, S]: one placement per layer for every micro-step."""
  return np.broadcast_to(base_LxDxS, (num_micro, *base_LxDxS.shape))


def _static(counts, cfg: PlanConfig, history) -> Plan:
  """The home layout in every (m, l)."""
  home = slots.home_placement(cfg.num_experts, cfg.num_devices, cfg.slots_per_device)
  home_LxDxS = np.broadcast_to(home, (counts.shape[1], *home.shape))
  return _plan(counts, _repeated(home_LxDxS, counts.shape[0]), home_LxDxS, cfg)


def _eplb_step(counts, cfg: PlanConfig, history) -> Plan:
  """EPLB of the whole step's counts, applied to every micro-step, even split over replicas."""
  base = _step_placement(counts.sum((0, 2)), cfg)
  return _plan(counts, _repeated(base, counts.shape[0]), base, cfg)


def _eplb_history(counts, cfg: PlanConfig, history) -> Plan:
  """EPLB of the previous step's counts (what production systems do)."""
  history = check_counts(history, cfg, "history")
  if history.shape[1] != counts.shape[1]:
    raise ValueError(f"history has {history.shape[1]} layers, counts have {counts.shape[1]}")
  base = _step_placement(history.sum((0, 2)), cfg)
  return _plan(counts, _repeated(base, counts.shape[0]), base, cfg)


def _eplb_microstep(counts, cfg: PlanConfig, history) -> Plan:
  """EPLB re-run on each micro-step, transfers ignored (an oracle), aligned to the step's EPLB placement."""
  num_micro, num_layers = counts.shape[:2]
  base = _step_placement(counts.sum((0, 2)), cfg)
  w_BxE = counts.sum(2).reshape(num_micro * num_layers, -1).astype(np.float64)
  placement = eplb.eplb_placement(w_BxE, cfg.num_devices, cfg.slots_per_device, cfg.eplb_groups, cfg.eplb_nodes)
  placement = align.align_placement(placement, _repeated(base, num_micro).reshape(placement.shape), cfg.num_experts,
                                    cfg.eplb_nodes)
  return _plan(counts, placement.reshape(num_micro, num_layers, cfg.num_devices, -1), base, cfg)


def _foremoe(counts, cfg: PlanConfig, history) -> Plan:
  """Ours (docs/planner.md), never estimated slower than the eplb_step plan it is checked against."""
  num_micro, num_layers = counts.shape[:2]
  # The eplb_step placement is one of foremoe's bases and its whole-step rival: computed once for both.
  step_base = None
  if cfg.eplb_base_candidate and cfg.redundant_per_device > 0:
    step_base = _step_placement(counts.sum((0, 2)), cfg)
  slot_expert, slot_pairs_BxG, base = foremoe.plan_foremoe(counts, cfg, step_base)
  batch = num_micro * num_layers
  se_BxDxS, counts_BxDxE = slot_expert.reshape(batch, cfg.num_devices, -1), counts.reshape(batch, cfg.num_devices, -1)
  if step_base is None:
    pairs_BxGxD, load, need = split.exact_pairs(se_BxDxS, counts_BxDxE, slot_pairs_BxG, cfg.pair_sweeps,
                                                num_layers=num_layers)
    return _make_plan(slot_expert, split.exact_shares(se_BxDxS, counts_BxDxE, pairs_BxGxD), base, cfg, load, need)
  # Last check on the whole step: water-filled splits balance devices but can concentrate (source,
  # destination) pairs, which the per-layer choice only bounds; EPLB's step placement with its even
  # split may then need smaller padded capacities. Keep whichever the cost model finds faster.
  step_plan = _plan(counts, _repeated(step_base, num_micro), step_base, cfg)
  step_level_s = foremoe.estimated_step_s(step_plan.slot_load, step_plan.pair_need, 0, step_base, cfg)
  moves = tenures.new_tenures(slot_expert, base)

  def slower(busiest_B, need_B):
    """Whether our plan is estimated slower with these per-(m, l) busiest-device loads and pair needs."""
    return step_level_s < foremoe.step_s(busiest_B.reshape(num_micro, num_layers),
                                         need_B.reshape(num_micro, num_layers), moves, base, cfg)

  # The balancing of our split stops once lower bounds of its loads and pair needs already make it
  # slower: the estimate grows with each (unless transfers overlap more than the compute they hide).
  cost = cfg.cost
  monotone = cost.overlap_fraction <= 1.0 and cost.token_compute_s >= 0 and cost.a2a_s_per_token >= 0
  exact = split.exact_pairs(se_BxDxS, counts_BxDxE, slot_pairs_BxG, cfg.pair_sweeps,
                            stop=slower if monotone else None, num_layers=num_layers)
  if exact is None:
    return step_plan
  pairs_BxGxD, load, need = exact
  if slower(load.reshape(batch, cfg.num_devices, -1).sum(-1).max(-1), need):
    return step_plan
  return _make_plan(slot_expert, split.exact_shares(se_BxDxS, counts_BxDxE, pairs_BxGxD), base, cfg, load, need)


# The policies (`config.POLICIES` names them for validation; a test keeps the two equal), each
# `(counts int64 [M, L, D, E], cfg, history or None) -> Plan`.
PLANNERS = {"static": _static, "eplb_step": _eplb_step, "eplb_history": _eplb_history,
            "eplb_microstep": _eplb_microstep, "foremoe": _foremoe}
