"""Host side of a step (numpy): a planner `Plan` plus the step's counts -> `StepTables`, the move tables
and flags every micro-step's program takes. Only `StepTables.place` touches devices (one device_put).

Per micro-step m and layer the tables hold:
- fill: base -> m's working slots, every slot that differs from the base (host only: sizes, counts).
- refill: m-1's working slots -> m's (m = 0: the base), only the slots whose expert changes.
- A slot keeps its (expert, base source) for a run of micro-steps, its tenure (`tenures`).
- hold: the slots of tenures of two micro-steps or more, whose gradients wait in the executor's float32
  accumulator `held`, and their rows there: each such tenure gets one of H held rows on its device for its
  lifetime (`assign_held_rows`), H = the most of them alive at once on one device, a power of two: `held`
  is [D*H, ...] per layer, not the slots' [D*S, ...].
- direct: the fill's moves of one-micro-step tenures: their gradient goes back at once from the
  micro-step's gradient, in the weights' dtype (a float32 sum of one term would ship twice a bf16's bytes).
- flush: the held tenures that end after m (the slot's (expert, base source) is not in fill m+1, or m is
  the last micro-step): held row -> base row. A replica kept for n micro-steps is fetched once and its
  accumulated gradient goes back to its base row once, at the end of its tenure.
Move-table row counts are powers of two of the plan's need, or fixed by the caller: `TableSizes`
(`table_sizes`: the planner's bounds) fixes them and the layout for a whole run, so every plan's tables
have one shape and every micro-step runs its layout's full program (empty tables where it moves nothing):
a run then compiles one program per (position, padded capacity), whatever its plans.
"""
import dataclasses
import heapq
from collections import defaultdict
from typing import NamedTuple

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from foremoe_jax.placement import Tables, plan_tables
from foremoe_jax.planner.pairs import micro_capacities
from foremoe_jax.transfer import (HoldTables, MoveTables, fill_moves, hold_tables, home_to_base_moves,
                                  local_copies_needed, move_tables, moves_needed)


def capacity_power_of_two(n: int) -> int:
  return 1 << max(0, n - 1).bit_length()


def table_rows(needed, moves_lists, num_devices: int) -> int:
  """Rows a move table needs to hold every list of moves: the largest `needed(moves, D)`
  (`moves_needed` or `local_copies_needed`), at least 1, up to a power of two (few compiled shapes)."""
  return capacity_power_of_two(max(1, max((needed(m, num_devices) for m in moves_lists), default=0)))


class TableSizes(NamedTuple):
  """A run's move-table row counts and the layout (`Executor.layout`) every step runs in, fixed up front."""
  fill: int  # rows one device sends another per micro-step fill, refill, direct return and flush
  fill_local: int  # rows one device copies within itself per fill or refill
  return_local: int  # ... per direct return or flush (within one device)
  held: int  # H: held rows per device and layer
  base: int  # rows one device sends another in the base transfer
  base_local: int  # rows one device copies within itself in the base transfer
  layout: tuple[bool, bool]  # (base is home everywhere, micro-steps leave the base)


def table_sizes(cfg, base_rows: int = 0) -> TableSizes:
  """The bounds a `PlanConfig`'s plans never exceed. Per (micro-step, layer) and device, "foremoe" changes
  at most `max_moves_per_device` slots off the base and "eplb_microstep" any of its S; a refill also writes
  back the slots returning to the base (local copies): twice that, at most S. A base may move any slot:
  S rows per (source, destination) pair and per device; `base_rows` > 0 pads the base's remote rows to
  that instead (a plan that needs more is refused: `base_pair_need` tells ahead). The layout: the static
  policy (or one device) never leaves home; the step-level EPLB policies never leave their base; the
  others run every step with base and working slots, a home base as an empty base transfer."""
  slots = cfg.slots_per_device
  if cfg.policy == "static" or cfg.num_devices == 1:
    return TableSizes(1, 1, 1, 1, 1, 1, (True, False))
  base = min(slots, base_rows or slots)
  moves = {"foremoe": min(slots, cfg.max_moves_per_device), "eplb_microstep": slots}.get(cfg.policy, 0)
  if not moves:
    return TableSizes(1, 1, 1, 1, base, slots, (False, False))
  return TableSizes(moves, min(slots, 2 * moves), moves, moves, base, slots, (False, True))


def base_pair_need(plan, num_experts: int) -> int:
  """The most rows one device sends another in the plan's base transfer (over layers)."""
  num_devices = plan.base.shape[1]
  return max(moves_needed(home_to_base_moves(b, num_experts), num_devices) for b in plan.base)


