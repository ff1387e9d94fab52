"""The model contract (`foremoe_jax.contracts`): what a model lacks is named before any device work; expert
weights are found through the layers' accessor, for unrolled and scanned models; the executor keeps no
state and its step is a function of the state handed in."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from foremoe_jax import contracts, trees
from foremoe_jax.executor import Executor
from foremoe_jax.model import Model, ModelConfig
from foremoe_jax.moe import ExpertsConfig, MoEConfig
from foremoe_jax.planner import CostModel, PlanConfig, plan_step
from foremoe_jax.step_tables import prepare_step
from moe_reference import cpu_mesh
from test_executor import D, E, S, loss_fn, make_model, skewed_micro_batches

CFG = ModelConfig(vocab_size=18, d_model=16, num_layers=3, num_heads=2, num_kv_heads=1, head_dim=8, d_ff_dense=16,
                  moe=ExpertsConfig(num_experts=8, top_k=2, d_ff_expert=8, slots_per_device=5), max_seq_len=8)


@pytest.fixture(scope="module")
def mesh():
  return cpu_mesh(1, D)


class Bare(nnx.Module):
  """An MoE layer's geometry and expert weights, without the accessor."""

  def __init__(self, cfg, num_experts=None):
    self.cfg = dataclasses.replace(cfg, num_experts=num_experts or cfg.num_experts)
    self.num_devices, self.slots = D, cfg.slots_per_device
    self.w = nnx.Param(jnp.zeros((cfg.num_experts, 2, 2)))


class Layer(Bare):
  def expert_weights(self):
    return (self.w,)


class Foreign(Bare):
  def expert_weights(self):  # Variables of no model: the executor could not find or set them
    return (nnx.Param(jnp.zeros((E, 2, 2))),)


class NoLayers(nnx.Module):
  def __init__(self, layers):
    self.layers = nnx.List(layers)

  def __call__(self, x, tables=None, replay=None, *, capacity=None, working=None):
    return x


class Stack(NoLayers):
  def moe_layers(self):
    return list(self.layers)


class NoWorking(Stack):
  def __call__(self, x, tables=None, replay=None, *, capacity=None):
    return x


def moe_cfg():
  return MoEConfig(d_model=8, d_ff_expert=4, num_experts=E, top_k=2, slots_per_device=S)


@pytest.mark.parametrize("build,match", [
    (lambda: NoLayers([Layer(moe_cfg())]), r"NoLayers .* it has no moe_layers\(\) method"),
    (lambda: NoWorking([Layer(moe_cfg())]), r"NoWorking .* its __call__ takes no working= keyword"),
    (lambda: Stack([]), r"moe_layers\(\) is empty"),
    (lambda: Stack([Layer(moe_cfg()), Bare(moe_cfg())]), r"MoE layer 1 has no expert_weights\(\) method"),
    (lambda: Stack([Foreign(moe_cfg())]), "MoE layer 0's expert weights are not the model's own"),
    (lambda: Stack([Layer(moe_cfg(), num_experts=2 * E)]), f"have {E} experts, cfg.num_experts is {2 * E}"),
])
def test_a_model_lacking_a_piece_is_refused_by_name(mesh, build, match):
  model = build()
  with pytest.raises(TypeError, match=match):
    contracts.check_model(model)
  with pytest.raises(TypeError, match=match):  # before any device work
    Executor(model, optax.sgd(0.1), loss_fn, mesh)


