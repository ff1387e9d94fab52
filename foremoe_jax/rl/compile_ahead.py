"""Compiling an RL stage's programs before it runs, `rl.compile_workers` at a time (`Executor.precompile`),
instead of one by one inside the stage: each recompute or update program of a new padded capacity takes
tens of seconds for a large model on a GPU. The capacities are known before the stage (the routes are),
so the stage itself compiles nothing.
"""
import dataclasses
import logging

import jax

from foremoe_jax.executor import Executor

log = logging.getLogger(__name__)


def _key(tables, batches) -> tuple:
  """What decides the programs a group runs (jit's cache keys, with the program): its capacities and
  layout (tables with fixed `TableSizes` run every micro-step's full program) and the arguments'
  structure, shapes, dtypes and shardings."""
  leaves, treedef = jax.tree.flatten((batches, tables.tables_M, tables.base_moves, tables.fill_moves_M,
                                      tables.refill_moves_M, tables.hold_tables_M, tables.direct_moves_M,
                                      tables.flush_moves_M))
  return (tables.capacity_M, Executor.layout(tables), treedef,
          tuple((x.shape, x.dtype, getattr(x, "sharding", None)) for x in leaves))


class CompileAhead:
  """Compiles the programs of an executor's stages ahead, and remembers what it met: `capacities`, the
  padded capacities of earlier steps (each compiled its programs once), and `compiled`, the groups."""

  def __init__(self, executor: Executor):
    self.executor = executor
    self.capacities = set()  # the padded capacities met in earlier steps
    self.compiled = set()  # (program, _key) of the groups compiled so far

  def __call__(self, step: int, batches: list[dict], tables, programs, met_this_step: list, *, workers: int) -> None:
    """The `programs` a stage will run for `tables` and `batches` (abstract: as the stage will pass them)
    compile before it, `workers` at a time (0: each compiles when first called). A known capacity can
    still meet a new variant (another micro-step count), so every group is checked, by what decides its
    programs (`_key`): a group seen before is skipped, since precompiling known programs still lowers
    them (~15 ms a group on the CI box, on the dispatch thread). New capacities are named before the wait."""
    new = sorted(set(tables.capacity_M) - self.capacities - set(met_this_step))
    met_this_step += tables.capacity_M
    if new:
      log.info("step %d: compiling %s programs for new padded capacities %s", step, "/".join(programs), new)
    if not workers:
      return
    # A new capacity compiles at every micro-step position at once (first, middle, last): a later group
    # of known capacities in another order then meets compiled programs only.
    groups = [tables, *(dataclasses.replace(tables, capacity_M=(c,) * len(tables.capacity_M)) for c in new)]
    report = dict(programs=0, lower_s=0.0, compile_s=0.0)
    for group in groups:
      key = _key(group, batches)
      todo = tuple(p for p in programs if (p, key) not in self.compiled)
      if todo:
        self.compiled.update((p, key) for p in todo)
        # The reference's forward runs the policy's programs (same executor, same shapes): compiled here too.
        done = self.executor.precompile(batches, group, programs=todo, workers=workers)
        report = {k: report[k] + done[k] for k in report}
    if new:
      log.info("step %d: %d programs ready: lowering %.1f s, then XLA in %d threads %.1f s", step,
               report["programs"], report["lower_s"], workers, report["compile_s"])

  def end_step(self, met_this_step: list) -> list[int]:
    """The padded capacities first met in this step (their programs compiled in it), known from now on."""
    new = sorted(set(met_this_step) - self.capacities)
    self.capacities.update(met_this_step)
    return new
