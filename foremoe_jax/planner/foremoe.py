"""The "foremoe" policy: step-level base placement, per-micro-step replicas, exact token split.

1. Base (once per step and layer, from the step's summed counts W), relabeled to overlap home: one of
   a. home, with or without replicas of W's hottest experts in the redundant slots;
   b. "swap": home with greedy expert swaps between the heaviest and the lightest device, as many as
      pay for their transfers on W, plus replicas: near-balance at a few moves per device;
   c. "lpt": a permutation of experts, E/D per device, by balanced packing of W (LPT with cardinality),
      plus the redundant slots filled by the replica greedy below (run on W), planned with moves (2.);
   d. "eplb": EPLB's placement of W (the eplb_step plan), planned without moves;
   per layer, whichever gives the lowest estimated step time: its micro-steps plus its one-off
   transfer. Since the exact split of (d) is never worse than EPLB's even split, foremoe is never
   worse than eplb_step on the estimate.
2. Per micro-step and layer: up to `max_moves_per_device` movable slots per device (slots holding a
   non-primary copy, or empty) are re-decided by a greedy that pairs the lightest device with a free slot
   with the heaviest other device and gives it a replica of the expert that relieves the most; a base
   replica that relieves as much is kept (no transfer). The cost model then keeps these moves only where
   they beat the unchanged base on estimated layer time.
3. Exact split: water-filled per-slot loads, rounded per expert, decomposed per source (local first).
All steps run in lockstep over the M*L (micro-step, layer) problems: Python loops run over slots and
replicated experts, never over (m, l).
"""

from __future__ import annotations

import numpy as np

from foremoe_jax.planner import align, eplb, pairs, slots, split
from foremoe_jax.planner.config import PlanConfig
from foremoe_jax.planner.tenures import keep_or_move


