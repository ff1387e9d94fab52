"""Micro-step executor: one optimizer step of M micro-steps, each under its own expert placement.

Two levels, as the plan has them:
1. `begin`: home expert weights -> the step's base placement (one transfer per step), and the first
   micro-step's working slots from the base. A step whose micro-steps all keep the base placement
   computes on the base itself: no copy and no second set of slots in memory.
2. each micro-step runs forward and backward on its working slots and adds the gradients to
   accumulators kept in the base layout: a working slot's gradient goes back to the base slot it was
   copied from through the transpose of the base -> working fill (the reverse exchange).
   Between micro-steps only the slots whose expert changes are rewritten (`refill`), from the base; a
   micro-step whose placement equals the previous one in every layer skips it. With `prefetch` the
   next micro-step's refill runs inside the current micro-step's program, where it depends on nothing
   the compute produces, so XLA's scheduler may overlap its collectives with the compute.
3. `finish`: the accumulated base gradients go home through the transpose of the base transfer, then one
   optimizer update in the home layout. Parameters and optimizer state never see a placement.
Placements are traced table values: a new plan never recompiles (the move tables' row counts are
powers of two). Each micro-step's padded all_to_all is sized to that micro-step's exact need, bucketed:
the routes are known before the step runs, so a balanced micro-step ships fewer rows; each bucket a
micro-step meets compiles its program once (jit's cache), a handful over a run.
"""
import concurrent.futures
import dataclasses
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from foremoe_jax.placement import Tables, plan_tables
from foremoe_jax.planner.pairs import micro_capacities
from foremoe_jax.transfer import (MoveTables, apply_moves, apply_moves_transpose, check_exchange, fill_moves,
                                  home_to_base, home_to_base_moves, home_to_base_transpose, local_copies_needed,
                                  move_tables, moves_needed)

# loss_fn(model, batch, *, tables, working, capacity) -> (scalar loss, metrics dict)
LossFn = Callable[..., tuple[jax.Array, dict]]

def capacity_power_of_two(n: int) -> int:
  return 1 << max(0, n - 1).bit_length()


def table_rows(needed, moves_lists, num_devices: int) -> int:
  """Rows a move table needs to hold every list of moves: the largest `needed(moves, D)`
  (`moves_needed` or `local_copies_needed`), at least 1, up to a power of two (few compiled shapes)."""
  return capacity_power_of_two(max(1, max((needed(m, num_devices) for m in moves_lists), default=0)))


@dataclasses.dataclass(frozen=True)
class StepTables:
  """Everything one optimizer step needs about placements, plus static sizes. The table trees come
  one per micro-step, so the host loop never slices a device array between micro-steps."""
  tables_M: list[Tables]  # per micro-step: [L, ...] dispatch tables
  base_moves: MoveTables  # [L, ...] home -> base
  fill_moves_M: list[MoveTables]  # per micro-step: [L, ...] base -> its working slots (gradients go back)
  refill_moves_M: list[MoveTables]  # per micro-step m: [L, ...] m-1's working slots -> m's (m = 0: the base)
  refill_M: np.ndarray  # bool [M] (host): micro-step m's refill writes a slot in some layer
  fill_M: np.ndarray  # bool [M] (host): micro-step m's placement differs from the base in some layer
  capacity_M: tuple[int, ...]  # padded rows per (source, destination) of each micro-step: its need, bucketed
  moved_slots: int  # slots that differ from the base, summed over (m, l)
  refilled_slots: int  # slots rewritten between consecutive micro-steps, summed over (m, l)

  @property
  def num_micro_steps(self) -> int:
    return len(self.tables_M)

  @property
  def capacity(self) -> int:
    """The largest micro-step capacity: what one step-wide capacity would have to be."""
    return max(self.capacity_M)

  def place(self, mesh) -> "StepTables":
    """The table trees replicated over `mesh` (arrays already there stay as they are). Tables left on
    one device would be resliced onto the mesh by every micro-step's call: on 2 x H200 those copies,
    and the host slicing before them, left each GPU idle ~15 ms per step."""
    sharding = NamedSharding(mesh, P())
    if getattr(self.base_moves[0], "sharding", None) == sharding:  # placed together: one leaf tells
      return self  # a no-op device_put of every leaf still costs ~2 ms of host time before the step
    trees = (self.tables_M, self.base_moves, self.fill_moves_M, self.refill_moves_M)
    tables_M, base_moves, fill_moves_M, refill_moves_M = jax.device_put(trees, sharding)
    return dataclasses.replace(self, tables_M=tables_M, base_moves=base_moves, fill_moves_M=fill_moves_M,
                               refill_moves_M=refill_moves_M)