class Tenure(NamedTuple):
  """Micro-steps start ... end (inclusive) during which layer `layer`'s fill repeats `move` (src_dev,
  src_row, dst_dev, dst_row): the slot keeps that expert, read from that base row."""
  layer: int
  move: tuple[int, int, int, int]
  start: int
  end: int


def tenures(fills_MxL) -> list[Tenure]:
  """Every tenure of a step's fills, by (start, layer, fill order)."""
  num_micro = len(fills_MxL)
  sets = [[set(f) for f in row] for row in fills_MxL]
  out = []
  for m, row in enumerate(fills_MxL):
    for l, fill in enumerate(row):
      for mv in fill:
        if m and mv in sets[m - 1][l]:
          continue  # it continues a tenure
        end = m
        while end + 1 < num_micro and mv in sets[end + 1][l]:
          end += 1
        out.append(Tenure(l, mv, m, end))
  return out


def assign_held_rows(spans: list[Tenure]) -> tuple[dict[Tenure, int], int]:
  """(held row of each tenure on its slot's device, the most rows one device needs): per (layer, device)
  interval assignment by start, the lowest free row first; a row frees after its tenure's last
  micro-step. Greedy by start needs exactly the most tenures alive at once there."""
  groups = defaultdict(list)
  for t in spans:
    groups[t.layer, t.move[2]].append(t)
  rows, need = {}, 0
  for group in groups.values():
    busy, free, allocated = [], [], 0  # busy: (end, row) heap; free: row heap
    for t in sorted(group, key=lambda t: t.start):
      while busy and busy[0][0] < t.start:
        heapq.heappush(free, heapq.heappop(busy)[1])
      if free:
        row = heapq.heappop(free)
      else:
        row, allocated = allocated, allocated + 1
      heapq.heappush(busy, (t.end, row))
      rows[t] = row
    need = max(need, allocated)
  return rows, need


@dataclasses.dataclass(frozen=True)
class StepTables:
  """Everything one optimizer step needs about placements, plus static sizes. The table trees come
  one per micro-step, so the host loop never slices a device array between micro-steps."""
  tables_M: list[Tables]  # per micro-step: [L, ...] dispatch tables
  base_moves: MoveTables  # [L, ...] home -> base
  fill_moves_M: list[MoveTables]  # per micro-step: [L, ...] base -> its working slots (host facts, sizes)
  refill_moves_M: list[MoveTables]  # per micro-step m: [L, ...] m-1's working slots -> m's (m = 0: the base)
  hold_tables_M: list[HoldTables]  # per micro-step m: [L, D, H] its held slots -> their held rows
  direct_moves_M: list[MoveTables]  # per micro-step m: [L, ...] base -> the slots of its one-micro-step tenures
  flush_moves_M: list[MoveTables]  # per micro-step m: [L, ...] base row <- held row of the tenures ending at m
  refill_M: np.ndarray  # bool [M] (host): micro-step m's refill writes a slot in some layer
  fill_M: np.ndarray  # bool [M] (host): micro-step m's placement differs from the base in some layer
  hold_M: np.ndarray  # bool [M] (host): micro-step m holds some slot's gradient
  direct_M: np.ndarray  # bool [M] (host): some tenure lasts micro-step m only
  flush_M: np.ndarray  # bool [M] (host): some held tenure ends after micro-step m
  capacity_M: tuple[int, ...]  # padded rows per (source, destination) of each micro-step: its need, bucketed
  held_rows: int  # H: rows of `held` per device and layer (a power of two, or the caller's capacity)
  moved_slots: int  # slots that differ from the base, summed over (m, l): gradient rows if each went back at once
  refilled_slots: int  # slots rewritten between consecutive micro-steps, summed over (m, l)
  flushed_slots: int  # tenures: gradient rows sent back to the base in the step
  held_tenures: int  # of them, those of two micro-steps or more: sent as float32 sums
  home_L: np.ndarray | None = None  # bool [L] (host): layer l's base is its home layout (no base transfer)
  # TableSizes.layout when the caller fixed the sizes: every micro-step runs that layout's full program
  layout: tuple[bool, bool] | None = None

  @property
  def num_micro_steps(self) -> int:
    return len(self.tables_M)

  @property
  def at_home(self) -> bool:
    """The base is the home layout in every layer: the step moves no expert weight into its base."""
    return self.home_L is not None and bool(np.all(self.home_L))

  @property
  def capacity(self) -> int:
    """The largest micro-step capacity: what one step-wide capacity would have to be."""
    return max(self.capacity_M)

  def place(self, mesh) -> "StepTables":
    """The table trees replicated over `mesh` (arrays already there stay as they are). Tables left on
    one device would be resliced onto the mesh by every micro-step's call: on 2 x H200 those copies,
    and the host slicing before them, left each GPU idle between micro-steps (BENCHMARKS.md)."""
    sharding = NamedSharding(mesh, P())
    if getattr(self.base_moves[0], "sharding", None) == sharding:  # placed together: one leaf tells
      return self  # a no-op device_put of every leaf still costs host time before the step
    names = ("tables_M", "base_moves", "fill_moves_M", "refill_moves_M", "hold_tables_M", "direct_moves_M",
             "flush_moves_M")
    placed = jax.device_put([getattr(self, name) for name in names], sharding)
    return dataclasses.replace(self, **dict(zip(names, placed)))


