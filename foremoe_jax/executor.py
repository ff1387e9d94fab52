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
"""
import concurrent.futures
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from foremoe_jax import contracts
from foremoe_jax.opt_state import init_sharded, state_shardings
from foremoe_jax.step_tables import StepTables
from foremoe_jax.transfer import (apply_moves, apply_moves_transpose, check_exchange, flush_rows, hold_rows,
                                  home_to_base, home_to_base_transpose, pad_home)
from foremoe_jax.trees import abstract, accumulators, accumulators_abstract, add, constrain, index

# loss_fn(model, batch, *, tables, working, capacity) -> (scalar loss, metrics dict)
LossFn = Callable[..., tuple[jax.Array, dict]]

# Executor.layout of a step whose base is home everywhere and never left: the plain step's programs.
PLAIN = (True, False)


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
    self.graphdef, params, self.rest = nnx.split(model, nnx.Param, ...)
    self.tx, self.loss_fn, self.mesh, self.prefetch, self.exchange = tx, loss_fn, mesh, prefetch, exchange
    self.fused = fused
    layer = model.moe_layers()[0]
    self.slots_per_device, self.home_rows = layer.slots, layer.cfg.num_experts // layer.num_devices
    self.num_slots, self.num_devices = layer.slots * layer.num_devices, layer.num_devices
    self._is_expert = contracts.expert_weight_filter(model)
    params = abstract(params)
    opt_abstract = jax.eval_shape(tx.init, params)
    opt_abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), opt_abstract,
                                state_shardings(opt_abstract, params, mesh))
    self.abstract_state = (params, opt_abstract)  # (params, opt_state) as `init` makes them: shapes, shardings
    self._slots_abstract = [tuple(jax.ShapeDtypeStruct((self.num_slots, *w.shape[1:]), w.dtype, sharding=w.sharding)
                                  for w in h) for h in contracts.layer_abstract(model)]
    micro_static = ("capacity", "refill", "filled", "direct", "flushed", "first", "layout")
    self._begin = jax.jit(self._begin_fn, static_argnames="layout")
    self._micro = jax.jit(self._micro_fn, static_argnames=micro_static, donate_argnames=("working", "acc"))
    self._forward = jax.jit(self._forward_fn, static_argnames=("capacity", "refill", "first", "layout"),
                            donate_argnames="working")
    # The update hands back parameters and optimizer state sharded as it got them: left to XLA, a leaf
    # could come back sharded otherwise, and the next step's update would compile a second program.
    shardings = jax.tree.map(lambda a: a.sharding, self.abstract_state)
    replicated = NamedSharding(mesh, P())
    self._finish = jax.jit(self._finish_fn, static_argnames="layout", donate_argnums=(0, 1, 2),
                           out_shardings=(*shardings, replicated))
    # The last micro-step's program updates too: parameters and optimizer state are handed over to it
    # (the loss and metrics come out replicated, as `finish`'s norm).
    self._last = jax.jit(self._last_fn, static_argnames=micro_static,
                         donate_argnames=("params", "opt_state", "base", "working", "acc"),
                         out_shardings=(*shardings, replicated, replicated, replicated))
    self._home_grads = jax.jit(self._home_grads_fn)
    self._zeros = {}  # one zero-fill program per (tree structure, shardings)

  def init(self, model) -> tuple[Any, Any]:
    """(params, opt_state) of `model` (a model of this executor's graph): its parameters and a fresh
    optimizer state, each moment sharded as its parameter."""
    graphdef, params, _ = nnx.split(model, nnx.Param, ...)
    if graphdef != self.graphdef:
      raise ValueError("Executor.init: the model's graph differs from the one the executor was built for")
    return params, init_sharded(self.tx, params, self.mesh)

  def model(self, params):
    """The model with `params` (sharing their arrays): for rollout or evaluation."""
    return nnx.merge(self.graphdef, params, self.rest)

  # --- traced pieces -------------------------------------------------------------------------------
  def _split(self, params):
    """(dense, experts): the parameters the loss is differentiated by, and the home expert weights."""
    return params.split(nnx.Not(self._is_expert), ...)

  def _pad(self, home_pair):
    """A layer's home weights as its working slots in the home layout: the E/D home rows of each device,
    then zero rows for slots beyond them (a local copy); the home arrays themselves when S = E/D."""
    if self.slots_per_device == self.home_rows:
      return home_pair
    return pad_home(home_pair, self.mesh, self.slots_per_device)

  def _to_base(self, home, base_moves):
    return [home_to_base(h, index(base_moves, l), self.mesh, self.slots_per_device, self.exchange)
            for l, h in enumerate(home)]

  def _refill(self, base, working, moves, prefetch=False):
    exchange = "ppermute_all" if prefetch and self.exchange == "ppermute" else self.exchange
    return [apply_moves(b, w, index(moves, l), self.mesh, exchange) for l, (b, w) in enumerate(zip(base, working))]

  def _begin_fn(self, params, base_moves, first_refill, *, layout):
    """(base, first working slots). A base equal to home everywhere is the padded home weights (no
    transfer); when no micro-step leaves the base, the slots are the base itself and base is ()."""
    at_home, filled = layout
    home = contracts.layer_weights(nnx.merge(self.graphdef, params, self.rest))
    base = [self._pad(h) for h in home] if at_home else self._to_base(home, base_moves)
    return (base, self._refill(base, base, first_refill)) if filled else ((), base)

  def _loss(self, dense, experts, working, batch, tables, capacity):
    model = nnx.merge(self.graphdef, dense, experts, self.rest)
    return self.loss_fn(model, batch, tables=tables, working=working, capacity=capacity)

  def _plain_loss(self, params, batch, tables, capacity):
    """The loss differentiated by the home weights themselves: the step of a base that is home everywhere
    and never left (`PLAIN`). Gradients land in the home layout, nothing moves."""
    model = nnx.merge(self.graphdef, params, self.rest)
    working = [self._pad(h) for h in contracts.layer_weights(model)]
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

  def _state(self, layout, held_rows: int):
    """Abstract (base, working, acc) that a micro-step's program hands the next one, for `layout` and
    `held_rows` (H) rows of `held` per device."""
    if layout == PLAIN:
      return (), (), accumulators_abstract(self.abstract_state[0])
    slots = self._slots_abstract
    dense = self._split(self.abstract_state[0])[0]
    # The fill's slots' gradients, waiting for their tenure's end: H rows per device, sharded as the slots.
    held = [tuple(jax.ShapeDtypeStruct((held_rows * self.num_devices, *w.shape[1:]), w.dtype, sharding=w.sharding)
                  for w in pair) for pair in slots] if layout[1] else ()
    return (slots if layout[1] else ()), slots, accumulators_abstract((dense, slots, held))

  def _grads(self, params, base, working, acc, batch, tables, hold, direct_moves, flush, refill_moves, base_moves,
             first_refill, *, capacity, refill, filled, direct, flushed, first, layout):
    """One micro-step's gradients added to acc = (dense, base layout, held); `first`: the step's first
    program, which also builds the base and the first working slots (`_begin_fn`) and starts acc.
    filled: some slot's gradient waits in `held` (a tenure of two micro-steps or more): `hold` names
    those slots and their held rows (its K is H); direct: some tenure lasts this micro-step only
    (`direct_moves`, its fill moves): its gradient goes straight back to its base row, in the weights'
    dtype (half a float32 sum's bytes for bf16 weights); flushed: some held tenures end here (`flush`):
    their held rows go back to their base rows and are zeroed. Neither: the slots' gradients are the base's.
    Returns (acc, base, working, loss, metrics): base is () but in the first program."""
    state = self._state(layout, hold.held_DxK.shape[-1])
    if layout == PLAIN:
      (loss, metrics), grads = jax.value_and_grad(self._plain_loss, has_aux=True)(params, batch, tables, capacity)
      return constrain(add(accumulators(grads) if first else acc, grads), state[2]), (), (), loss, metrics
    if first:
      base, working = self._begin_fn(params, base_moves, first_refill, layout=layout)

    def compute(working):
      grad_fn = jax.value_and_grad(self._loss, argnums=(0, 2), has_aux=True)
      (loss, metrics), (grad_dense, grad_slots) = grad_fn(*self._split(params), working, batch, tables, capacity)
      held_zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), state[2][2])
      dense, grad_base, held = (*accumulators((grad_dense, grad_slots)), held_zeros) if first else acc
      # Layer by layer (each waits only for its own gradients, so XLA may overlap its flush with the
      # backward of the layers before it): the fill's slots' gradients wait in `held` or (one-micro-step
      # tenures) go back at once, the rest are the base rows' own; the held tenures that end here go
      # back to their base rows. Held rows leave `g` first: a direct return may add to a base row whose
      # slot the fill overwrote with a held replica.
      grad_base, held = list(grad_base), (list(held) if layout[1] else ())
      for l, g in enumerate(grad_slots):
        if filled:
          g, held[l] = hold_rows(g, held[l], index(hold, l), self.mesh)
        if direct:
          g = apply_moves_transpose(g, None, index(direct_moves, l), self.mesh, self.exchange)
        grad_base[l] = add(grad_base[l], g)
        if flushed:
          grad_base[l], held[l] = flush_rows(held[l], grad_base[l], index(flush, l), self.mesh, self.exchange)
      return constrain((add(dense, grad_dense), grad_base, held), state[2]), loss, metrics

    (acc, loss, metrics), working = self._around_refill(base, working, refill_moves, refill, compute)
    # The base goes out of the program that built it only: returning an input would copy it.
    return acc, (constrain(base, state[0]) if first else ()), constrain(working, state[1]), loss, metrics

  def _micro_fn(self, params, base, working, acc, batch, *tables, **static):
    return self._grads(params, base, working, acc, batch, *tables, **static)

  def _last_fn(self, params, opt_state, base, working, acc, batch, *tables, layout, **static):
    """The last micro-step and the update in one program: its flush sends every tenure left home to the
    base, the base gradients go home, and the optimizer runs, while XLA still schedules this micro-step's
    backward. Returns (params, opt_state, grad_norm, loss, metrics)."""
    acc, _, _, loss, metrics = self._grads(params, base, working, acc, batch, *tables, layout=layout, **static)
    return *self._finish_fn(params, opt_state, acc, tables[-2], layout=layout), loss, metrics

  def _forward_fn(self, params, base, working, batch, tables, refill_moves, base_moves, first_refill, *,
                  capacity, refill, first, layout):
    """(loss, metrics), base (built here when `first`, else ()), working."""
    if layout == PLAIN:
      return self._plain_loss(params, batch, tables, capacity), (), ()
    if first:
      base, working = self._begin_fn(params, base_moves, first_refill, layout=layout)
    out, working = self._around_refill(base, working, refill_moves, refill,
                                       lambda working: self._loss(*self._split(params), working, batch, tables,
                                                                  capacity))
    return out, (base if first else ()), working

  def _home_grads_fn(self, params, acc, base_moves):
    """Accumulated (dense, base[, held: zeros after the last flush]) gradients -> gradients of the
    home-layout parameters (float32)."""
    grad_dense, grad_base = acc[:2]
    grad_home = [home_to_base_transpose(g, index(base_moves, l), self.mesh, self.home_rows, self.exchange)
                 for l, g in enumerate(grad_base)]
    # merge shares Variables with its states: a copy of the experts' keeps set_layer_weights off `params`
    grad_model = nnx.merge(self.graphdef, grad_dense, jax.tree.map(lambda w: w, self._split(params)[1]), self.rest)
    contracts.set_layer_weights(grad_model, grad_home)
    return nnx.state(grad_model, nnx.Param)

  def _finish_fn(self, params, opt_state, acc, base_moves, *, layout):
    grads = acc if layout == PLAIN else self._home_grads_fn(params, acc, base_moves)
    updates, opt_state = self.tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, optax.global_norm(grads)

  # --- host loop -----------------------------------------------------------------------------------
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
    """(tables, static keywords) of micro-step m's program: `_micro_fn` after its (params, base, working,
    acc, batch); `_forward_fn` takes them as `forward_args` leaves them. With fixed sizes a micro-step
    holds, returns and flushes wherever its layout leaves the base: no per-plan variants."""
    refill, moves = self._schedule(step, m, prefetch)
    tables = (step.tables_M[m], step.hold_tables_M[m], step.direct_moves_M[m], step.flush_moves_M[m], moves,
              step.base_moves, step.refill_moves_M[0])
    layout = self.layout(step)
    flags = (layout[1],) * 3 if step.layout else (step.hold_M[m], step.direct_M[m], step.flush_M[m])
    return tables, dict(capacity=step.capacity_M[m], refill=refill, filled=bool(flags[0]), direct=bool(flags[1]),
                        flushed=bool(flags[2]), first=self.fused and m == 0, layout=layout)

  @staticmethod
  def forward_args(tables, kw):
    """`_micro_args`' (tables, static keywords) as `_forward_fn` takes them: without the gradients' own
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
      base, working = self._begin(params, step.base_moves, step.refill_moves_M[0], layout=layout)
    return base, working, self.zero_accumulators(self._state(layout, step.held_rows)[2])

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
    stage_done, update = stage_done or (lambda name, value: None), opt_state is not None
    base, working, acc = self._start(params, micro_batches, step)
    stage_done("begin", working)  # () when fused: the first micro-step's program builds them
    losses, metrics, grad_norm, last = [], [], None, step.num_micro_steps - 1
    for m, batch in enumerate(micro_batches):
      tables, kw = self._micro_args(step, m, prefetch)
      if update and self.fused and m == last:
        params, opt_state, grad_norm, loss, met = self._last(params, opt_state, base, working, acc, batch, *tables,
                                                             **kw)
        acc = ()
      else:
        acc, built, working, loss, met = self._micro(params, base, working, acc, batch, *tables, **kw)
        base = built if kw["first"] else base
      stage_done("micro", acc)
      losses.append(loss)
      metrics.append(met)
    if update and not self.fused:
      params, opt_state, grad_norm = self._finish(params, opt_state, acc, step.base_moves, layout=self.layout(step))
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
    state = self._state(layout, step.held_rows)  # what one micro-step's program hands the next (constrained)
    train, lowered, seen = "train" in programs, [], set()
    if not self.fused:
      if layout != PLAIN:
        lowered.append(self._begin.lower(params, step.base_moves, step.refill_moves_M[0], layout=layout))
      if train:
        lowered += [self._zeros_program(state[2]).lower(state[2]),
                    self._finish.lower(params, opt_state, state[2], step.base_moves, layout=layout)]
    for m, batch in enumerate(micro_batches):
      tables, kw = self._micro_args(step, m, prefetch)
      base, working, acc = ((), (), ()) if kw["first"] else state
      last = self.fused and m == step.num_micro_steps - 1
      forward_tables, forward_kw = self.forward_args(tables, kw)
      if "forward" in programs and ("forward", *forward_kw.values()) not in seen:
        seen.add(("forward", *forward_kw.values()))
        lowered.append(self._forward.lower(params, base, working, batch, *forward_tables, **forward_kw))
      if train and ("train", last, *kw.values()) not in seen:
        seen.add(("train", last, *kw.values()))
        args = (params, *((opt_state,) if last else ()), base, working, acc, batch, *tables)
        lowered.append((self._last if last else self._micro).lower(*args, **kw))
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
      out, built, working = self._forward(params, base, working, batch, *tables, **kw)
      base = built if kw["first"] else base
      outs.append(out)
    return outs

  def gradients(self, params, micro_batches: list[Any], step: StepTables, *, prefetch: bool | None = None):
    """The step's accumulated gradients of the home-layout parameters, without an update."""
    step = step.place(self.mesh)
    acc = self._accumulate(params, None, micro_batches, step, prefetch, None)[2]
    return acc if self.layout(step) == PLAIN else self._home_grads(params, acc, step.base_moves)
