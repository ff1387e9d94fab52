"""Layers under scan: the scanned model equals the unrolled one with the same weights (forward, gradients,
prefill + decode, an executor step), remat changes nothing, and the lowered program does not grow with depth."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from foremoe_jax.executor import Executor
from foremoe_jax.step_tables import prepare_step
from foremoe_jax.model import Model, ModelConfig
from foremoe_jax.moe import ExpertsConfig
from foremoe_jax.placement import make_tables, stack_tables
from foremoe_jax.planner import CostModel, PlanConfig, plan_step
from foremoe_jax.transfer import materialize

E, D, S, L = 8, 2, 5, 2
CFG = ModelConfig(vocab_size=18, d_model=32, num_layers=L, num_heads=4, num_kv_heads=2, head_dim=8, d_ff_dense=48,
                  moe=ExpertsConfig(num_experts=E, top_k=2, d_ff_expert=16, slots_per_device=S), max_seq_len=16)
B, T = 4, 8


@pytest.fixture(scope="module")
def mesh():
  """Two of the CPU devices: small shard_map programs compile faster."""
  return jax.make_mesh((1, D), ("data", "expert"), axis_types=(AxisType.Auto,) * 2, devices=jax.devices()[:D])


@pytest.fixture(scope="module")
def models(mesh):
  """(unrolled, scanned) built from the same seed: the scanned one holds the unrolled blocks' weights stacked."""
  return (Model(CFG, mesh=mesh, rngs=nnx.Rngs(0)),
          Model(dataclasses.replace(CFG, scan_layers=True), mesh=mesh, rngs=nnx.Rngs(0)))


def to_scanned(tree):
  """An unrolled model's state (or gradients) as a pure dict in the scanned layout ("layers" [L, ...])."""
  d = dict(pure(tree))
  blocks = d.pop("blocks")
  d["layers"] = jax.tree.map(lambda *x: np.stack(x), *[blocks[i] for i in range(len(blocks))])
  return d


def pure(tree):
  return tree.to_pure_dict() if isinstance(tree, nnx.State) else tree


def assert_trees_close(a, b, tol):
  a, b = pure(a), pure(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


def moved_tables():
  """A non-home placement: device d also holds the next device's first expert in its spare slot, shared 50/50."""
  per = E // D
  slot_expert_DxS = np.array([[*range(per * d, per * (d + 1)), per * (d + 1) % E] for d in range(D)], np.int32)
  share_G = np.where(slot_expert_DxS.reshape(-1) % per == 0, 0.5, 1.0).astype(np.float32)
  return make_tables(slot_expert_DxS, np.broadcast_to(share_G, (D, D * S)), E)


def tokens(seed):
  return jax.random.randint(jax.random.key(seed), (B, T), 0, CFG.vocab_size)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def loss_and_grads(graphdef, params, working, x, tables, replay):
  def loss(params, working):
    out = nnx.merge(graphdef, params)(x, tables, replay, capacity=32, working=working)
    w = jnp.cos(jnp.arange(out.logits.size, dtype=jnp.float32)).reshape(out.logits.shape)
    return jnp.sum(out.logits * w) / x.size + out.aux_loss, out
  return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, working)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def capture(graphdef, state, x):
  return nnx.merge(graphdef, state)(x).routes


def inputs(model, mesh, seed=1):
  """(tokens, tables [L, ...], replay [B, T, L, k], working slots per layer) for the unrolled `model`."""
  x = tokens(seed)
  replay = capture(nnx.graphdef(model), nnx.state(model), x)
  table = moved_tables()
  working = [tuple(w.reshape(D * S, *w.shape[2:]) for w in materialize((m.w_gate_up[...], m.w_down[...]), table,
                                                                       mesh)) for m in model.moe_layers()]
  return x, stack_tables([table] * L), replay, working


def test_scanned_layout_stacks_the_unrolled_weights(models):
  unrolled, scanned = models
  assert_trees_close(to_scanned(nnx.state(unrolled)), nnx.state(scanned), 0)
  moe = scanned.moe_layers()
  assert len(moe) == 1 and moe[0].w_gate_up.shape == (L, E, CFG.d_model, 2 * CFG.moe.d_ff_expert)
  assert moe[0].w_gate_up[...].sharding.spec == P(None, "expert")


@pytest.mark.parametrize("remat,unroll", [("block", 1), ("none", 2)])
def test_remat_or_unrolled_scan_forward_and_gradients_equal_unrolled(models, mesh, remat, unroll):
  """Scanned with remat="block", or two blocks per scan iteration, against the unrolled model without
  remat: the executor test below covers the plain scanned model."""
  unrolled, scanned = models
  cfg = dataclasses.replace(scanned.cfg, remat=remat, scan_unroll=unroll)
  scanned = nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: Model(cfg, mesh=mesh, rngs=nnx.Rngs(0)))),
                      nnx.state(scanned))
  x, tables, replay, working = inputs(unrolled, mesh)
  (loss_u, out_u), (g_u, gw_u) = loss_and_grads(nnx.graphdef(unrolled), nnx.state(unrolled), working, x, tables,
                                                 replay)
  (loss_s, out_s), (g_s, gw_s) = loss_and_grads(nnx.graphdef(scanned), nnx.state(scanned), working, x, tables,
                                                 replay)
  for field in out_u._fields:
    np.testing.assert_allclose(getattr(out_s, field), getattr(out_u, field), rtol=1e-5, atol=1e-5, err_msg=field)
  np.testing.assert_array_equal(out_s.routes, replay)
  np.testing.assert_allclose(loss_s, loss_u, rtol=1e-6)
  assert_trees_close(g_s, to_scanned(g_u), 1e-5)
  assert_trees_close(list(gw_s), list(gw_u), 1e-5)
  assert float(jnp.abs(gw_s[0][0]).sum()) > 0  # the working slots do carry gradient