def test_the_library_models_meet_the_contract(mesh):
  contracts.check_model(make_model(mesh))
  for scan in (False, True):
    contracts.check_model(Model(dataclasses.replace(CFG, scan_layers=scan), mesh=mesh, rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("scan", [False, True])
def test_layer_weights_round_trip(mesh, scan):
  """layer_weights reads each MoE layer's [E, ...] weights (a scanned model's sliced from the stack, equal to
  the unrolled model's); set_layer_weights writes them back where they live; layer_abstract describes them
  as eager slicing gives them; the filter picks exactly those Variables."""
  model = Model(dataclasses.replace(CFG, scan_layers=scan), mesh=mesh, rngs=nnx.Rngs(0))
  unrolled = Model(CFG, mesh=mesh, rngs=nnx.Rngs(0))
  got = contracts.layer_weights(model)
  assert len(got) == CFG.num_layers
  for pair, want in zip(got, contracts.layer_weights(unrolled), strict=True):
    for a, b in zip(pair, want, strict=True):
      np.testing.assert_array_equal(a, b)
  assert all(w.sharding.spec == P("expert") for pair in got for w in pair)  # home layout: E over "expert"
  for pair, abstract in zip(got, contracts.layer_abstract(model), strict=True):
    assert [(a.shape, a.dtype, a.sharding) for a in pair] == [(a.shape, a.dtype, a.sharding) for a in abstract]
  new = [tuple(w + 1.0 + l for w in pair) for l, pair in enumerate(got)]
  contracts.set_layer_weights(model, new)
  state = nnx.state(model, nnx.Param)
  for l, pair in enumerate(new):
    stored = (state["layers"]["ffn"] if scan else state["blocks"][l]["ffn"])
    stored = [stored[name][...][l] if scan else stored[name][...] for name in ("w_gate_up", "w_down")]
    for a, b in zip(stored, pair, strict=True):
      np.testing.assert_array_equal(a, b)
  experts, rest = state.split(contracts.expert_weight_filter(model), ...)
  assert len(jax.tree.leaves(experts)) == 2 * (1 if scan else CFG.num_layers)
  assert all("w_gate_up" in path or "w_down" in path for path, _ in nnx.to_flat_state(experts))
  assert not any("w_gate_up" in path for path, _ in nnx.to_flat_state(rest))  # every block is MoE here
  with pytest.raises(ValueError, match="2 layers' weights for a model of 3 MoE layers"):
    contracts.set_layer_weights(model, new[:2])


def test_the_step_is_a_function_of_the_state_handed_in(mesh):
  """The executor holds no parameters or optimizer state; two steps from the same state give the same
  new state; the state handed in is left as it was (the step donates copies here); the update is SGD on
  the step's gradients."""
  batches, counts = skewed_micro_batches(mesh)
  plan = plan_step(counts, PlanConfig(E, D, S, policy="foremoe", cost=CostModel(link_bytes_per_s=1e18)))
  step = prepare_step(plan, counts, E, capacity=64)
  assert Executor.layout(step) == (False, True)
  executor = Executor(make_model(mesh), optax.sgd(0.5), loss_fn, mesh)
  assert not any(isinstance(x, jax.Array) for x in jax.tree.leaves(vars(executor)))
  params, opt_state = executor.init(make_model(mesh))
  made, promised = trees.abstract((params, opt_state)), executor.abstract_state
  assert jax.tree.structure(made) == jax.tree.structure(promised)
  assert jax.tree.leaves(made) == jax.tree.leaves(promised)  # shapes, dtypes and shardings
  leaves, before = jax.tree.leaves(params), jax.tree.map(np.asarray, params)
  outs = [executor.train_step(*trees.copy((params, opt_state)), batches, step) for _ in range(2)]
  (p1, o1, m1), (p2, o2, m2) = outs
  assert m1["loss"] == m2["loss"] and m1["grad_norm"] == m2["grad_norm"] > 0
  for a, b in zip(jax.tree.leaves((p1, o1)), jax.tree.leaves((p2, o2)), strict=True):
    np.testing.assert_array_equal(a, b)
  assert all(a is b for a, b in zip(jax.tree.leaves(params), leaves, strict=True))
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(before), strict=True):
    np.testing.assert_array_equal(a, b)
  grads = executor.gradients(params, batches, step)
  for new, old, g in zip(jax.tree.leaves(p1), jax.tree.leaves(before), jax.tree.leaves(grads), strict=True):
    np.testing.assert_allclose(new, old - 0.5 * g, rtol=1e-5, atol=1e-6)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(before)))


def test_init_refuses_a_model_of_another_graph(mesh):
  executor = Executor(make_model(mesh), optax.sgd(0.5), loss_fn, mesh)
  other = Model(CFG, mesh=mesh, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="graph differs"):
    executor.init(other)
