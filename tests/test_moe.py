"""The expert-parallel MoE layer against a dense einsum reference, on values and gradients."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from foremoe_jax import MoE, MoEConfig, backends, make_tables
from foremoe_jax.placement import home_tables
from foremoe_jax.planner import home_placement
from foremoe_jax.planner.config import DISPATCH_COSTS
from moe_reference import cpu_mesh, dense_moe, random_placement

H, F = 16, 8


def build(mesh, num_experts=16, top_k=2, slots=3, **kw):
  cfg = MoEConfig(d_model=H, d_ff_expert=F, num_experts=num_experts, top_k=top_k, slots_per_device=slots, **kw)
  return MoE(cfg, mesh=mesh, rngs=nnx.Rngs(0))


def call(moe, x, tables=None, replay=None, capacity=None):
  """The layer under jit (eager shard_map runs op by op)."""
  graphdef, state = nnx.split(moe)
  fn = jax.jit(lambda st, x, t, r: nnx.merge(graphdef, st)(x, t, r, capacity=capacity))
  return fn(state, x, tables, replay)


def loss_and_grads(moe, x, tables=None, replay=None, capacity=None):
  """Loss sum(y * w) and its gradients w.r.t. (router, w_gate_up, w_down) for layer and reference."""
  cot = jax.random.normal(jax.random.key(7), x.shape)
  graphdef, state = nnx.split(moe)

  def layer_loss(state):
    return jnp.sum(nnx.merge(graphdef, state)(x, tables, replay, capacity=capacity).y * cot)

  def ref_loss(params):
    return jnp.sum(dense_moe(*params, x, moe.cfg.top_k, replay) * cot)

  loss, grad_state = jax.jit(jax.value_and_grad(layer_loss))(state)
  g = nnx.merge(graphdef, grad_state)
  params = (moe.router[...], moe.w_gate_up[...], moe.w_down[...])
  return (loss, (g.router[...], g.w_gate_up[...], g.w_down[...])), jax.jit(jax.value_and_grad(ref_loss))(params)


def assert_matches_reference(moe, x, tables=None, replay=None):
  local_pairs = x.shape[0] * x.shape[1] * moe.cfg.top_k
  (loss, grads), (ref_loss, ref_grads) = loss_and_grads(moe, x, tables, replay, capacity=local_pairs)
  chex.assert_trees_all_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(grads, ref_grads, rtol=1e-4, atol=1e-5)  # (router, w_gate_up, w_down)


@pytest.mark.parametrize("dispatch", sorted(backends.DISPATCH))
def test_every_dispatch_backend_matches_dense(dispatch):
  """Each exchange of `backends.DISPATCH` (by name, as a config asks for it) on a random placement with
  replicas and empty slots, k > 1 and an odd token count, against the dense reference on values and
  gradients. An exchange this platform cannot run is skipped with its reason (GPU runs cover ragged)."""
  backend = backends.DISPATCH[dispatch]
  if backend.platforms is not None and backends.platform() not in backend.platforms:
    pytest.skip(f"{dispatch!r} needs {backend.collective}, which runs on {backend.platforms} only")
  num_devices = min(8, len(jax.devices()))
  num_experts, slots = 4 * num_devices, 6
  moe = build(cpu_mesh(1, num_devices), num_experts=num_experts, top_k=3, slots=slots, dispatch=dispatch)
  tables = make_tables(*random_placement(np.random.default_rng(11), num_experts, num_devices, slots),
                       num_experts=num_experts)
  x = jax.random.normal(jax.random.key(11), (num_devices, 7, H))
  assert_matches_reference(moe, x, tables)
  out = call(moe, x, tables, capacity=7 * 3)
  chex.assert_shape(out.y, x.shape)
  chex.assert_shape(out.topk, (num_devices, 7, 3))
  assert int(out.dropped) == 0 and int(out.slot_counts.sum()) == num_devices * 7 * 3


def test_the_planner_prices_every_dispatch_backend():
  """`CostModel(dispatch=name)` takes the exchange's name: both tables name the same exchanges."""
  assert set(backends.DISPATCH) == set(DISPATCH_COSTS)


