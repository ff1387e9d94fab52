"""The StepTables an RL run's mini-batches run under: a plan's, or the home layout's, at the run's sizes.

With `rl.table_sizes="fixed"` every table has one `TableSizes` for the whole run (the planner's bounds;
the base rows raised, from then on, to the first plan that needs more), so no plan compiles new
programs, and a mini-batch recomputed in the home layout runs the plans' programs (its moves empty).
The home layout depends on the counts only through the padded capacities: its plan and tables are made
once per micro-step count and given each mini-batch's capacities.
"""
import dataclasses
import logging

import numpy as np

from foremoe_jax.planner import PlanConfig, plan_step
from foremoe_jax.planner.pairs import micro_capacities
from foremoe_jax.step_tables import base_pair_need, capacity_power_of_two, pair_need, prepare_step, table_sizes

log = logging.getLogger(__name__)


class RunTables:
  """Makes a run's StepTables: `sizes` (None when each plan sizes its own tables) and the home layout's,
  cached by micro-step count (`home`)."""

  def __init__(self, plan_cfg: PlanConfig, mesh, *, base_rows: int, fixed: bool):
    self.plan_cfg, self.mesh = plan_cfg, mesh
    # One table shape and layout for the whole run (the planner's bounds): no plan compiles new programs.
    self.sizes = table_sizes(plan_cfg, base_rows) if fixed else None
    self.home = {}  # micro-steps -> (home plan, its placed StepTables)

  def for_plan(self, step: int, plan, counts_MxLxDxE):
    """StepTables of `plan` for these counts (the cached home tables when the plan is the home layout)."""
    self.fit_base(step, plan)
    home_plan, _ = self.home_layout(counts_MxLxDxE)
    if all(np.array_equal(getattr(plan, f), getattr(home_plan, f)) for f in ("slot_expert", "slot_share", "base")):
      return self.home_tables(counts_MxLxDxE)
    return prepare_step(plan, counts_MxLxDxE, self.plan_cfg.num_experts, sizes=self.sizes, mesh=self.mesh)

  def fit_base(self, step: int, plan) -> None:
    """Raises the run's base rows (`rl.base_rows`) to a plan's need (a power of two) where it needs more;
    the home tables are remade at the new size."""
    need = base_pair_need(plan, self.plan_cfg.num_experts)
    if self.sizes is not None and need > self.sizes.base:
      rows = min(self.plan_cfg.slots_per_device, capacity_power_of_two(need))
      log.warning("rl step %d: a base needs %d rows per device pair, rl.base_rows allows %d: %d from now on (its "
                  "programs compile)", step, need, self.sizes.base, rows)
      self.sizes, self.home = self.sizes._replace(base=rows), {}

  def home_layout(self, counts_MxLxDxE):
    """(home plan, its placed StepTables) for this many micro-steps, made once: neither depends on the
    counts but through the padded capacities, which `home_tables` sets. The tables have the run's sizes
    and layout, so a home recompute runs the programs of the plans' (empty moves)."""
    num_micro = counts_MxLxDxE.shape[0]
    if num_micro not in self.home:
      cfg = dataclasses.replace(self.plan_cfg, policy="static")
      plan = plan_step(counts_MxLxDxE, cfg)
      self.home[num_micro] = plan, prepare_step(plan, counts_MxLxDxE, cfg.num_experts, sizes=self.sizes,
                                                mesh=self.mesh)
    return self.home[num_micro]

  def home_tables(self, counts_MxLxDxE):
    """StepTables of the home layout (the static policy's) for these counts: the cached tables with the
    counts' padded capacities."""
    plan, tables = self.home_layout(counts_MxLxDxE)
    need_MxL = pair_need(plan, counts_MxLxDxE)
    capacity_M = tuple(int(c) for c in micro_capacities(need_MxL, self.plan_cfg.capacity_buckets))
    return dataclasses.replace(tables, capacity_M=capacity_M)