def stack_moves(tables: list[MoveTables]) -> MoveTables:
  return MoveTables(*(np.stack(leaves) for leaves in zip(*tables)))


def _tables_M(moves_MxL, num_devices: int, capacity: int, local_capacity: int) -> list[MoveTables]:
  return [stack_moves([move_tables(mv, num_devices, capacity, local_capacity) for mv in row]) for row in moves_MxL]


def prepare_step(plan, counts_MxLxDxE: np.ndarray, num_experts: int, *, capacity: int | None = None,
                 fill_capacity: int | None = None, base_capacity: int | None = None,
                 base_local_capacity: int | None = None, mesh=None) -> StepTables:
  """Host: a planner `Plan` plus the step's routed counts -> StepTables.

  `capacity` fixes the padded rows per (source, destination) of every micro-step (default: each
  micro-step's exact need, bucketed by the plan's `capacity_buckets`: `pairs.micro_capacities`); it must
  cover the need, since dropping tokens would change the math. `fill_capacity` / `base_capacity`: rows
  one device may send another per micro-step fill / in the base transfer; by default the plan's need
  rounded up to a power of two (1 for "foremoe", whose budget is one slot per device);
  `base_local_capacity`: rows one device copies within itself in the base transfer (default: the plan's
  need, a power of two). Passing them fixes the tables' shapes across plans.
  `mesh`: place the tables on it now, ahead of the step (else they stay on the host until the executor
  places them when the step starts).
  """
  num_micro, num_layers, num_devices, slots = plan.slot_expert.shape
  base_list = [home_to_base_moves(plan.base[l], num_experts) for l in range(num_layers)]
  base_cap = base_capacity or table_rows(moves_needed, base_list, num_devices)
  fills = [[fill_moves(plan.slot_expert[m, l], plan.base[l]) for l in range(num_layers)] for m in range(num_micro)]
  previous = [plan.base] + [plan.slot_expert[m] for m in range(num_micro - 1)]
  refills = [[fill_moves(plan.slot_expert[m, l], plan.base[l], previous[m][l]) for l in range(num_layers)]
             for m in range(num_micro)]
  every = [f for row in fills + refills for f in row]
  fill_cap = fill_capacity or table_rows(moves_needed, every, num_devices)
  local_cap = table_rows(local_copies_needed, every, num_devices)
  base_local = base_local_capacity or table_rows(local_copies_needed, base_list, num_devices)
  base_moves = stack_moves([move_tables(m, num_devices, base_cap, base_local) for m in base_list])
  slot_pairs = plan.slot_pairs(counts_MxLxDxE)  # [M, L, D_src, G]
  need_MxL = slot_pairs.reshape(*slot_pairs.shape[:3], num_devices, -1).sum(-1).max((2, 3), initial=0)
  need = int(need_MxL.max(initial=0))
  if capacity is not None and capacity < need:
    raise ValueError(f"capacity={capacity} rows per (source, destination) is below this step's need of {need}")
  capacity_M = (capacity,) * num_micro if capacity else tuple(
      int(c) for c in micro_capacities(need_MxL, plan.config.capacity_buckets))
  tables = plan_tables(plan.slot_expert, plan.slot_share, num_experts)
  step = StepTables([Tables(*(a[m] for a in tables)) for m in range(num_micro)], base_moves,
                    _tables_M(fills, num_devices, fill_cap, local_cap),
                    _tables_M(refills, num_devices, fill_cap, local_cap),
                    np.array([any(len(f) for f in row) for row in refills]),
                    np.array([any(len(f) for f in row) for row in fills]),
                    capacity_M, sum(len(f) for row in fills for f in row),
                    sum(len(f) for row in refills for f in row))
  return step if mesh is None else step.place(mesh)


