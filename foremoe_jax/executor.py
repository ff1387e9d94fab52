"""Micro-step executor: one optimizer step of M micro-steps, each under its own expert placement.

Two levels, as the plan has them:
1. `begin`: home expert weights -> the step's base placement (one transfer per step).
2. each micro-step fills its few changed slots from the base (`fill`), runs forward and backward, and
   adds the gradients to accumulators kept in the base layout (replica gradients flow back into their
   base slots through the transpose of the fill).
3. `finish`: the accumulated base gradients go home through the transpose of the base transfer, then one
   optimizer update in the home layout. Parameters and optimizer state never see a placement.
Placements are traced table values: a new plan never recompiles (the padded capacity is bucketed).
"""
import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from foremoe_jax.placement import Tables, plan_tables
from foremoe_jax.transfer import (MoveTables, apply_moves, fill_moves, home_to_base_moves, move_tables,
                                  moves_needed)

# loss_fn(model, batch, *, tables, working, capacity) -> (scalar loss, metrics dict)
LossFn = Callable[..., tuple[jax.Array, dict]]


def bucket(n: int) -> int:
  """Rounds up to 8, then to one of four steps per power of two (<= 25% padding, few compiled shapes)."""
  n = max(8, math.ceil(n / 8) * 8)
  step = max(8, 2 ** (n.bit_length() - 3))
  return math.ceil(n / step) * step