def place_replicas(slot_expert_BxDxS: np.ndarray, free_BxDxS: np.ndarray, w_BxE: np.ndarray):
  """Re-decides the free slots of a placement. Returns (slot_expert int32 [B, D, S], x float [B, G]).

  The content of a free slot is its default: kept when it relieves the device of its expert's first
  fixed copy at least as much as the best new replica would relieve the heaviest device.
  x is the greedy's per-slot load estimate (each expert's slots sum to its load).
  """
  batch, num_devices, num_slots = slot_expert_BxDxS.shape
  default_BxG = slot_expert_BxDxS.reshape(batch, -1).astype(np.int64)
  free_BxDxS = free_BxDxS.copy()
  se_BxDxS = np.where(free_BxDxS, -1, default_BxG.reshape(free_BxDxS.shape))
  se_BxG = se_BxDxS.reshape(batch, -1)
  x_BxG = split.even_slot_loads(se_BxDxS, w_BxE)
  x_BxDxS = x_BxG.reshape(se_BxDxS.shape)
  load_BxD = x_BxDxS.sum(-1)
  free_BxD = free_BxDxS.sum(-1)
  rows = np.arange(batch)
  # The fixed slot a default would draw its pairs from: the first fixed copy of its expert.
  first = slots.first_copy_mask(se_BxG)
  first_slot_BxE = np.full(w_BxE.shape, -1, np.int64)
  rows_BxG = np.broadcast_to(rows[:, None], se_BxG.shape)
  first_slot_BxE[rows_BxG[first], se_BxG[first]] = np.nonzero(first)[1]
  default_src_BxG = np.where(default_BxG >= 0, first_slot_BxE[rows_BxG, np.maximum(default_BxG, 0)], -1)
  # Flat views and indices: np.take and one flat index beat fancy indexing with two index arrays.
  se_RxS, x_RxS, free_RxS = (a.reshape(-1, num_slots) for a in (se_BxDxS, x_BxDxS, free_BxDxS))
  se_flat, x_flat, free_flat = se_BxG.reshape(-1), x_BxG.reshape(-1), free_BxDxS.reshape(-1)
  load_flat, free_count_flat = load_BxD.reshape(-1), free_BxD.reshape(-1)
  default_flat, default_src_flat = default_BxG.reshape(-1), default_src_BxG.reshape(-1)
  row_devices, row_slots = rows * num_devices, rows * num_devices * num_slots
  # Kept up to date entry by entry (two devices change per step) rather than rebuilt each step.
  free_load_BxD = np.where(free_BxD > 0, load_BxD, np.inf)
  free_load_flat = free_load_BxD.reshape(-1)
  left_B = free_BxD.sum(1)
  for _ in range(int(left_B.max(initial=0))):
    active = left_B > 0
    target = row_devices + np.argmin(free_load_BxD, axis=1)
    new_slot = target * num_slots + np.argmax(np.take(free_RxS, target, axis=0), axis=1)
    on_target = np.take(se_RxS, target, axis=0)
    # The heaviest other device: the argmax with the target's load masked for a moment.
    target_load = load_flat[target]
    load_flat[target] = -np.inf
    heavy = row_devices + np.argmax(load_BxD, axis=1)
    load_flat[target] = target_load
    heavy_experts = np.take(se_RxS, heavy, axis=0)
    fresh = heavy_experts >= 0
    for j in range(num_slots):
      fresh &= heavy_experts != on_target[:, j:j + 1]
    gap = (load_flat[heavy] - target_load) / 2
    relief = np.where(fresh, np.minimum(np.take(x_RxS, heavy, axis=0), gap[:, None]), -np.inf)
    best_j = np.argmax(relief, axis=1)
    best = relief[rows, best_j]
    default = default_flat[new_slot]
    default_src = row_slots + np.maximum(default_src_flat[new_slot], 0)
    default_relief = np.minimum(x_flat[default_src], (load_flat[default_src // num_slots] - target_load) / 2)
    keep = (default >= 0) & ~(on_target == default[:, None]).any(1) & (default_relief >= best)
    place = active & (keep | np.isfinite(best))
    src = np.where(keep, default_src, heavy * num_slots + best_j)
    delta = np.where(place, np.maximum(np.where(keep, default_relief, best), 0.0), 0.0)
    se_flat[new_slot[place]] = np.where(keep, default, heavy_experts[rows, best_j])[place]
    x_flat[src] -= delta
    x_flat[new_slot] += delta
    src_device = src // num_slots
    load_flat[src_device] -= delta
    load_flat[target] += delta
    free_flat[new_slot[active]] = False
    free_count_flat[target[active]] -= 1
    left_B -= active
    changed = np.concatenate([src_device, target])
    free_load_flat[changed] = np.where(free_count_flat[changed] > 0, load_flat[changed], np.inf)
  return se_BxG.astype(np.int32).reshape(slot_expert_BxDxS.shape), x_BxG


def primary_mask(base_BxDxS: np.ndarray) -> np.ndarray:
  """bool [B, D, S]: the copy of each expert that never moves: the first one visiting slots j-major."""
  batch, num_devices, num_slots = base_BxDxS.shape
  j_major_G = np.arange(num_devices * num_slots).reshape(num_devices, num_slots).T.ravel()
  return slots.first_copy_mask(base_BxDxS.reshape(batch, -1), j_major_G).reshape(base_BxDxS.shape)


def lpt_base(w_LxE: np.ndarray, cfg: PlanConfig) -> np.ndarray:
  """int32 [L, D, S]: a permutation of experts (E/D per device, balanced on W) plus greedy replicas."""
  return with_replicas(_lpt_permutation(w_LxE, cfg)[None], w_LxE, cfg)[0]


def swap_base(w_LxE: np.ndarray, cfg: PlanConfig) -> np.ndarray:
  """int32 [L, D, S]: home, with experts swapped between the heaviest and the lightest device, plus replicas.

  Each swap trades the pair (a on the heaviest, b on the lightest) whose load difference is closest to
  half the gap (so the larger of the two new loads is smallest), and costs each device one fetched
  expert. Per layer the swap count with the lowest estimated step time on W is kept: the heaviest
  device's load (its compute and the padded all_to_all it sets), plus the busiest device's fetched
  experts times a move.
  """
  return with_replicas(_swapped_home(w_LxE, cfg)[None], w_LxE, cfg)[0]


def with_replicas(bases_NxLxDxS: np.ndarray, w_LxE: np.ndarray, cfg: PlanConfig) -> np.ndarray:
  """int32 [N, L, D, S]: each layout (E/D experts per device, the redundant slots free) plus the greedy's
  replicas on W, all N in one batch (the rows are independent)."""
  num_bases, num_layers = bases_NxLxDxS.shape[:2]
  bases = bases_NxLxDxS.reshape(-1, *bases_NxLxDxS.shape[2:])
  free = np.broadcast_to(np.arange(cfg.slots_per_device) >= cfg.experts_per_device, bases.shape)
  w_NLxE = np.broadcast_to(w_LxE, (num_bases, *w_LxE.shape)).reshape(-1, w_LxE.shape[1])
  return place_replicas(bases, free, w_NLxE)[0].reshape(bases_NxLxDxS.shape)


def _home_layers(num_layers: int, cfg: PlanConfig) -> np.ndarray:
  home = slots.home_placement(cfg.num_experts, cfg.num_devices, cfg.slots_per_device)
  return np.broadcast_to(home, (num_layers, *home.shape))


def _lpt_permutation(w_LxE: np.ndarray, cfg: PlanConfig) -> np.ndarray:
  """int32 [L, D, S]: experts packed E/D per device by LPT on W, the redundant slots empty."""
  num_layers = w_LxE.shape[0]
  pack_LxE, position_LxE = eplb.balanced_packing(w_LxE, cfg.num_devices, cfg.experts_per_device)
  base = np.full((num_layers, cfg.num_devices, cfg.slots_per_device), -1, np.int32)
  rows = np.broadcast_to(np.arange(num_layers)[:, None], pack_LxE.shape)
  base[rows, pack_LxE, position_LxE] = np.arange(cfg.num_experts)
  return base


def _swapped_home(w_LxE: np.ndarray, cfg: PlanConfig) -> np.ndarray:
  """int32 [L, D, S]: swap_base before its replicas."""
  num_layers, num_experts = w_LxE.shape
  per, rows = cfg.experts_per_device, np.arange(num_layers)
  home_device_E = np.arange(num_experts) // per
  device_LxE = np.broadcast_to(home_device_E, w_LxE.shape).copy()
  slot_LxE = np.broadcast_to(np.arange(num_experts) % per, w_LxE.shape).copy()
  load_LxD = w_LxE.reshape(num_layers, cfg.num_devices, per).sum(-1)
  base = _home_layers(num_layers, cfg).copy()
  pair_s = cfg.cost.token_compute_s + cfg.cost.a2a_s(1.0)
  best_base, best_s = base.copy(), load_LxD.max(1) * pair_s
  diff_LxExE = w_LxE[:, :, None] - w_LxE[:, None, :]
  for _ in range(per):
    heavy, light = load_LxD.argmax(1), load_LxD.argmin(1)
    gap_L = load_LxD[rows, heavy] - load_LxD[rows, light]
    ok = ((device_LxE == heavy[:, None])[:, :, None] & (device_LxE == light[:, None])[:, None, :]
          & (diff_LxExE > 0) & (diff_LxExE < gap_L[:, None, None]))
    score = np.where(ok, np.abs(diff_LxExE - gap_L[:, None, None] / 2), np.inf).reshape(num_layers, -1)
    pick = score.argmin(1)
    swap = np.isfinite(score[rows, pick])
    if not swap.any():
      break
    a, b, r = pick[swap] // num_experts, pick[swap] % num_experts, rows[swap]
    h, l, d = heavy[swap], light[swap], diff_LxExE[r, a, b]
    base[r, h, slot_LxE[r, a]], base[r, l, slot_LxE[r, b]] = b, a
    device_LxE[r, a], device_LxE[r, b] = l, h
    slot_LxE[r, a], slot_LxE[r, b] = slot_LxE[r, b], slot_LxE[r, a]
    load_LxD[r, h] -= d
    load_LxD[r, l] += d
    # Experts each device holds away from their home device, per layer.
    away = device_LxE != home_device_E
    fetched_LxD = np.bincount((rows[:, None] * cfg.num_devices + device_LxE)[away],
                              minlength=num_layers * cfg.num_devices).reshape(num_layers, -1)
    step_s = load_LxD.max(1) * pair_s + fetched_LxD.max(1) * cfg.cost.base_move_s
    better = step_s < best_s
    best_base[better], best_s[better] = base[better], step_s[better]
  return best_base


def remote_base_slots(base_LxDxS: np.ndarray, cfg: PlanConfig) -> np.ndarray:
  """int [L]: the busiest device's count of base slots holding another device's expert (weights to fetch)."""
  home_device = np.where(base_LxDxS >= 0, base_LxDxS // cfg.experts_per_device, np.arange(cfg.num_devices)[:, None])
  return (home_device != np.arange(cfg.num_devices)[:, None]).sum(-1).max(-1)


def free_slots(base_BxDxS: np.ndarray, primary_BxDxS: np.ndarray, w_BxE: np.ndarray, per_device: int) -> np.ndarray:
  """bool [B, D, S]: up to `per_device` non-primary slots per device, empty first, then lowest load per copy."""
  batch = base_BxDxS.shape[0]
  se_BxG = base_BxDxS.reshape(batch, -1)
  copies = slots.copies_per_expert(se_BxG, w_BxE.shape[1])
  per_copy = np.take_along_axis(w_BxE / np.maximum(copies, 1), np.maximum(se_BxG, 0), axis=1)
  score = np.where(se_BxG >= 0, per_copy, -1.0).reshape(base_BxDxS.shape)
  key = np.where(primary_BxDxS, np.inf, score)
  # Each slot's place in a stable sort of its device's slots, by pairwise comparisons: a device has
  # few slots, and a sort per device costs more.
  rank = np.zeros(key.shape, np.int64)
  for i in range(key.shape[2]):
    rank += key[..., i:i + 1] < key
    rank[..., i + 1:] += key[..., i:i + 1] == key[..., i + 1:]
  return ~primary_BxDxS & (rank < per_device)


def moved_placements(w_BxE: np.ndarray, bases_NxLxDxS: np.ndarray, cfg: PlanConfig):
  """The greedy's per-(m, l) moves on each base, in one batch (the rows are independent): slot_expert
  [N*M*L, D, S] and its load estimate x [N*M*L, G], base-major."""
  num_bases, num_layers, num_devices, num_slots = bases_NxLxDxS.shape
  batch, num_experts = w_BxE.shape
  shape = (num_bases, batch // num_layers, num_layers, num_devices, num_slots)
  base_BxDxS = np.broadcast_to(bases_NxLxDxS[:, None], shape).reshape(-1, num_devices, num_slots)
  primary = primary_mask(bases_NxLxDxS.reshape(-1, num_devices, num_slots))
  primary = np.broadcast_to(primary.reshape(num_bases, 1, num_layers, num_devices, num_slots), shape)
  w_NBxE = np.broadcast_to(w_BxE, (num_bases, batch, num_experts)).reshape(-1, num_experts)
  free = free_slots(base_BxDxS, primary.reshape(base_BxDxS.shape), w_NBxE, cfg.max_moves_per_device)
  se, x = place_replicas(base_BxDxS, free, w_NBxE)
  return se, split.merge_same_device_copies(se, x.reshape(se.shape)).reshape(se.shape[0], -1)


def estimated_step_s(slot_load_MxLxG: np.ndarray, pair_need_MxL: np.ndarray, tenures_2xMxLxD, base_LxDxS: np.ndarray,
                     cfg: PlanConfig) -> float:
  """The cost model's time of a whole planned step: every (m, l) at its slowest device with its moves
  (`tenures.new_tenures`: per device the tenures starting there, of one micro-step and of more; 0: none),
  the base transfer, and the padded all_to_alls, each micro-step's at its own capacity: its layers'
  largest (source, destination) pair count, bucketed."""
  num_micro, num_layers = pair_need_MxL.shape
  max_load = slot_load_MxLxG.reshape(num_micro, num_layers, cfg.num_devices, -1).sum(-1).max(-1)
  return step_s(max_load, pair_need_MxL, tenures_2xMxLxD, base_LxDxS, cfg)


def step_s(max_load_MxL: np.ndarray, need_MxL: np.ndarray, tenures_2xMxLxD, base_LxDxS: np.ndarray,
           cfg: PlanConfig) -> float:
  """estimated_step_s from each (m, l)'s busiest-device load and pair need; nondecreasing in each of
  them while the cost model's overlap_fraction is at most 1."""
  short, long = (0, 0) if np.ndim(tenures_2xMxLxD) == 0 else tenures_2xMxLxD
  return float(cfg.cost.layer_s(max_load_MxL, short, long).sum()
               + remote_base_slots(base_LxDxS, cfg).sum() * cfg.cost.base_move_s
               + exchange_s(max_load_MxL, need_MxL, cfg))


def exchange_s(max_load_MxL: np.ndarray, need_MxL: np.ndarray, cfg: PlanConfig) -> float:
  """The step's token all-to-alls: padded, every layer of micro-step m ships D times m's capacity
  (`pairs.micro_capacities` of the pair needs, the executor's rule); ragged (`CostModel(dispatch="ragged")`),
  each (m, l) its busiest receiver's rows."""
  if not cfg.cost.padded_a2a:
    return float(cfg.cost.a2a_s(max_load_MxL).sum())
  capacity_M = pairs.micro_capacities(need_MxL, cfg.capacity_buckets)
  return float(max_load_MxL.shape[1] * cfg.cost.a2a_s(cfg.num_devices * capacity_M).sum())


def choose_bases(step_s_NxL: np.ndarray, need_NxMxL: np.ndarray, cfg: PlanConfig) -> np.ndarray:
  """int [L]: the base of each layer that minimizes the estimated step time.

  Each layer adds its own micro-steps and transfer (step_s), but a micro-step's padded all_to_all has one
  capacity for all its layers: their largest (source, destination) pair need, bucketed like the
  executor's (`pairs.micro_capacities`). So one layer's base can make every layer of a micro-step ship
  more rows. Tries each layer's largest need over the micro-steps as a bound; per layer the fastest base
  within it; keeps the choice with the lowest total, its all_to_alls priced at their per-micro-step
  capacities.
  """
  num_layers = step_s_NxL.shape[1]
  if not cfg.cost.padded_a2a:  # each layer's exchange is already in its step_s
    return step_s_NxL.argmin(0)
  worst_NxL = need_NxMxL.max(1)
  bound_C = np.unique(worst_NxL)
  within_CxNxL = np.where(worst_NxL <= bound_C[:, None, None], step_s_NxL, np.inf)
  choice_CxL = within_CxNxL.argmin(1)
  need_CxLxM = need_NxMxL[choice_CxL, :, np.arange(num_layers)]
  capacity_CxM = pairs.bucket(need_CxLxM.max(1), cfg.capacity_buckets)
  total_C = within_CxNxL.min(1).sum(1) + num_layers * cfg.cost.a2a_s(cfg.num_devices * capacity_CxM).sum(1)
  return choice_CxL[total_C.argmin()]


def plan_foremoe(counts_MxLxDxE: np.ndarray, cfg: PlanConfig, eplb_base_LxDxS: np.ndarray | None = None):
  """Returns (slot_expert int32 [M, L, D, S], slot_pairs int64 [M*L, G], base int32 [L, D, S]).

  eplb_base_LxDxS: the eplb_step placement (aligned to home) when the caller has it, else computed here.
  """
  num_micro, num_layers, num_devices, num_experts = counts_MxLxDxE.shape
  batch = num_micro * num_layers
  w_LxE = counts_MxLxDxE.sum((0, 2)).astype(np.float64)
  w_BxE = counts_MxLxDxE.sum(2).reshape(batch, num_experts).astype(np.float64)
  # Home layouts first: on equal estimated time, experts stay home.
  home = slots.home_placement(num_experts, num_devices, cfg.slots_per_device)
  home_LxDxS = _home_layers(num_layers, cfg)
  # Home, home + replicas, LPT and swap bases: replicas and alignment each in one batch.
  replicated = with_replicas(np.stack([home_LxDxS, _lpt_permutation(w_LxE, cfg), _swapped_home(w_LxE, cfg)]),
                             w_LxE, cfg)
  layouts = np.concatenate([home_LxDxS[None], replicated]).reshape(-1, num_devices, cfg.slots_per_device)
  aligned = align.align_placement(layouts, home, num_experts, cfg.eplb_nodes)
  bases = list(aligned.reshape(4, num_layers, num_devices, -1))
  if cfg.eplb_base_candidate and cfg.redundant_per_device > 0:
    if eplb_base_LxDxS is None:
      eplb_base_LxDxS = align.align_placement(eplb.eplb_placement(w_LxE, num_devices, cfg.slots_per_device,
                                                                  cfg.eplb_groups, cfg.eplb_nodes),
                                              home, num_experts, cfg.eplb_nodes)
    bases.append(eplb_base_LxDxS)
  # Per-(m, l) candidates: every base unchanged, plus the greedy's moves on home, LPT and swap bases.
  # Home + replicas shares home's moves (both re-decide only the redundant slots), so the greedy runs
  # three times, not four; moves on the EPLB base rarely win (never on the ESFT traces).
  candidates_se = [np.broadcast_to(base, (num_micro, *base.shape)).reshape(batch, num_devices, -1) for base in bases]
  candidates_x = [split.even_slot_loads(se, w_BxE) for se in candidates_se]
  moved_from = (0, 2, 3)
  se, x = moved_placements(w_BxE, np.stack([bases[source] for source in moved_from]), cfg)
  candidates_se += list(se.reshape(len(moved_from), batch, num_devices, -1))
  candidates_x += list(x.reshape(len(moved_from), batch, -1))
  home_moved, lpt_moved, swap_moved = range(len(bases), len(bases) + len(moved_from))
  of_base = [(0, home_moved), (1, home_moved), (2, lpt_moved), (3, swap_moved)] + [(4,)] * (len(bases) - 4)
  se_CxBxDxS = np.stack(candidates_se)
  # The unchanged bases' candidates share one placement per layer: their replica tables are per layer.
  layer_B = np.arange(batch) % num_layers
  placement_CxB = np.concatenate([np.arange(len(bases))[:, None] * num_layers + layer_B,
                                  len(bases) * num_layers + np.arange(len(moved_from) * batch).reshape(-1, batch)])
  placements = np.concatenate([np.stack(bases).reshape(-1, num_devices, cfg.slots_per_device),
                               se_CxBxDxS[len(bases):].reshape(-1, num_devices, cfg.slots_per_device)])
  x_CxBxG = split.waterfill_slot_loads(placements, np.concatenate(candidates_x), num_experts, cfg.split_sweeps,
                                       placement_B=placement_CxB.ravel()).reshape(len(candidates_se), batch, -1)
  max_load_CxB = x_CxBxG.reshape(*x_CxBxG.shape[:2], num_devices, -1).sum(-1).max(-1)
  # Per (m, l) and base, the candidate with the lowest estimated time (moves counted from that base);
  # per layer and base, the estimated step time (its micro-steps, then its one-off transfer); per (m, l)
  # and base, the padded all_to_all's capacity need: at least the busiest device's load over D, and at
  # least the largest pair count no split can move (the base's single-copy experts).
  choice_NxB, step_s_NxL, need_NxMxL = [], [], []
  rows = np.arange(batch)
  fixed_NxMxL = pairs.fixed_pair_max(counts_MxLxDxE, np.stack(bases))
  for b, cands in enumerate(of_base):
    load_cxMxL = max_load_CxB[list(cands)].reshape(len(cands), num_micro, num_layers)
    # a ragged exchange ships each (m, l)'s own rows (a padded one is priced per micro-step below)
    a2a_cxMxL = 0.0 if cfg.cost.padded_a2a else cfg.cost.a2a_s(load_cxMxL)
    if len(cands) == 1:  # the base itself: no moves
      pick_MxL = np.zeros((num_micro, num_layers), np.int64)
      layers_s = (cfg.cost.layer_s(load_cxMxL[0]) + np.broadcast_to(a2a_cxMxL, load_cxMxL.shape)[0]).sum(0)
    else:
      moved_MxLxDxS = se_CxBxDxS[cands[1]].reshape(num_micro, num_layers, num_devices, -1)
      pick_MxL, layers_s = keep_or_move(load_cxMxL, moved_MxLxDxS, bases[b], cfg, a2a_cxMxL)
    choice_NxB.append(np.asarray(cands)[pick_MxL.ravel()])
    busiest_MxL = max_load_CxB[choice_NxB[-1], rows].reshape(num_micro, num_layers)
    need_NxMxL.append(np.maximum(np.ceil(busiest_MxL / num_devices), fixed_NxMxL[b]))
    step_s_NxL.append(layers_s + remote_base_slots(bases[b], cfg) * cfg.cost.base_move_s)
  choice_L = choose_bases(np.stack(step_s_NxL), np.stack(need_NxMxL), cfg)
  choice_NxMxL = np.stack(choice_NxB).reshape(len(bases), num_micro, num_layers)
  choice_B = choice_NxMxL[choice_L, :, np.arange(num_layers)].T.ravel()
  slot_expert = se_CxBxDxS[choice_B, rows]
  base = np.stack(bases)[choice_L, np.arange(num_layers)]
  counts_BxDxE = counts_MxLxDxE.reshape(batch, num_devices, num_experts)
  slot_pairs = split.integer_slot_loads(slot_expert.reshape(batch, -1), x_CxBxG[choice_B, rows], counts_BxDxE.sum(1))
  return slot_expert.reshape(num_micro, num_layers, num_devices, -1), slot_pairs, base.astype(np.int32)