def stack_moves(tables: list[MoveTables]) -> MoveTables:
  return MoveTables(*(np.stack(leaves) for leaves in zip(*tables)))


def _tables_M(moves_MxL, num_devices: int, capacity: int, local_capacity: int) -> list[MoveTables]:
  return [stack_moves([move_tables(mv, num_devices, capacity, local_capacity) for mv in row]) for row in moves_MxL]


def _any_M(moves_MxL) -> np.ndarray:
  return np.array([any(len(f) for f in row) for row in moves_MxL])


def _total(moves_MxL) -> int:
  return sum(len(f) for row in moves_MxL for f in row)


def pair_need(plan, counts_MxLxDxE: np.ndarray) -> np.ndarray:
  """int [M, L]: the most rows one device sends another in each (micro-step, layer) under `plan`; its max
  over layers, bucketed (`micro_capacities`), is each micro-step's padded capacity."""
  slot_pairs = plan.slot_pairs(counts_MxLxDxE)  # [M, L, D_src, G]
  num_devices = plan.slot_expert.shape[2]
  return slot_pairs.reshape(*slot_pairs.shape[:3], num_devices, -1).sum(-1).max((2, 3), initial=0)


def _by_micro_step(spans: list[Tenure], entry, num_micro: int, num_layers: int, live: bool):
  """[M][L] lists of entry(tenure): in every micro-step of each tenure (live) or at its end."""
  out = [[[] for _ in range(num_layers)] for _ in range(num_micro)]
  for t in spans:
    for m in (range(t.start, t.end + 1) if live else (t.end,)):
      out[m][t.layer].append(entry(t))
  return out