def test_prefill_and_decode_equal_unrolled(models):
  def generate(model):
    @jax.jit
    def run(state, x):
      m = nnx.merge(nnx.graphdef(model), state)
      cache = m.init_cache(B, T)
      out, cache = m.prefill(x[:, :5], cache, capacity=m.no_drop_capacity(B, 5))
      logits, routes, cache = m.decode(x[:, 5:6], cache, jnp.full((B,), 5, jnp.int32), capacity=8)
      k = jnp.stack([c.k for c in cache]) if isinstance(cache, list) else cache.k  # scanned: one [L, ...] cache
      return out.logits, out.routes, logits, routes, k
    return run(nnx.state(model), tokens(3))
  for got, want in zip(generate(models[1]), generate(models[0])):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def step_loss(model, batch, *, tables, working, capacity):
  out = model(batch["tokens"], tables, batch["replay"], capacity=capacity, working=working)
  logp = jax.nn.log_softmax(out.logits, axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, batch["target"][..., None], axis=-1)), {"dropped": out.dropped}


def test_executor_step_equals_unrolled(models, mesh):
  unrolled, scanned = models
  batches, counts = [], np.zeros((2, L, D, E), np.int64)
  for m in range(2):
    x, _, replay, _ = inputs(unrolled, mesh, seed=10 + m)
    batches.append({"tokens": x, "target": tokens(20 + m), "replay": replay})
    source = np.repeat(np.arange(B) // (B // D), T * CFG.moe.top_k)
    for l in range(L):
      np.add.at(counts[m, l], (source, np.asarray(replay[:, :, l]).reshape(-1)), 1)
  plan = plan_step(counts, PlanConfig(E, D, S, policy="foremoe", cost=CostModel(link_bytes_per_s=1e18)))
  step = prepare_step(plan, counts, E, capacity=32)
  assert int(np.asarray(step.tables_M[0].slot_expert_G)[0, S - 1]) >= 0  # a replica in the spare slot: base moves
  results = []
  for model in (unrolled, scanned):
    executor = Executor(model, optax.sgd(0.5), step_loss, mesh)
    params, opt_state = executor.init(model)
    grads = executor.gradients(params, batches, step)
    params, _, metrics = executor.train_step(params, opt_state, batches, step)
    results.append((grads, params, metrics["loss"]))
  (g_u, p_u, loss_u), (g_s, p_s, loss_s) = results
  np.testing.assert_allclose(loss_s, loss_u, rtol=1e-6)
  assert_trees_close(g_s, to_scanned(g_u), 1e-5)
  assert_trees_close(p_s, to_scanned(p_u), 1e-5)


def dot_count(mesh, num_layers, scan_layers):
  """stablehlo dot_general ops in the lowered forward + backward (abstract model: nothing allocated)."""
  cfg = dataclasses.replace(CFG, num_layers=num_layers, scan_layers=scan_layers)
  abstract = nnx.eval_shape(lambda: Model(cfg, mesh=mesh, rngs=nnx.Rngs(0)))
  graphdef, params = nnx.split(abstract)
  replay = jax.ShapeDtypeStruct((B, T, num_layers, CFG.moe.top_k), jnp.int32)
  def loss(params, x, replay):
    return jnp.sum(nnx.merge(graphdef, params)(x, None, replay, capacity=32).logits)
  text = jax.jit(jax.grad(loss)).lower(params, jax.ShapeDtypeStruct((B, T), jnp.int32), replay).as_text()
  return text.count("stablehlo.dot_general")


def test_lowered_program_does_not_grow_with_depth(mesh):
  assert dot_count(mesh, 2, True) == dot_count(mesh, 4, True)
  assert dot_count(mesh, 4, False) > dot_count(mesh, 2, False)


@pytest.mark.parametrize("change, match", [(dict(remat="full"), "remat"),
                                           (dict(scan_layers=True, moe_every=2, num_layers=4), "moe_every")])
def test_bad_config_is_refused(change, match):
  with pytest.raises(ValueError, match=match):
    dataclasses.replace(CFG, **change).validate()


def test_hf_conversion_refuses_a_scanned_model(mesh):
  from foremoe_jax.convert.hf_weights import load_model
  with pytest.raises(ValueError, match="scan_layers"):
    load_model("/nonexistent", dataclasses.replace(CFG, scan_layers=True), mesh)