@pytest.mark.parametrize("data,expert,top_k", [(1, 8, 2), (2, 4, 1), (2, 4, 8), (1, 4, 3)])
def test_home_layout_matches_dense(data, expert, top_k):
  moe = build(cpu_mesh(data, expert), top_k=top_k, slots=16 // expert)
  x = jax.random.normal(jax.random.key(1), (8, 5, H))
  assert_matches_reference(moe, x)


@pytest.mark.parametrize("seed,data,expert", [(0, 1, 8), (1, 2, 4), (2, 1, 8)])
def test_random_placements_match_dense(seed, data, expert):
  rng = np.random.default_rng(seed)
  slots = 16 // expert + 2
  moe = build(cpu_mesh(data, expert), slots=slots)
  tables = make_tables(*random_placement(rng, 16, expert, slots), num_experts=16)
  x = jax.random.normal(jax.random.key(seed), (8, 7, H))
  assert_matches_reference(moe, x, tables)


def test_hot_expert_and_empty_experts_with_replicas():
  """Most tokens pick expert 0 (replicated on every device); experts 9..15 get nothing."""
  mesh = cpu_mesh(1, 8)
  moe = build(mesh, slots=3)
  rng = np.random.default_rng(3)
  slot_expert = home_placement(16, 8, 3)
  slot_expert[:, 2] = 0
  share = np.zeros((8, 24), np.float32)
  holders = np.flatnonzero(slot_expert.reshape(-1) == 0)
  share[:, holders] = rng.dirichlet(np.ones(len(holders)), size=8)
  share[:, slot_expert.reshape(-1) > 0] = 1.0
  replay = np.zeros((8, 6, 2), np.int32)
  replay[..., 1] = rng.integers(1, 9, size=(8, 6))
  x = jax.random.normal(jax.random.key(4), (8, 6, H))
  tables = make_tables(slot_expert, share, num_experts=16)
  assert_matches_reference(moe, x, tables, jnp.asarray(replay))
  out = call(moe, x, tables, jnp.asarray(replay))
  counts = np.asarray(out.counts)
  assert counts[0] == 48 and counts[9:].sum() == 0
  slot_counts = np.asarray(out.slot_counts)
  assert slot_counts[holders].sum() == 48 and np.count_nonzero(slot_counts[holders]) > 1


def test_parameters_have_param_dtype():
  moe = build(cpu_mesh(1, 8), param_dtype=jnp.bfloat16)
  assert {p.dtype for p in (moe.router[...], moe.w_gate_up[...], moe.w_down[...])} == {jnp.dtype(jnp.bfloat16)}


def test_replay_of_captured_routes_is_identical():
  moe = build(cpu_mesh(1, 8), top_k=4)
  x = jax.random.normal(jax.random.key(5), (8, 4, H))
  first = call(moe, x)
  again = call(moe, x, replay=first.topk)
  np.testing.assert_array_equal(first.y, again.y)
  np.testing.assert_array_equal(first.topk, again.topk)


def test_replay_gates_stay_differentiable():
  moe = build(cpu_mesh(1, 8))
  x = jax.random.normal(jax.random.key(6), (8, 3, H))
  replay = jax.random.randint(jax.random.key(0), (8, 3, 1), 0, 8)
  replay = jnp.concatenate([replay, replay + 8], axis=-1)
  assert_matches_reference(moe, x, replay=replay)


def test_small_capacity_counts_dropped_pairs():
  mesh = cpu_mesh(1, 8)
  moe = build(mesh, top_k=2, slots=2)
  x = jax.random.normal(jax.random.key(8), (8, 16, H))
  out = call(moe, x, capacity=8)
  expert_NxK = np.asarray(out.topk).reshape(8, 16 * 2)
  sent_SrcxDst = np.stack([np.bincount(row // 2, minlength=8) for row in expert_NxK])
  assert int(out.dropped) == int(np.maximum(sent_SrcxDst - 8, 0).sum()) > 0
  assert int(out.slot_counts.sum()) == 8 * 16 * 2 - int(out.dropped)


def test_new_tables_do_not_recompile():
  mesh = cpu_mesh(1, 8)
  moe = build(mesh, slots=3)
  graphdef, state = nnx.split(moe)
  traces = []

  @jax.jit
  def forward(state, x, tables):
    traces.append(1)
    return nnx.merge(graphdef, state)(x, tables, capacity=64).y

  x = jax.random.normal(jax.random.key(9), (8, 4, H))
  rng = np.random.default_rng(0)
  outs = [forward(state, x, make_tables(*random_placement(rng, 16, 8, 3), num_experts=16)) for _ in range(3)]
  assert len(traces) == 1
  np.testing.assert_allclose(outs[0], outs[2], rtol=1e-5, atol=1e-5)


def test_aux_loss_is_switch_style():
  moe = build(cpu_mesh(1, 8), top_k=2)
  x = jax.random.normal(jax.random.key(10), (8, 4, H))
  out = call(moe, x)
  probs = jax.nn.softmax(x.reshape(-1, H) @ moe.router[...], -1)
  expected = 16 * np.sum(np.asarray(out.counts) / (32 * 2) * np.asarray(probs.mean(0)))
  np.testing.assert_allclose(out.aux_loss, expected, rtol=1e-5)


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_experts=12), "not divisible"),
    (dict(slots=1), "slots_per_device"),
    (dict(top_k=17), "top_k"),
])
def test_bad_config_is_refused(kwargs, message):
  with pytest.raises(ValueError, match=message):
    build(cpu_mesh(1, 8), **kwargs)


