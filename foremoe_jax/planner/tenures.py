"""Moves priced per tenure: the micro-steps a slot keeps one replica off the base.

The executor fetches a tenure's replica once, when it starts, and sends its gradient back once, when it
ends: a tenure of one micro-step at once in the weights' dtype, a longer one as its float32 sum
(`CostModel.direct_move_s` / `move_s`). Both are charged where the tenure starts, so an (m, l)'s price
depends on the micro-step after it too (does the tenure go on?).
"""

from __future__ import annotations

import numpy as np

from foremoe_jax.planner.config import PlanConfig


def _masks(slot_expert_MxLxDxS: np.ndarray, base_LxDxS: np.ndarray):
  """bool [M, L, D, S] three times: off (the slot holds an expert off the base), fresh (off, and not the
  expert it held in micro-step m-1: a tenure starts) and goes_on (off, and held in m+1 too)."""
  same_as_next = slot_expert_MxLxDxS[1:] == slot_expert_MxLxDxS[:-1]
  off = (slot_expert_MxLxDxS >= 0) & (slot_expert_MxLxDxS != base_LxDxS[None])
  fresh = off.copy()
  fresh[1:] &= ~same_as_next
  goes_on = np.zeros_like(off)
  goes_on[:-1] = off[:-1] & same_as_next
  return off, fresh, goes_on


def per_device(mask_xS: np.ndarray) -> np.ndarray:
  """int16 [...]: the True slots per device, summed slot by slot (a device has few slots, and a
  reduction over a short last axis costs several times more)."""
  count = mask_xS[..., 0].astype(np.int16)
  for j in range(1, mask_xS.shape[-1]):
    count += mask_xS[..., j]
  return count


def tenure_starts(slot_expert_MxLxDxS: np.ndarray, base_LxDxS: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """bool [M, L, D, S] twice: the slots starting a tenure in (m, l) that lasts one micro-step, and those
  starting a longer one: slots holding an expert off the base that they did not hold in micro-step m-1,
  split by whether they still hold it in m+1."""
  _, fresh, goes_on = _masks(slot_expert_MxLxDxS, base_LxDxS)
  return fresh & ~goes_on, fresh & goes_on


def new_tenures(slot_expert_MxLxDxS: np.ndarray, base_LxDxS: np.ndarray) -> np.ndarray:
  """int [2, M, L, D]: per device the tenures that start in (m, l), [0] those of one micro-step and [1]
  those of more (`tenure_starts`). Each costs one fetch and one gradient return (`CostModel.layer_s`)."""
  return np.stack([per_device(starts) for starts in tenure_starts(slot_expert_MxLxDxS, base_LxDxS)])


def keep_or_move(load_2xMxL: np.ndarray, se_MxLxDxS: np.ndarray, base_LxDxS: np.ndarray, cfg: PlanConfig,
                 extra_2xMxL=0.0):
  """Per layer, which (m, l) keep the base (0) and which take the moved candidate (1), and its time.

  A tenure costs its fetch and gradient return once, where it starts (`new_tenures`), so a moved
  placement is cheaper after the same moves in the micro-step before, and its return is cheaper when the
  next micro-step keeps the base or other moves (the tenure lasts one micro-step): the choices of a
  layer's micro-steps depend on each other. Exact on the cost model: a shortest path, micro-step by
  micro-step (vectorized over layers), over three states: keep; move after a keep (every off-base slot
  starts a tenure); move after a move (only the slots that changed do). A move's price is known once the
  next micro-step's choice is: each tenure starting there lasts one micro-step unless the next moves too
  and holds that slot's expert. load: the busiest device's pairs under the base (0) and the moved
  candidate (1); extra: seconds either adds. Returns (choice int [M, L], seconds [L])."""
  num_micro, num_layers = se_MxLxDxS.shape[:2]
  off, fresh, goes_on = _masks(se_MxLxDxS, base_LxDxS)
  # Per device, the tenures starting at m: after a keep (every off-base slot) or a move (the changed
  # ones), of which those going on if m+1 moves too. All end at m if m+1 keeps: the busiest device's
  # count prices them (a device's price grows with its count).
  off_n, fresh_n, off_on, fresh_on = (per_device(a) for a in (off, fresh, goes_on, fresh & goes_on))
  extra = np.broadcast_to(extra_2xMxL, load_2xMxL.shape)
  keep_s = cfg.cost.layer_s(load_2xMxL[0]) + extra[0]
  busiest_2xMxLx1 = np.stack([off_n, fresh_n]).max(-1, keepdims=True)
  after_keep_end, after_move_end = cfg.cost.layer_s(load_2xMxL[1], busiest_2xMxLx1) + extra[1]
  short_2xMxLxD, long_2xMxLxD = np.stack([off_n - off_on, fresh_n - fresh_on]), np.stack([off_on, fresh_on])
  after_keep_on, after_move_on = cfg.cost.layer_s(load_2xMxL[1], short_2xMxLxD, long_2xMxLxD) + extra[1]
  # best[state]: the cheapest micro-steps 0..m-1 of paths in that state at m (keep, move after keep,
  # move after move); micro-step m's price is added on the way to m+1.
  best = np.stack([np.zeros(num_layers), np.zeros(num_layers), np.full(num_layers, np.inf)])
  came_from = np.zeros((num_micro, 2, num_layers), np.int64)  # into keep (from 0, 1, 2), into move after move (1, 2)
  for m in range(num_micro):
    to_keep = np.stack([best[0] + keep_s[m], best[1] + after_keep_end[m], best[2] + after_move_end[m]])
    to_stay = np.stack([best[1] + after_keep_on[m], best[2] + after_move_on[m]])
    came_from[m] = [to_keep.argmin(0), to_stay.argmin(0) + 1]
    best = np.stack([to_keep.min(0), best[0] + keep_s[m], to_stay.min(0)])
  # After the last micro-step every tenure ends: the paths that end in keep (state 0 of a virtual m = M).
  state = np.zeros(num_layers, np.int64)
  choice = np.zeros((num_micro, num_layers), np.int64)
  for m in range(num_micro - 1, -1, -1):
    state = np.where(state == 0, came_from[m, 0], np.where(state == 1, 0, came_from[m, 1]))
    choice[m] = state > 0
  return choice, best[0]
