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


def place_replicas(slot_expert_BxDxS: np.ndarray, free_BxDxS: np.ndarray, w_BxE: np.ndarray):
  """Re-decides the free slots of a placement. Returns (slot_expert int32 [B, D, S], x float [B, G]).

  The content of a free slot is its default: kept when it relieves the device of its expert's first
  fixed copy at least as much as the best new replica would relieve the heaviest device.
  x is the greedy's per-slot load estimate (each expert's slots sum to its load).
  """
  batch, num_devices, num_slots = slot_expert_BxDxS.shape
  default_BxG = slot_expert_BxDxS.reshape(batch, -1).astype(np.int64)
  free_BxG = free_BxDxS.reshape(batch, -1).copy()
  se_BxG = np.where(free_BxG, -1, default_BxG)
  x_BxG = split.even_slot_loads(se_BxG.reshape(slot_expert_BxDxS.shape), w_BxE)
  load_BxD = x_BxG.reshape(batch, num_devices, num_slots).sum(-1)
  free_BxD = free_BxDxS.sum(-1)
  rows = np.arange(batch)
  # The fixed slot a default would draw its pairs from: the first fixed copy of its expert.
  first = slots.first_copy_mask(se_BxG)
  first_slot_BxE = np.full(w_BxE.shape, -1, np.int64)
  rows_BxG = np.broadcast_to(rows[:, None], se_BxG.shape)
  first_slot_BxE[rows_BxG[first], se_BxG[first]] = np.nonzero(first)[1]
  default_src_BxG = np.where(default_BxG >= 0, first_slot_BxE[rows_BxG, np.maximum(default_BxG, 0)], -1)
  for _ in range(int(free_BxD.sum(1).max(initial=0))):
    active = free_BxD.any(1)
    target = np.argmin(np.where(free_BxD > 0, load_BxD, np.inf), axis=1)
    target_slots = target[:, None] * num_slots + np.arange(num_slots)
    new_slot = target * num_slots + np.argmax(free_BxG[rows[:, None], target_slots], axis=1)
    on_target = se_BxG[rows[:, None], target_slots]
    target_load = load_BxD[rows, target]
    heavy = np.argmax(np.where(np.arange(num_devices) == target[:, None], -np.inf, load_BxD), axis=1)
    heavy_slots = heavy[:, None] * num_slots + np.arange(num_slots)
    heavy_experts = se_BxG[rows[:, None], heavy_slots]
    duplicate = (heavy_experts[:, :, None] == on_target[:, None, :]).any(-1)
    gap = (load_BxD[rows, heavy] - target_load) / 2
    relief = np.where((heavy_experts >= 0) & ~duplicate,
                      np.minimum(x_BxG[rows[:, None], heavy_slots], gap[:, None]), -np.inf)
    best_j = np.argmax(relief, axis=1)
    best = relief[rows, best_j]
    default = default_BxG[rows, new_slot]
    default_src = np.maximum(default_src_BxG[rows, new_slot], 0)
    default_relief = np.minimum(x_BxG[rows, default_src], (load_BxD[rows, default_src // num_slots] - target_load) / 2)
    keep = (default >= 0) & ~(on_target == default[:, None]).any(1) & (default_relief >= best)
    place = active & (keep | np.isfinite(best))
    src = np.where(keep, default_src, heavy * num_slots + best_j)
    expert = np.where(keep, default, heavy_experts[rows, best_j])
    delta = np.where(place, np.maximum(np.where(keep, default_relief, best), 0.0), 0.0)
    se_BxG[rows[place], new_slot[place]] = expert[place]
    x_BxG[rows, src] -= delta
    x_BxG[rows, new_slot] += delta
    load_BxD[rows, src // num_slots] -= delta
    load_BxD[rows, target] += delta
    free_BxG[rows[active], new_slot[active]] = False
    free_BxD[rows[active], target[active]] -= 1
  return se_BxG.astype(np.int32).reshape(slot_expert_BxDxS.shape), x_BxG


def primary_mask(base_BxDxS: np.ndarray) -> np.ndarray:
  """bool [B, D, S]: the copy of each expert that never moves: the first one visiting slots j-major."""
  batch, num_devices, num_slots = base_BxDxS.shape
  j_major_G = np.arange(num_devices * num_slots).reshape(num_devices, num_slots).T.ravel()
  return slots.first_copy_mask(base_BxDxS.reshape(batch, -1), j_major_G).reshape(base_BxDxS.shape)


def lpt_base(w_LxE: np.ndarray, cfg: PlanConfig) -> np.ndarray:
  """int32 [L, D, S]: a permutation of experts (E/D per device, balanced on W) plus greedy replicas."""
  num_layers = w_LxE.shape[0]
  pack_LxE, position_LxE = eplb.balanced_packing(w_LxE, cfg.num_devices, cfg.experts_per_device)
  base = np.full((num_layers, cfg.num_devices, cfg.slots_per_device), -1, np.int32)
  rows = np.broadcast_to(np.arange(num_layers)[:, None], pack_LxE.shape)
  base[rows, pack_LxE, position_LxE] = np.arange(cfg.num_experts)
  free = np.broadcast_to(np.arange(cfg.slots_per_device) >= cfg.experts_per_device, base.shape)
  return place_replicas(base, free, w_LxE)[0]


def home_base(w_LxE: np.ndarray, cfg: PlanConfig) -> np.ndarray:
  """int32 [L, D, S]: the home layout plus greedy replicas in the redundant slots (no expert leaves home)."""
  home = slots.home_placement(cfg.num_experts, cfg.num_devices, cfg.slots_per_device)
  base = np.broadcast_to(home, (w_LxE.shape[0], *home.shape))
  free = np.broadcast_to(np.arange(cfg.slots_per_device) >= cfg.experts_per_device, base.shape)
  return place_replicas(base, free, w_LxE)[0]


def swap_base(w_LxE: np.ndarray, cfg: PlanConfig) -> np.ndarray:
  """int32 [L, D, S]: home, with experts swapped between the heaviest and the lightest device, plus replicas.

  Each swap trades the pair (a on the heaviest, b on the lightest) whose load difference is closest to
  half the gap (so the larger of the two new loads is smallest), and costs each device one fetched
  expert. Per layer the swap count with the lowest estimated step time on W is kept: the heaviest
  device's load (its compute and the padded all_to_all it sets), plus the busiest device's fetched
  experts times a move.
  """
  num_layers, num_experts = w_LxE.shape
  per, rows = cfg.experts_per_device, np.arange(num_layers)
  home = slots.home_placement(num_experts, cfg.num_devices, cfg.slots_per_device)
  home_device_E = np.arange(num_experts) // per
  device_LxE = np.broadcast_to(home_device_E, w_LxE.shape).copy()
  slot_LxE = np.broadcast_to(np.arange(num_experts) % per, w_LxE.shape).copy()
  load_LxD = w_LxE.reshape(num_layers, cfg.num_devices, per).sum(-1)
  base = np.broadcast_to(home, (num_layers, *home.shape)).copy()
  pair_s = cfg.cost.token_compute_s + cfg.cost.padded_a2a_s(1.0)
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
    fetched_LxD = np.stack([((device_LxE == dev) & (home_device_E != dev)).sum(1) for dev in range(cfg.num_devices)], 1)
    step_s = load_LxD.max(1) * pair_s + fetched_LxD.max(1) * cfg.cost.move_s
    better = step_s < best_s
    best_base[better], best_s[better] = base[better], step_s[better]
  free = np.broadcast_to(np.arange(cfg.slots_per_device) >= per, best_base.shape)
  return place_replicas(best_base, free, w_LxE)[0]


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
  rank = np.argsort(np.argsort(np.where(primary_BxDxS, np.inf, score), axis=2, kind="stable"), axis=2)
  return ~primary_BxDxS & (rank < per_device)


def moved_placements(counts_MxLxDxE: np.ndarray, base_LxDxS: np.ndarray, cfg: PlanConfig):
  """The greedy's per-(m, l) moves on one base: (slot_expert [M*L, D, S], its load estimate x [M*L, G])."""
  num_micro, num_layers, num_devices, num_experts = counts_MxLxDxE.shape
  batch = num_micro * num_layers
  w_BxE = counts_MxLxDxE.sum(2).reshape(batch, num_experts).astype(np.float64)
  base_BxDxS = np.broadcast_to(base_LxDxS, (num_micro, *base_LxDxS.shape)).reshape(batch, num_devices, -1)
  primary = np.broadcast_to(primary_mask(base_LxDxS), (num_micro, *base_LxDxS.shape)).reshape(base_BxDxS.shape)
  se, x = place_replicas(base_BxDxS, free_slots(base_BxDxS, primary, w_BxE, cfg.max_moves_per_device), w_BxE)
  return se, split.merge_same_device_copies(se, x.reshape(se.shape)).reshape(batch, -1)


def estimated_step_s(slot_load_MxLxG: np.ndarray, pair_need_MxL: np.ndarray, moves_MxL: np.ndarray,
                     base_LxDxS: np.ndarray, cfg: PlanConfig) -> float:
  """The cost model's time of a whole planned step: every (m, l) at its slowest device with its moves
  (slots off the base on the busiest device), the base transfer, and the padded all_to_all at the
  step's largest (source, destination) pair count, bucketed."""
  num_micro, num_layers = pair_need_MxL.shape
  max_load = slot_load_MxLxG.reshape(num_micro, num_layers, cfg.num_devices, -1).sum(-1).max(-1)
  need = int(pair_need_MxL.max(initial=0))
  return float(cfg.cost.layer_s(max_load, moves_MxL).sum() + remote_base_slots(base_LxDxS, cfg).sum() * cfg.cost.move_s
               + num_micro * num_layers * cfg.cost.padded_a2a_s(cfg.num_devices * pairs.bucket(need)))


def choose_bases(step_s_NxL: np.ndarray, need_NxL: np.ndarray, num_micro: int, cfg: PlanConfig) -> np.ndarray:
  """int [L]: the base of each layer that minimizes the estimated step time.

  Each layer adds its own micro-steps and transfer (step_s), but the padded all_to_all has one capacity
  for the whole step: the largest (source, destination) pair count of any (m, l), bucketed like the
  executor's. So one layer's base can make every micro-step of every layer ship more rows. Tries each
  layer's estimated need as the step's bound; per layer the fastest base within it; keeps the bound
  with the lowest total.
  """
  num_layers = step_s_NxL.shape[1]
  best_s, best_L = np.inf, step_s_NxL.argmin(0)
  for bound in np.unique(need_NxL):
    within_NxL = np.where(need_NxL <= bound, step_s_NxL, np.inf)
    choice_L = within_NxL.argmin(0)
    capacity = pairs.bucket(int(bound))
    total = (within_NxL[choice_L, np.arange(num_layers)].sum()
             + num_micro * num_layers * cfg.cost.padded_a2a_s(capacity * cfg.num_devices))
    if total < best_s:
      best_s, best_L = total, choice_L
  return best_L


def plan_foremoe(counts_MxLxDxE: np.ndarray, cfg: PlanConfig):
  """Returns (slot_expert int32 [M, L, D, S], slot_pairs int64 [M*L, G], base int32 [L, D, S])."""
  num_micro, num_layers, num_devices, num_experts = counts_MxLxDxE.shape
  batch = num_micro * num_layers
  w_LxE = counts_MxLxDxE.sum((0, 2)).astype(np.float64)
  w_BxE = counts_MxLxDxE.sum(2).reshape(batch, num_experts).astype(np.float64)
  # Home layouts first: on equal estimated time, experts stay home.
  home = slots.home_placement(num_experts, num_devices, cfg.slots_per_device)
  bases = [np.broadcast_to(home, (num_layers, *home.shape)), home_base(w_LxE, cfg), lpt_base(w_LxE, cfg),
           swap_base(w_LxE, cfg)]
  if cfg.eplb_base_candidate and cfg.redundant_per_device > 0:
    bases.append(eplb.eplb_placement(w_LxE, num_devices, cfg.slots_per_device, cfg.eplb_groups, cfg.eplb_nodes))
  bases = [align.align_placement(base, home, num_experts, cfg.eplb_nodes) for base in bases]
  # Per-(m, l) candidates: every base unchanged, plus the greedy's moves on home, LPT and swap bases.
  # Home + replicas shares home's moves (both re-decide only the redundant slots), so the greedy runs
  # three times, not four; moves on the EPLB base rarely win (never on the ESFT traces).
  candidates_se = [np.broadcast_to(base, (num_micro, *base.shape)).reshape(batch, num_devices, -1) for base in bases]
  candidates_x = [split.even_slot_loads(se, w_BxE) for se in candidates_se]
  moved_from = (0, 2, 3)
  for source in moved_from:
    se, x = moved_placements(counts_MxLxDxE, bases[source], cfg)
    candidates_se.append(se)
    candidates_x.append(x)
  home_moved, lpt_moved, swap_moved = range(len(bases), len(bases) + len(moved_from))
  of_base = [(0, home_moved), (1, home_moved), (2, lpt_moved), (3, swap_moved)] + [(4,)] * (len(bases) - 4)
  se_CxBxDxS = np.stack(candidates_se)
  x_CxBxG = split.waterfill_slot_loads(se_CxBxDxS.reshape(-1, num_devices, cfg.slots_per_device),
                                       np.concatenate(candidates_x), num_experts,
                                       cfg.split_sweeps).reshape(len(candidates_se), batch, -1)
  max_load_CxB = x_CxBxG.reshape(*x_CxBxG.shape[:2], num_devices, -1).sum(-1).max(-1)
  # Per (m, l) and base, the candidate with the lowest estimated time (moves counted from that base);
  # per layer and base, the estimated step time (its micro-steps, then its one-off transfer) and the
  # padded all_to_all's capacity need: at least the worst device load over D, and at least the largest
  # pair count no split can move (the base's single-copy experts).
  choice_NxB, step_s_NxL, need_NxL = [], [], []
  rows = np.arange(batch)
  fixed_NxL = pairs.fixed_pair_max(counts_MxLxDxE, np.stack(bases))
  for b, cands in enumerate(of_base):
    time_cxB = np.stack([cfg.cost.layer_s(max_load_CxB[c], (se_CxBxDxS[c] != candidates_se[b]).sum(-1).max(-1))
                         for c in cands])
    choice_NxB.append(np.asarray(cands)[np.argmin(time_cxB, axis=0)])
    worst_load_L = max_load_CxB[choice_NxB[-1], rows].reshape(num_micro, num_layers).max(0)
    need_NxL.append(np.maximum(np.ceil(worst_load_L / num_devices), fixed_NxL[b]))
    step_s_NxL.append(time_cxB.min(0).reshape(num_micro, num_layers).sum(0)
                      + remote_base_slots(bases[b], cfg) * cfg.cost.move_s)
  choice_L = choose_bases(np.stack(step_s_NxL), np.stack(need_NxL), num_micro, cfg)
  choice_B = np.stack(choice_NxB).reshape(len(bases), num_micro, num_layers)[choice_L, :, np.arange(num_layers)].T.ravel()
  slot_expert = se_CxBxDxS[choice_B, rows]
  base = np.stack(bases)[choice_L, np.arange(num_layers)]
  counts_BxDxE = counts_MxLxDxE.reshape(batch, num_devices, num_experts)
  slot_pairs = split.integer_slot_loads(slot_expert.reshape(batch, -1), x_CxBxG[choice_B, rows], counts_BxDxE.sum(1))
  return slot_expert.reshape(num_micro, num_layers, num_devices, -1), slot_pairs, base.astype(np.int32)