def test_bad_replay_and_tables_are_refused():
  moe = build(cpu_mesh(1, 8))
  x = jnp.ones((8, 2, H))
  with pytest.raises(ValueError, match=r"\[0, 16\)"):
    moe(x, replay=jnp.full((8, 2, 2), 16, jnp.int32))
  with pytest.raises(ValueError, match="shape"):
    moe(x, replay=jnp.zeros((8, 2, 3), jnp.int32))
  with pytest.raises(ValueError, match="slots"):
    moe(x, home_tables(16, 8, 2))
  with pytest.raises(ValueError, match="divisible"):
    moe(jnp.ones((4, 2, H)))


def test_ragged_dispatch_is_refused_on_cpu():
  moe = build(cpu_mesh(1, 8), dispatch="ragged")
  with pytest.raises(ValueError, match="ragged_all_to_all"):
    moe(jnp.ones((8, 2, H)))


def test_ragged_dispatch_traces_values_and_gradients(monkeypatch):
  """XLA runs ragged_all_to_all on GPU only, but its program (incl. the custom-VJP kernels' axis types,
  with the Pallas permute/combine as on GPU: received rows are typed invariant) must trace here: the GPU
  test then checks values."""
  from foremoe_jax import backends
  real = backends.choose_dispatch
  monkeypatch.setattr(backends, "choose_dispatch", lambda requested, plat=None: real(requested, "gpu"))
  moe = build(cpu_mesh(2, 4), top_k=2, slots=5, dispatch="ragged", dispatch_backend="interpret")
  graphdef, state = nnx.split(moe)
  x = jnp.ones((8, 4, H))

  def loss(state):
    return jnp.sum(nnx.merge(graphdef, state)(x, capacity=64).y ** 2)

  jaxpr = jax.make_jaxpr(jax.grad(loss))(state)
  assert "ragged_all_to_all" in str(jaxpr)


def test_pallas_kernel_gradients_trace_inside_shard_map():
  """The layer with the Pallas grouped matmul and permute/combine on a (data, expert) mesh: their custom
  VJPs must return cotangents of their inputs' mesh-axis types. Traced only: executing the GPU interpreter under
  shard_map on 8 virtual CPU devices can deadlock; the GPU tests run it for real."""
  cfg = MoEConfig(d_model=64, d_ff_expert=32, num_experts=8, top_k=2, slots_per_device=3, gmm_backend="interpret",
                  dispatch_backend="interpret", dtype=jnp.bfloat16)
  moe = MoE(cfg, mesh=cpu_mesh(2, 4), rngs=nnx.Rngs(1))
  graphdef, state = nnx.split(moe)
  x = jnp.ones((8, 2, 64))

  def loss(state):
    return jnp.sum(nnx.merge(graphdef, state)(x, capacity=8).y.astype(jnp.float32) ** 2)

  assert "custom_vjp_call" in str(jax.make_jaxpr(jax.grad(loss))(state))
