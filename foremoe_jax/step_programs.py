"""The traced programs of an optimizer step (`Executor` runs them; see its module for the schedule).

Each program takes the step's placement tables as traced values (a new plan never recompiles) and the
state the previous program hands it; static arguments pick its variant (padded capacity, which of
refill, hold, direct return and flush it runs, the layout). `begin` builds the base and the first
working slots; `micro` adds one micro-step's gradients to the accumulators (the first program builds
the base too when fused); `last` is the last micro-step with the update; `finish` the update alone
(base gradients home, then the optimizer); `forward` the forward only; `home_grads` maps accumulated
gradients home. `state` gives the abstract (base, working, acc) one micro-step hands the next, what
`Executor.precompile` lowers for.
"""
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from foremoe_jax import contracts
from foremoe_jax.opt_state import state_shardings
from foremoe_jax.transfer import (apply_moves, apply_moves_transpose, flush_rows, hold_rows, home_to_base,
                                  home_to_base_transpose, pad_home)
from foremoe_jax.trees import abstract, accumulators, accumulators_abstract, add, constrain, index

# loss_fn(model, batch, *, tables, working, capacity) -> (scalar loss, metrics dict)
LossFn = Callable[..., tuple[jax.Array, dict]]

# Executor.layout of a step whose base is home everywhere and never left: the plain step's programs.
PLAIN = (True, False)


class StepPrograms:
  """The jitted programs of a model's optimizer steps and forward passes, for `loss_fn`, the optimizer `tx`
  and the `exchange` moved rows travel by. Keeps the model's graph and its non-parameter state, never its
  parameters: every program takes them; `abstract_state` is (params, opt_state) as `Executor.init` makes
  them (shapes, dtypes, shardings)."""

  def __init__(self, model, tx: optax.GradientTransformation, loss_fn: LossFn, mesh, exchange: str):
    self.graphdef, params, self.rest = nnx.split(model, nnx.Param, ...)
    self.tx, self.loss_fn, self.mesh, self.exchange = tx, loss_fn, mesh, exchange
    layer = model.moe_layers()[0]
    self.slots_per_device, self.home_rows = layer.slots, layer.cfg.num_experts // layer.num_devices
    self.num_slots, self.num_devices = layer.slots * layer.num_devices, layer.num_devices
    self._is_expert = contracts.expert_weight_filter(model)
    params = abstract(params)
    opt_abstract = jax.eval_shape(tx.init, params)
    opt_abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), opt_abstract,
                                state_shardings(opt_abstract, params, mesh))
    self.abstract_state = (params, opt_abstract)  # (params, opt_state) as `Executor.init` makes them
    self._slots_abstract = [tuple(jax.ShapeDtypeStruct((self.num_slots, *w.shape[1:]), w.dtype, sharding=w.sharding)
                                  for w in h) for h in contracts.layer_abstract(model)]
    micro_static = ("capacity", "refill", "filled", "direct", "flushed", "first", "layout")
    self.begin = jax.jit(self._begin_fn, static_argnames="layout")
    self.micro = jax.jit(self._micro_fn, static_argnames=micro_static, donate_argnames=("working", "acc"))
    self.forward = jax.jit(self._forward_fn, static_argnames=("capacity", "refill", "first", "layout"),
                           donate_argnames="working")
    # The update hands back parameters and optimizer state sharded as it got them: left to XLA, a leaf
    # could come back sharded otherwise, and the next step's update would compile a second program.
    shardings = jax.tree.map(lambda a: a.sharding, self.abstract_state)
    replicated = NamedSharding(mesh, P())
    self.finish = jax.jit(self._finish_fn, static_argnames="layout", donate_argnums=(0, 1, 2),
                          out_shardings=(*shardings, replicated))
    # The last micro-step's program updates too: parameters and optimizer state are handed over to it
    # (the loss and metrics come out replicated, as `finish`'s norm).
    self.last = jax.jit(self._last_fn, static_argnames=micro_static,
                        donate_argnames=("params", "opt_state", "base", "working", "acc"),
                        out_shardings=(*shardings, replicated, replicated, replicated))
    self.home_grads = jax.jit(self._home_grads_fn)

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

  def state(self, layout, held_rows: int):
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
    state = self.state(layout, hold.held_DxK.shape[-1])
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