def expert_weights(model) -> list[tuple[jax.Array, jax.Array]]:
  return [(layer.w_gate_up[...], layer.w_down[...]) for layer in model.moe_layers()]


def expert_weight_filter(model):
  """nnx filter of the MoE layers' home expert weights. The loss reads working slots instead, so their
  gradients come only through the base transfer's transpose: a float32 accumulator for the loss's zeros
  would double the accumulators' memory."""
  layers = {id(layer) for layer in model.moe_layers()}
  paths = {(*path, name) for path, node in nnx.iter_graph(model) if id(node) in layers
           for name in ("w_gate_up", "w_down")}
  return lambda path, _: tuple(path) in paths


def replicate_unsharded(tree, mesh):
  """Puts leaves that live on fewer devices than the mesh (e.g. optimizer step counts) on all of it,
  so a restored or freshly initialized state mixes with mesh-sharded parameters in one jit."""
  devices = set(mesh.devices.flat)

  def place(x):
    if set(x.sharding.device_set) == devices:
      return x
    return jax.device_put(x, NamedSharding(mesh, P()))
  return jax.tree.map(place, tree)


def accumulators(tree):
  """Zeros like `tree`, float32 (or wider) for floating leaves: micro-step gradients of bf16 weights
  summed in bf16 would lose bits with every micro-step, and differently per placement."""
  def zeros(a):
    dtype = jnp.promote_types(a.dtype, jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a.dtype
    return jnp.zeros_like(a, dtype=dtype)
  return jax.tree.map(zeros, tree)


def _abstract(tree):
  """Shape, dtype and sharding of each leaf: what a program is lowered for."""
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)


def index(tree, i):
  return jax.tree.map(lambda a: a[i], tree)


