"""Micro-step executor: one optimizer step of M micro-steps, each under its own expert placement.

Two levels, as the plan has them:
1. the base: home expert weights -> the step's base placement (one transfer per step), and the first
   micro-step's working slots from the base, inside the first micro-step's program: layer l's rows
   arrive while the layers before it compute (XLA's collectives are asynchronous). A step whose
   micro-steps all keep the base placement computes on the base itself: no copy, no second set of slots.
2. each micro-step runs forward and backward on its working slots and adds the gradients to float32
   accumulators: those of a slot that holds its base row in the base layout, those of a slot the
   base -> working fill wrote in `held`, a few float32 rows per device (H, the most tenures alive at
   once there: `StepTables.held_rows`), where they stay while the slot keeps its expert (its tenure,
   one held row for its lifetime); when the tenure ends (the next micro-step's fill differs there, or
   the step ends) they go back to the base row it was copied from by the reverse exchange
   (`flush_rows`), so a replica kept for n micro-steps is fetched once and sends its gradient once.
   Between micro-steps only the slots whose expert changes are rewritten (`refill`), from the base; a
   micro-step whose placement equals the previous one in every layer skips it. With `prefetch` the
   next micro-step's refill runs inside the current micro-step's program, where it depends on nothing
   the compute produces, so XLA's scheduler may overlap its collectives with the compute.
3. inside the last micro-step's program: the accumulated base gradients go home through the transpose of
   the base transfer, then one optimizer update in the home layout, overlapped with that micro-step's
   backward. Parameters and optimizer state never see a placement.
A step whose base is the home layout in every layer (static policy, one device) moves no expert weight:
no base transfer; and when its micro-steps keep the base too, it is the plain step: the loss is
differentiated by the home weights, accumulators in the home layout, no transfer at all.
`Executor(fused=False)` runs the base transfer and the update in programs of their own (the measured
baseline of the fused schedule).
Placements are traced table values: a new plan never recompiles (the move tables' row counts are
powers of two), except between the three layouts above and the micro-step variants (which of refill,
hold, direct return and flush it runs). Tables made with `TableSizes` (what the RL trainer passes) fix
all of it for a run: one layout, one table shape, and every micro-step runs its layout's full program,
empty tables moving nothing, so the only programs a run meets are per position and padded capacity.
Each micro-step's padded all_to_all is sized to that micro-step's exact need, bucketed:
the routes are known before the step runs, so a balanced micro-step ships fewer rows; each bucket a
micro-step meets compiles its program once (jit's cache), a handful over a run.
The programs are traced in `step_programs.py` (`executor.programs`); this module runs them: which program
each micro-step runs with which tables, the host loop, and their compiling ahead (`precompile`).
"""
import concurrent.futures
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from foremoe_jax import contracts
from foremoe_jax.opt_state import init_sharded
from foremoe_jax.step_programs import PLAIN, LossFn, StepPrograms
from foremoe_jax.step_tables import StepTables
from foremoe_jax.transfer import check_exchange
from foremoe_jax.trees import accumulators