def prepare_step(plan, counts_MxLxDxE: np.ndarray, num_experts: int, *, capacity: int | None = None,
                 sizes: TableSizes | None = None, fill_capacity: int | None = None, base_capacity: int | None = None,
                 base_local_capacity: int | None = None, held_capacity: int | None = None, mesh=None) -> StepTables:
  """Host: a planner `Plan` plus the step's routed counts -> StepTables.

  `capacity` fixes the padded rows per (source, destination) of every micro-step (default: each
  micro-step's exact need, bucketed by the plan's `capacity_buckets`: `pairs.micro_capacities`); it must
  cover the need, since dropping tokens would change the math. `fill_capacity` / `base_capacity`: rows
  one device may send another per micro-step fill (and direct return and flush: parts of a fill) / in the
  base transfer; by default the plan's need rounded up to a power of two (1 for "foremoe", whose budget is
  one slot per device); `base_local_capacity`: rows one device copies within itself in the base transfer
  (default: the plan's need, a power of two); `held_capacity`: held rows per device and layer (H; default:
  the most tenures of two micro-steps or more alive at once on one device, a power of two). Passing them
  fixes the tables' shapes across plans. `sizes` (`TableSizes`, e.g. `table_sizes(plan.config)`) fixes
  all of them and the layout: a plan they cannot hold is refused (ValueError). `mesh`: place the tables
  on it now, ahead of the step (else they stay on the host until the executor places them when the step
  starts).
  """
  num_micro, num_layers, num_devices, slots = plan.slot_expert.shape
  fixed = sizes or TableSizes(*(None,) * 7)
  fill_capacity = fill_capacity or fixed.fill
  held_capacity = fixed.held if held_capacity is None else held_capacity
  base_capacity, base_local_capacity = base_capacity or fixed.base, base_local_capacity or fixed.base_local
  base_list = [home_to_base_moves(plan.base[l], num_experts) for l in range(num_layers)]
  base_cap = base_capacity or table_rows(moves_needed, base_list, num_devices)
  fills = [[fill_moves(plan.slot_expert[m, l], plan.base[l]) for l in range(num_layers)] for m in range(num_micro)]
  if sizes is not None:
    _check_layout(sizes.layout, base_list, fills)
  previous = [plan.base] + [plan.slot_expert[m] for m in range(num_micro - 1)]
  refills = [[fill_moves(plan.slot_expert[m, l], plan.base[l], previous[m][l]) for l in range(num_layers)]
             for m in range(num_micro)]
  every = [f for row in fills + refills for f in row]
  fill_cap = fill_capacity or table_rows(moves_needed, every, num_devices)
  local_cap = fixed.fill_local or table_rows(local_copies_needed, every, num_devices)
  spans = tenures(fills)
  held = [t for t in spans if t.end > t.start]  # one-micro-step tenures go back from the gradient at once
  held_row, need_held = assign_held_rows(held)
  held_rows = capacity_power_of_two(max(1, need_held)) if held_capacity is None else held_capacity
  if held_rows < need_held:
    raise ValueError(f"held_capacity={held_rows} rows per device is below this step's {need_held} live tenures")
  holds = _by_micro_step(held, lambda t: (t.move[2], t.move[3], held_row[t]), num_micro, num_layers, True)
  directs = _by_micro_step([t for t in spans if t.end == t.start], lambda t: t.move, num_micro, num_layers, False)
  direct_list = [f for row in directs for f in row]
  direct_cap = fill_capacity or table_rows(moves_needed, direct_list, num_devices)
  direct_local = fixed.return_local or table_rows(local_copies_needed, direct_list, num_devices)
  # A flush reads held rows: the fill's moves with the held row as the written row.
  flushes = _by_micro_step(held, lambda t: (*t.move[:3], held_row[t]), num_micro, num_layers, False)
  # The flushes get their own (smaller) sizes: a slot kept over micro-steps sends its gradient once.
  flush_list = [f for row in flushes for f in row]
  flush_cap = fill_capacity or table_rows(moves_needed, flush_list, num_devices)
  flush_local = fixed.return_local or table_rows(local_copies_needed, flush_list, num_devices)
  base_local = base_local_capacity or table_rows(local_copies_needed, base_list, num_devices)
  base_moves = stack_moves([move_tables(m, num_devices, base_cap, base_local) for m in base_list])
  need_MxL = pair_need(plan, counts_MxLxDxE)
  need = int(need_MxL.max(initial=0))
  if capacity is not None and capacity < need:
    raise ValueError(f"capacity={capacity} rows per (source, destination) is below this step's need of {need}")
  capacity_M = (capacity,) * num_micro if capacity else tuple(
      int(c) for c in micro_capacities(need_MxL, plan.config.capacity_buckets))
  tables = plan_tables(plan.slot_expert, plan.slot_share, num_experts)
  hold_M = [HoldTables(*map(np.stack, zip(*(hold_tables(h, num_devices, held_rows) for h in row)))) for row in holds]
  step = StepTables([Tables(*(a[m] for a in tables)) for m in range(num_micro)], base_moves,
                    _tables_M(fills, num_devices, fill_cap, local_cap),
                    _tables_M(refills, num_devices, fill_cap, local_cap), hold_M,
                    _tables_M(directs, num_devices, direct_cap, direct_local),
                    _tables_M(flushes, num_devices, flush_cap, flush_local),
                    _any_M(refills), _any_M(fills), _any_M(holds), _any_M(directs), _any_M(flushes), capacity_M,
                    held_rows, _total(fills), _total(refills), len(spans), len(held),
                    np.array([not m for m in base_list]), fixed.layout)
  return step if mesh is None else step.place(mesh)


def _check_layout(layout: tuple[bool, bool], base_list, fills_MxL) -> None:
  """A fixed layout must hold the plan: a home base moves nothing into its base, a base never left has
  no fills."""
  at_home, filled = layout
  if at_home and any(base_list):
    raise ValueError(f"TableSizes.layout={layout} keeps the base at home, but this plan's base moves experts")
  if not filled and any(f for row in fills_MxL for f in row):
    raise ValueError(f"TableSizes.layout={layout} never leaves the base, but this plan's micro-steps do")


def gradient_rows(plan, num_experts: int) -> dict:
  """Host count of the expert-gradient rows a step sends back to its base (one row = one expert of one
  layer): "per_micro_step", every slot off the base after every micro-step (the schedule before
  deferred gradients); "per_tenure", once per tenure (this executor's returns); "held", those of tenures
  of two micro-steps or more (float32 sums; the others go in the weights' dtype); "_remote": those whose
  base row is on another device (the rest are local copies)."""
  num_micro, num_layers = plan.slot_expert.shape[:2]
  fills = [[fill_moves(plan.slot_expert[m, l], plan.base[l]) for l in range(num_layers)] for m in range(num_micro)]
  spans = tenures(fills)
  rows = {}
  for name, moves in (("per_micro_step", [mv for row in fills for f in row for mv in f]),
                      ("per_tenure", [t.move for t in spans]), ("held", [t.move for t in spans if t.end > t.start])):
    rows[name], rows[f"{name}_remote"] = len(moves), sum(mv[0] != mv[2] for mv in moves)
  return rows