class Executor:
  """Runs optimizer steps and forward-only passes of a model (`__call__(..., tables, replay, capacity=,
  working=)` and `moe_layers()`) over micro-steps with changing placements.

  prefetch: refill the next micro-step's changed slots inside the current micro-step's program, where
  XLA may overlap them with its compute, or (default) right before each micro-step. Measured on
  4 x H200 (BENCHMARKS.md) about half of a refill hid either way; the prefetch added 0-24 points.
  exchange: how moved rows travel between devices (`transfer.EXCHANGES`): one "all_to_all" per move
  table (default), or "ppermute" rounds, every one ("ppermute_all") or the active ones, chosen by a
  `lax.cond`. Measured on 4 x H200 (BENCHMARKS.md), the all_to_all step was 3% faster than the
  ppermute rounds with the cond and 1.5% faster than without it: on GPU a cond waits for its
  predicate on the host, which stalls the host's run-ahead.
  """

  def __init__(self, model, tx: optax.GradientTransformation, loss_fn: LossFn, mesh, *, prefetch: bool = False,
               exchange: str = "all_to_all"):
    check_exchange(exchange)
    self.graphdef, self.params, self.rest = nnx.split(model, nnx.Param, ...)
    self.tx, self.loss_fn, self.mesh, self.prefetch, self.exchange = tx, loss_fn, mesh, prefetch, exchange
    self.opt_state = replicate_unsharded(jax.jit(tx.init)(self.params), mesh)
    layer = model.moe_layers()[0]
    self.slots_per_device, self.home_rows = layer.slots, layer.cfg.num_experts // layer.num_devices
    self._is_expert = expert_weight_filter(model)
    self._begin = jax.jit(self._begin_fn, static_argnames="filled")
    self._micro = jax.jit(self._micro_fn, static_argnames=("capacity", "refill", "filled"),
                          donate_argnames=("working", "acc"))
    self._forward = jax.jit(self._forward_fn, static_argnames=("capacity", "refill"), donate_argnames="working")
    # The update hands back parameters and optimizer state sharded as it got them: left to XLA, a leaf
    # could come back sharded otherwise, and the next step's update would compile a second program.
    state_shardings = jax.tree.map(lambda a: a.sharding, (self.params, self.opt_state))
    self._finish = jax.jit(self._finish_fn, donate_argnums=(0, 1, 2),
                           out_shardings=(*state_shardings, NamedSharding(mesh, P())))
    self._home_grads = jax.jit(self._home_grads_fn)
    self._zeros = {}  # one zero-fill program per (tree structure, shardings)

  def model(self):
    return nnx.merge(self.graphdef, self.params, self.rest)

  # --- traced pieces -------------------------------------------------------------------------------
  def _split(self, params):
    """(dense, experts): the parameters the loss is differentiated by, and the home expert weights."""
    return params.split(nnx.Not(self._is_expert), ...)

  def _to_base(self, home, base_moves):
    return [home_to_base(h, index(base_moves, l), self.mesh, self.slots_per_device, self.exchange)
            for l, h in enumerate(home)]

  def _refill(self, base, working, moves, prefetch=False):
    exchange = "ppermute_all" if prefetch and self.exchange == "ppermute" else self.exchange
    return [apply_moves(b, w, index(moves, l), self.mesh, exchange) for l, (b, w) in enumerate(zip(base, working))]

  def _begin_fn(self, params, base_moves, first_refill, *, filled):
    """(base, first working slots); the working slots are None when no micro-step leaves the base."""
    base = self._to_base(expert_weights(nnx.merge(self.graphdef, params, self.rest)), base_moves)
    return base, (self._refill(base, base, first_refill) if filled else None)

  def _loss(self, dense, experts, working, batch, tables, capacity):
    model = nnx.merge(self.graphdef, dense, experts, self.rest)
    return self.loss_fn(model, batch, tables=tables, working=working, capacity=capacity)

  def _around_refill(self, base, working, refill_moves, refill, compute):
    """compute(working) with the refill: "before" (this micro-step's changed slots first), "after" (the
    next micro-step's, independent of this compute: the prefetch) or None. Returns (out, working)."""
    if refill == "before":
      working = self._refill(base, working, refill_moves)
    out = compute(working)
    if refill == "after":
      working = self._refill(base, working, refill_moves, prefetch=True)
    return out, working

  def _micro_fn(self, params, base, working, batch, tables, fill, refill_moves, acc, *, capacity, refill, filled):
    """One micro-step's gradients added to acc. filled: the placement differs from the base (else the
    working slots' gradients are the base's). Returns (acc, working, loss, metrics)."""
    def compute(working):
      grad_fn = jax.value_and_grad(self._loss, argnums=(0, 2), has_aux=True)
      (loss, metrics), (grad_dense, grad_working) = grad_fn(*self._split(params), working, batch, tables, capacity)
      # Working slots hold base rows (copied by `fill`): their gradients go back through its transpose.
      grad_base = grad_working if not filled else [apply_moves_transpose(g, None, index(fill, l), self.mesh,
                                                                         self.exchange)
                                                   for l, g in enumerate(grad_working)]
      return jax.tree.map(jnp.add, acc, (grad_dense, grad_base)), loss, metrics

    (acc, loss, metrics), working = self._around_refill(base, working, refill_moves, refill, compute)
    return acc, working, loss, metrics

  def _forward_fn(self, params, base, working, batch, tables, refill_moves, *, capacity, refill):
    return self._around_refill(base, working, refill_moves, refill,
                               lambda working: self._loss(*self._split(params), working, batch, tables, capacity))

  def _home_grads_fn(self, params, acc, base_moves):
    """Accumulated (dense, base) gradients -> gradients of the home-layout parameters (float32)."""
    grad_dense, grad_base = acc
    grad_home = [home_to_base_transpose(g, index(base_moves, l), self.mesh, self.home_rows, self.exchange)
                 for l, g in enumerate(grad_base)]
    # merge shares Variables with its states: a copy of the experts' keeps set_value below off `params`
    grad_model = nnx.merge(self.graphdef, grad_dense, jax.tree.map(lambda w: w, self._split(params)[1]), self.rest)
    for layer, (g_gate_up, g_down) in zip(grad_model.moe_layers(), grad_home):
      layer.w_gate_up.set_value(g_gate_up)
      layer.w_down.set_value(g_down)
    return nnx.state(grad_model, nnx.Param)

  def _finish_fn(self, params, opt_state, acc, base_moves):
    grads = self._home_grads_fn(params, acc, base_moves)
    updates, opt_state = self.tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, optax.global_norm(grads)

  # --- host loop -----------------------------------------------------------------------------------
  def _schedule(self, step: StepTables, m: int, prefetch: bool | None):
    """The refill micro-step m runs and its tables: the next micro-step's behind this compute (prefetch)
    or this one's before it; None where that placement equals its predecessor in every layer."""
    prefetch = self.prefetch if prefetch is None else prefetch
    target = m + 1 if prefetch else m
    if not 0 < target < step.num_micro_steps or not step.refill_M[target]:
      return None, step.refill_moves_M[0]  # right shapes, never read
    return ("after" if prefetch else "before"), step.refill_moves_M[target]

  def zero_accumulators(self, tree):
    """accumulators(tree), each array zero-filled on its own devices. Eagerly, jnp.zeros_like of a
    sharded array fills the whole array on one device and then copies the shards out: on 2 x H200,
    48 peer copies of up to 818 MB (25 ms of GPU 0's copy engine) before each step's first micro-step."""
    return self._zeros_program(tree)(tree)

  def _zeros_program(self, tree):
    shardings = jax.tree.map(lambda a: a.sharding, tree)
    key = (jax.tree.structure(tree), tuple(jax.tree.leaves(shardings)))
    if key not in self._zeros:
      self._zeros[key] = jax.jit(accumulators, out_shardings=shardings)
    return self._zeros[key]

  def _start(self, micro_batches, step: StepTables):
    """(base, working slots). A step whose micro-steps all keep the base placement computes on the base
    itself: no copy, no second set of slots in memory; the base is then handed over (donated) to the
    first micro-step and returned as () here, since nothing reads it again (no refills)."""
    if len(micro_batches) != step.num_micro_steps:
      raise ValueError(f"{len(micro_batches)} micro-batches for a plan of {step.num_micro_steps} micro-steps")
    filled = bool(step.fill_M.any())
    base, working = self._begin(self.params, step.base_moves, step.refill_moves_M[0], filled=filled)
    return (base, working) if filled else ((), base)

  def accumulate(self, micro_batches: list[Any], step: StepTables, *, prefetch: bool | None = None,
                 stage_done: Callable[[str, Any], None] | None = None):
    """Forward and backward of every micro-step; returns (base-layout accumulators, losses, metrics).
    `stage_done(name, value)`, if given, sees each stage's output ("begin", "micro") as it is issued."""
    return self._accumulate(micro_batches, step.place(self.mesh), prefetch, stage_done)

  def _accumulate(self, micro_batches, step, prefetch, stage_done):
    stage_done = stage_done or (lambda name, value: None)
    base, working = self._start(micro_batches, step)
    stage_done("begin", working)
    acc = self.zero_accumulators((self._split(self.params)[0], working))  # the base's shapes, still alive
    losses, metrics = [], []
    for m, batch in enumerate(micro_batches):
      refill, moves = self._schedule(step, m, prefetch)
      acc, working, loss, met = self._micro(self.params, base, working, batch, step.tables_M[m],
                                            step.fill_moves_M[m], moves, acc, capacity=step.capacity_M[m],
                                            refill=refill, filled=bool(step.fill_M[m]))
      stage_done("micro", acc)
      losses.append(loss)
      metrics.append(met)
    return acc, losses, metrics

  def precompile(self, micro_batches: list[Any], step: StepTables, *, programs=("train",),
                 prefetch: bool | None = None, workers: int = 8) -> dict:
    """Compiles, before `step` runs, the programs that `train_step` ("train") and `forward` ("forward")
    run for it, `workers` at a time. A step's capacities are known ahead, so a new one need not compile
    inside the step, one program after another. Lowering runs here (it holds the GIL); XLA compiles in
    threads. Compiled programs land in jit's caches, so the step itself compiles nothing; programs
    compiled before cost a cache lookup. Returns {"programs", "lower_s", "compile_s"}."""
    if unknown := set(programs) - {"train", "forward"}:
      raise ValueError(f"precompile programs must be 'train' and/or 'forward', got {sorted(unknown)}")
    step, tic = step.place(self.mesh), time.perf_counter()
    filled = bool(step.fill_M.any())
    # begin's output shardings are XLA's choice: compile it first (a small program) to learn them
    begin = _abstract(self._begin.lower(self.params, step.base_moves, step.refill_moves_M[0],
                                        filled=filled).compile().out_info)
    base, working = begin if filled else ((), begin[0])
    grads = (self._split(self.params)[0], working)  # the accumulators' shapes
    zeros = self._zeros_program(grads).lower(grads)
    acc = _abstract(zeros.out_info)
    train, lowered, seen = "train" in programs, [], set()
    if train:
      lowered += [zeros, self._finish.lower(self.params, self.opt_state, acc, step.base_moves)]
    for m, batch in enumerate(micro_batches):
      refill, moves = self._schedule(step, m, prefetch)
      capacity, filled_m = step.capacity_M[m], bool(step.fill_M[m])
      args = (self.params, base, working, batch, step.tables_M[m])
      if "forward" in programs and ("forward", capacity, refill) not in seen:
        seen.add(("forward", capacity, refill))
        lowered.append(self._forward.lower(*args, moves, capacity=capacity, refill=refill))
      if train and ("train", capacity, refill, filled_m) not in seen:
        seen.add(("train", capacity, refill, filled_m))
        lowered.append(self._micro.lower(*args, step.fill_moves_M[m], moves, acc, capacity=capacity,
                                         refill=refill, filled=filled_m))
    lower_s, tic = time.perf_counter() - tic, time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
      list(pool.map(lambda program: program.compile(), lowered))
    return {"programs": len(lowered), "lower_s": lower_s, "compile_s": time.perf_counter() - tic}

  def train_step(self, micro_batches: list[Any], step: StepTables, *, prefetch: bool | None = None,
                 stage_done: Callable[[str, Any], None] | None = None) -> dict:
    """One optimizer step: M micro-steps (micro-step m under placement m), one update."""
    step = step.place(self.mesh)
    acc, losses, metrics = self._accumulate(micro_batches, step, prefetch, stage_done)
    self.params, self.opt_state, grad_norm = self._finish(self.params, self.opt_state, acc, step.base_moves)
    if stage_done:
      stage_done("finish", self.params)
    return {"loss": sum(map(float, losses)), "grad_norm": float(grad_norm),  # host sums: nothing to compile
            "metrics": jax.tree.map(lambda *x: jnp.stack(x), *metrics)}  # global arrays: multi-process safe

  def forward(self, micro_batches: list[Any], step: StepTables, *,
              prefetch: bool | None = None) -> list[tuple[jax.Array, dict]]:
    """Forward only (the recompute stage): (loss, metrics) of every micro-step under its placement."""
    step = step.place(self.mesh)
    base, working = self._start(micro_batches, step)
    outs = []
    for m, batch in enumerate(micro_batches):
      refill, moves = self._schedule(step, m, prefetch)
      out, working = self._forward(self.params, base, working, batch, step.tables_M[m], moves,
                                   capacity=step.capacity_M[m], refill=refill)
      outs.append(out)
    return outs

  def gradients(self, micro_batches: list[Any], step: StepTables, *, prefetch: bool | None = None):
    """The step's accumulated gradients of the home-layout parameters, without an update."""
    step = step.place(self.mesh)
    acc, _, _ = self._accumulate(micro_batches, step, prefetch, None)
    return self._home_grads(self.params, acc, step.base_moves)