class Executor:
  """Runs optimizer steps and forward-only passes of a model over micro-steps with changing placements.

  The model meets `contracts.ExpertParallelModel` (checked here); the executor keeps its graph, never
  its state: `init(model)` gives (params, opt_state), and every step takes them and hands back new ones
  (`train_step` donates them), so the caller owns the state.
  prefetch: refill the next micro-step's changed slots inside the current micro-step's program, where
  XLA may overlap them with its compute, or (default) right before each micro-step (on GPU about half
  of a refill hid either way: BENCHMARKS.md, "numbers behind choices").
  exchange: how moved rows travel between devices (`transfer.EXCHANGES`): one "all_to_all" per move
  table (default), or "ppermute" rounds, every one ("ppermute_all") or the active ones, chosen by a
  `lax.cond`. all_to_all is the default because it was the fastest on GPU (BENCHMARKS.md): a cond waits
  for its predicate on the host, which stalls the host's run-ahead.
  fused (default): the base transfer runs inside the first micro-step's program and the update inside
  the last one's, overlapped with their compute; False: in programs of their own, `begin` and `finish`
  (the baseline the fused schedule is measured against).
  The model may be abstract (ShapeDtypeStruct values with shardings): `abstract_state` and `precompile`
  need no weights.
  """

  def __init__(self, model, tx: optax.GradientTransformation, loss_fn: LossFn, mesh, *, prefetch: bool = False,
               exchange: str = "all_to_all", fused: bool = True):
    check_exchange(exchange)
    contracts.check_model(model)
    self.programs = StepPrograms(model, tx, loss_fn, mesh, exchange)
    self.tx, self.mesh, self.prefetch, self.fused = tx, mesh, prefetch, fused
    self.abstract_state = self.programs.abstract_state  # (params, opt_state) as `init` makes them: shapes, shardings
    self._zeros = {}  # one zero-fill program per (tree structure, shardings)

  def init(self, model) -> tuple[Any, Any]:
    """(params, opt_state) of `model` (a model of this executor's graph): its parameters and a fresh
    optimizer state, each moment sharded as its parameter."""
    graphdef, params, _ = nnx.split(model, nnx.Param, ...)
    if graphdef != self.programs.graphdef:
      raise ValueError("Executor.init: the model's graph differs from the one the executor was built for")
    return params, init_sharded(self.tx, params, self.mesh)

  def model(self, params):
    """The model with `params` (sharing their arrays): for rollout or evaluation."""
    return nnx.merge(self.programs.graphdef, params, self.programs.rest)

  @staticmethod
  def layout(step: StepTables) -> tuple[bool, bool]:
    """(base is home in every layer, some micro-step leaves the base): which programs a step runs; fixed
    by the step's `TableSizes` when it has them."""
    return step.layout or (step.at_home, bool(step.fill_M.any()))

  def _schedule(self, step: StepTables, m: int, prefetch: bool | None):
    """The refill micro-step m runs and its tables: the next micro-step's behind this compute (prefetch)
    or this one's before it; None where that placement equals its predecessor in every layer (with fixed
    sizes: only where the layout never leaves the base)."""
    prefetch = self.prefetch if prefetch is None else prefetch
    target = m + 1 if prefetch else m
    runs = self.layout(step)[1] if step.layout else 0 < target < step.num_micro_steps and step.refill_M[target]
    if not (0 < target < step.num_micro_steps and runs):
      return None, step.refill_moves_M[0]  # right shapes, never read
    return ("after" if prefetch else "before"), step.refill_moves_M[target]

  def _micro_args(self, step: StepTables, m: int, prefetch: bool | None):
    """(tables, static keywords) of micro-step m's program: `StepPrograms.micro` takes them after its
    (params, base, working, acc, batch); `StepPrograms.forward` as `forward_args` leaves them. With fixed
    sizes a micro-step holds, returns and flushes wherever its layout leaves the base: no per-plan variants."""
    refill, moves = self._schedule(step, m, prefetch)
    tables = (step.tables_M[m], step.hold_tables_M[m], step.direct_moves_M[m], step.flush_moves_M[m], moves,
              step.base_moves, step.refill_moves_M[0])
    layout = self.layout(step)
    flags = (layout[1],) * 3 if step.layout else (step.hold_M[m], step.direct_M[m], step.flush_M[m])
    return tables, dict(capacity=step.capacity_M[m], refill=refill, filled=bool(flags[0]), direct=bool(flags[1]),
                        flushed=bool(flags[2]), first=self.fused and m == 0, layout=layout)

  @staticmethod
  def forward_args(tables, kw):
    """`_micro_args`' (tables, static keywords) as `StepPrograms.forward` takes them: without the gradients' own
    (hold, direct and flush tables, and their flags)."""
    return (tables[0], *tables[4:]), {k: v for k, v in kw.items() if k not in ("filled", "direct", "flushed")}

  def zero_accumulators(self, tree):
    """accumulators(tree), each array zero-filled on its own devices. Eagerly, jnp.zeros_like of a
    sharded array fills the whole array on one device and then copies the shards out: on 2 x H200,
    peer copies of every accumulator (on GPU 0's copy engine, BENCHMARKS.md) before each step's first micro-step."""
    return self._zeros_program(tree)(tree)

  def _zeros_program(self, tree):
    shardings = jax.tree.map(lambda a: a.sharding, tree)
    key = (jax.tree.structure(tree), tuple(jax.tree.leaves(shardings)))
    if key not in self._zeros:
      self._zeros[key] = jax.jit(accumulators, out_shardings=shardings)
    return self._zeros[key]

  def _start(self, params, micro_batches, step: StepTables):
    """(base, working slots, acc) before the first micro-step: () when the first micro-step's program
    builds them (fused) or the step is plain; else `begin`'s output and zero accumulators."""
    if len(micro_batches) != step.num_micro_steps:
      raise ValueError(f"{len(micro_batches)} micro-batches for a plan of {step.num_micro_steps} micro-steps")
    layout = self.layout(step)
    if self.fused:
      return (), (), ()
    base, working = (), ()
    if layout != PLAIN:
      base, working = self.programs.begin(params, step.base_moves, step.refill_moves_M[0], layout=layout)
    return base, working, self.zero_accumulators(self.programs.state(layout, step.held_rows)[2])

  def accumulate(self, params, micro_batches: list[Any], step: StepTables, *, prefetch: bool | None = None,
                 stage_done: Callable[[str, Any], None] | None = None):
    """Forward and backward of every micro-step; returns (accumulators, losses, metrics): (dense, base
    layout) gradients (the last micro-step flushed every held slot), or the home-layout parameters' for a
    plain step (`layout(step) == PLAIN`). `stage_done(name, value)`, if given, sees each stage's output
    ("begin", "micro") as it is issued."""
    *_, acc, losses, metrics, _ = self._accumulate(params, None, micro_batches, step.place(self.mesh), prefetch,
                                                   stage_done)
    return (acc if self.layout(step) == PLAIN else acc[:2]), losses, metrics

  def _accumulate(self, params, opt_state, micro_batches, step, prefetch, stage_done):
    """The step's micro-steps; given `opt_state`, the optimizer update too (in the last micro-step's
    program when fused). Returns (params, opt_state, acc, losses, metrics, grad_norm): acc is () and
    (params, opt_state, grad_norm) the updated ones after an update."""
    stage_done, update, programs = stage_done or (lambda name, value: None), opt_state is not None, self.programs
    base, working, acc = self._start(params, micro_batches, step)
    stage_done("begin", working)  # () when fused: the first micro-step's program builds them
    losses, metrics, grad_norm, last = [], [], None, step.num_micro_steps - 1
    for m, batch in enumerate(micro_batches):
      tables, kw = self._micro_args(step, m, prefetch)
      if update and self.fused and m == last:
        params, opt_state, grad_norm, loss, met = programs.last(params, opt_state, base, working, acc, batch, *tables,
                                                                **kw)
        acc = ()
      else:
        acc, built, working, loss, met = programs.micro(params, base, working, acc, batch, *tables, **kw)
        base = built if kw["first"] else base
      stage_done("micro", acc)
      losses.append(loss)
      metrics.append(met)
    if update and not self.fused:
      params, opt_state, grad_norm = programs.finish(params, opt_state, acc, step.base_moves, layout=self.layout(step))
      acc = ()
    if update:
      stage_done("finish", params)
    return params, opt_state, acc, losses, metrics, grad_norm

  def precompile(self, micro_batches: list[Any], step: StepTables, *, programs=("train",),
                 prefetch: bool | None = None, workers: int = 8) -> dict:
    """Compiles, before `step` runs, the programs that `train_step` ("train") and `forward` ("forward")
    run for it, `workers` at a time, lowered for `abstract_state`: no weights needed. A step's capacities
    are known ahead, so a new one need not compile inside the step, one program after another. Lowering
    runs here (it holds the GIL); XLA compiles in threads. Compiled programs land in jit's caches, so the
    step itself compiles nothing; programs compiled before cost a cache lookup.
    Returns {"programs", "lower_s", "compile_s"}."""
    if unknown := set(programs) - {"train", "forward"}:
      raise ValueError(f"precompile programs must be 'train' and/or 'forward', got {sorted(unknown)}")
    step, tic = step.place(self.mesh), time.perf_counter()
    layout, (params, opt_state) = self.layout(step), self.abstract_state
    state = self.programs.state(layout, step.held_rows)  # what one micro-step's program hands the next (constrained)
    train, lowered, seen = "train" in programs, [], set()
    if not self.fused:
      if layout != PLAIN:
        lowered.append(self.programs.begin.lower(params, step.base_moves, step.refill_moves_M[0], layout=layout))
      if train:
        lowered += [self._zeros_program(state[2]).lower(state[2]),
                    self.programs.finish.lower(params, opt_state, state[2], step.base_moves, layout=layout)]
    for m, batch in enumerate(micro_batches):
      tables, kw = self._micro_args(step, m, prefetch)
      base, working, acc = ((), (), ()) if kw["first"] else state
      last = self.fused and m == step.num_micro_steps - 1
      forward_tables, forward_kw = self.forward_args(tables, kw)
      if "forward" in programs and ("forward", *forward_kw.values()) not in seen:
        seen.add(("forward", *forward_kw.values()))
        lowered.append(self.programs.forward.lower(params, base, working, batch, *forward_tables, **forward_kw))
      if train and ("train", last, *kw.values()) not in seen:
        seen.add(("train", last, *kw.values()))
        args = (params, *((opt_state,) if last else ()), base, working, acc, batch, *tables)
        lowered.append((self.programs.last if last else self.programs.micro).lower(*args, **kw))
    lower_s, tic = time.perf_counter() - tic, time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
      list(pool.map(lambda program: program.compile(), lowered))
    return {"programs": len(lowered), "lower_s": lower_s, "compile_s": time.perf_counter() - tic}

  def train_step(self, params, opt_state, micro_batches: list[Any], step: StepTables, *,
                 prefetch: bool | None = None, stage_done: Callable[[str, Any], None] | None = None):
    """One optimizer step: M micro-steps (micro-step m under placement m), one update. Returns (params,
    opt_state, metrics); `params` and `opt_state` are donated (their buffers become the new ones'): keep
    a copy (`trees.copy`) to step from them again."""
    params, opt_state, _, losses, metrics, grad_norm = self._accumulate(
        params, opt_state, micro_batches, step.place(self.mesh), prefetch, stage_done)
    return params, opt_state, {"loss": sum(map(float, losses)),  # host sums: nothing to compile
                               "grad_norm": float(grad_norm),
                               "metrics": jax.tree.map(lambda *x: jnp.stack(x), *metrics)}  # multi-process safe

  def forward(self, params, micro_batches: list[Any], step: StepTables, *,
              prefetch: bool | None = None) -> list[tuple[jax.Array, dict]]:
    """Forward only (the recompute stage): (loss, metrics) of every micro-step under its placement."""
    step = step.place(self.mesh)
    base, working, _ = self._start(params, micro_batches, step)
    outs = []
    for m, batch in enumerate(micro_batches):
      tables, kw = self.forward_args(*self._micro_args(step, m, prefetch))
      out, built, working = self.programs.forward(params, base, working, batch, *tables, **kw)
      base = built if kw["first"] else base
      outs.append(out)
    return outs

  def gradients(self, params, micro_batches: list[Any], step: StepTables, *, prefetch: bool | None = None):
    """The step's accumulated gradients of the home-layout parameters, without an update."""
    step = step.place(self.mesh)
    acc = self._accumulate(params, None, micro_batches, step, prefetch, None)[2]
    return acc if self.layout(step) == PLAIN else self.programs.home_grads(params, acc, step.base_moves)