def capacity_power_of_two(n: int) -> int:
  return 1 << max(0, n - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class StepTables:
  """Everything one optimizer step needs about placements, as device arrays (plus static sizes)."""
  tables: Tables  # [M, L, ...] dispatch tables
  base_moves: MoveTables  # [L, ...] home -> base
  fill_moves: MoveTables  # [M, L, ...] base -> each micro-step's working slots
  capacity: int  # padded rows per (source, destination), exact for this step's routes, bucketed
  moved_slots: int  # slots that differ from the base, summed over (m, l)

  @property
  def num_micro_steps(self) -> int:
    return self.tables.slot_expert_G.shape[0]


def stack_moves(tables: list[MoveTables]) -> MoveTables:
  return MoveTables(*(np.stack(leaves) for leaves in zip(*tables)))


def prepare_step(plan, counts_MxLxDxE: np.ndarray, num_experts: int, *, capacity: int | None = None,
                 min_capacity: int = 0, fill_capacity: int | None = None) -> StepTables:
  """Host: a planner `Plan` plus the step's routed counts -> StepTables.

  `capacity` fixes the padded rows per (source, destination) (default: the step's exact need,
  bucketed, at least `min_capacity`: a run that passes its largest capacity so far compiles each
  program for a handful of capacities only); it must cover the need, since dropping tokens would change
  the math. `fill_capacity` is
  the rows one device may send another per micro-step fill; by default the plan's need rounded up to a
  power of two (1 for "foremoe", whose budget is one slot per device).
  """
  num_micro, num_layers, num_devices, _ = plan.slot_expert.shape
  base_list = [home_to_base_moves(plan.base[l], num_experts) for l in range(num_layers)]
  base_cap = capacity_power_of_two(max(1, *(moves_needed(m, num_devices) for m in base_list)))
  fills = [[fill_moves(plan.slot_expert[m, l], plan.base[l]) for l in range(num_layers)] for m in range(num_micro)]
  fill_need = max(moves_needed(f, num_devices) for row in fills for f in row)
  fill_cap = fill_capacity or capacity_power_of_two(max(fill_need, 1))
  slots = plan.slot_expert.shape[-1]  # local copies per device never exceed S: a fixed, cheap shape
  base_moves = stack_moves([move_tables(m, num_devices, base_cap, slots) for m in base_list])
  fill_moves_ = stack_moves([stack_moves([move_tables(f, num_devices, fill_cap, slots) for f in row])
                             for row in fills])
  slot_pairs = plan.slot_pairs(counts_MxLxDxE)  # [M, L, D_src, G]
  need = int(slot_pairs.reshape(*slot_pairs.shape[:3], num_devices, -1).sum(-1).max(initial=0))
  if capacity is not None and capacity < need:
    raise ValueError(f"capacity={capacity} rows per (source, destination) is below this step's need of {need}")
  return StepTables(plan_tables(plan.slot_expert, plan.slot_share, num_experts),
                    jax.tree.map(jnp.asarray, base_moves), jax.tree.map(jnp.asarray, fill_moves_),
                    capacity or max(bucket(need), min_capacity), sum(len(f) for row in fills for f in row))


def expert_weights(model) -> list[tuple[jax.Array, jax.Array]]:
  return [(layer.w_gate_up[...], layer.w_down[...]) for layer in model.moe_layers()]


def replicate_unsharded(tree, mesh):
  """Puts leaves that live on fewer devices than the mesh (e.g. optimizer step counts) on all of it,
  so a restored or freshly initialized state mixes with mesh-sharded parameters in one jit."""
  devices = set(mesh.devices.flat)

  def place(x):
    if set(x.sharding.device_set) == devices:
      return x
    return jax.device_put(x, NamedSharding(mesh, P()))
  return jax.tree.map(place, tree)


def index(tree, i):
  return jax.tree.map(lambda a: a[i], tree)


class Executor:
  """Runs optimizer steps and forward-only passes of a model (`__call__(..., tables, replay, capacity=,
  working=)` and `moe_layers()`) over micro-steps with changing placements."""

  def __init__(self, model, tx: optax.GradientTransformation, loss_fn: LossFn, mesh):
    self.graphdef, self.params, self.rest = nnx.split(model, nnx.Param, ...)
    self.tx, self.loss_fn, self.mesh = tx, loss_fn, mesh
    self.opt_state = replicate_unsharded(jax.jit(tx.init)(self.params), mesh)
    layer = model.moe_layers()[0]
    self.slots = layer.num_devices * layer.slots
    self._begin = jax.jit(self._begin_fn)
    self._micro = jax.jit(self._micro_fn, static_argnames="capacity", donate_argnums=5)
    self._forward = jax.jit(self._forward_fn, static_argnames="capacity")
    self._finish = jax.jit(self._finish_fn, donate_argnums=(0, 1, 2))
    self._home_grads = jax.jit(self._home_grads_fn)

  def model(self):
    return nnx.merge(self.graphdef, self.params, self.rest)

  # --- traced pieces -------------------------------------------------------------------------------
  def _to_base(self, home, base_moves):
    def one(w):
      return jnp.zeros((self.slots, *w.shape[1:]), w.dtype)
    return [apply_moves(h, jax.tree.map(one, h), index(base_moves, l), self.mesh) for l, h in enumerate(home)]

  def _begin_fn(self, params, base_moves):
    return self._to_base(expert_weights(nnx.merge(self.graphdef, params, self.rest)), base_moves)

  def _working(self, base, fill):
    return [apply_moves(b, b, index(fill, l), self.mesh) for l, b in enumerate(base)]

  def _loss(self, params, base, batch, tables, fill, capacity):
    model = nnx.merge(self.graphdef, params, self.rest)
    return self.loss_fn(model, batch, tables=tables, working=self._working(base, fill), capacity=capacity)

  def _micro_fn(self, params, base, batch, tables, fill, acc, *, capacity):
    grad_fn = jax.value_and_grad(self._loss, argnums=(0, 1), has_aux=True)
    (loss, metrics), grads = grad_fn(params, base, batch, tables, fill, capacity)
    return jax.tree.map(jnp.add, acc, grads), loss, metrics

  def _forward_fn(self, params, base, batch, tables, fill, *, capacity):
    return self._loss(params, base, batch, tables, fill, capacity)

  def _home_grads_fn(self, params, acc, base_moves):
    """Accumulated (params, base) gradients -> gradients of the home-layout parameters."""
    grad_params, grad_base = acc
    home = expert_weights(nnx.merge(self.graphdef, params, self.rest))
    _, to_home = jax.vjp(lambda h: self._to_base(h, base_moves), home)
    (grad_home,) = to_home(grad_base)
    grad_model = nnx.merge(self.graphdef, grad_params, self.rest)
    for layer, (g_gate_up, g_down) in zip(grad_model.moe_layers(), grad_home):
      layer.w_gate_up[...] = layer.w_gate_up[...] + g_gate_up
      layer.w_down[...] = layer.w_down[...] + g_down
    return nnx.state(grad_model, nnx.Param)

  def _finish_fn(self, params, opt_state, acc, base_moves):
    grads = self._home_grads_fn(params, acc, base_moves)
    updates, opt_state = self.tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, optax.global_norm(grads)

  # --- host loop -----------------------------------------------------------------------------------
  def train_step(self, micro_batches: list[Any], step: StepTables) -> dict:
    """One optimizer step: M micro-steps (micro-step m under placement m), one update."""
    acc, losses, metrics = self._accumulate(micro_batches, step)
    self.params, self.opt_state, grad_norm = self._finish(self.params, self.opt_state, acc, step.base_moves)
    return {"loss": float(sum(losses)), "grad_norm": float(grad_norm),
            "metrics": jax.tree.map(lambda *x: np.stack(x), *metrics)}

  def forward(self, micro_batches: list[Any], step: StepTables) -> list[tuple[jax.Array, dict]]:
    """Forward only (the recompute stage): (loss, metrics) of every micro-step under its placement."""
    base = self._begin(self.params, step.base_moves)
    return [self._forward(self.params, base, batch, index(step.tables, m), index(step.fill_moves, m),
                          capacity=step.capacity) for m, batch in enumerate(micro_batches)]

  def _accumulate(self, micro_batches, step: StepTables):
    if len(micro_batches) != step.num_micro_steps:
      raise ValueError(f"{len(micro_batches)} micro-batches for a plan of {step.num_micro_steps} micro-steps")
    base = self._begin(self.params, step.base_moves)
    acc = jax.tree.map(jnp.zeros_like, (self.params, base))
    losses, metrics = [], []
    for m, batch in enumerate(micro_batches):
      acc, loss, met = self._micro(self.params, base, batch, index(step.tables, m), index(step.fill_moves, m),
                                   acc, capacity=step.capacity)
      losses.append(loss)
      metrics.append(met)
    return acc, losses, metrics

  def gradients(self, micro_batches: list[Any], step: StepTables):
    """The step's accumulated gradients of the home-layout parameters, without an update."""
    acc, _, _ = self._accumulate(micro_batches, step)
    return self._home_grads(self.params, acc, step.base_moves)
