"""A whole bf16 step on GPUs (Mosaic kernels, padded all_to_all, ppermute refills) under changing
placements equals the static layout within bf16 tolerance, with and without prefetch (GPU only)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from foremoe_jax import MoEConfig
from foremoe_jax.executor import Executor
from foremoe_jax.step_tables import prepare_step
from foremoe_jax.moe_stack import MoEStack
from foremoe_jax.planner import CostModel, PlanConfig, plan_step
from moe_reference import cpu_mesh

pytestmark = pytest.mark.gpu
L, H, F, K, M, T = 2, 256, 128, 4, 4, 64  # H, 2F multiples of the Mosaic tiles: the fast path runs


@pytest.fixture(autouse=True)
def needs_two_gpus():
  if jax.devices()[0].platform != "gpu" or len(jax.devices()) < 2:
    pytest.skip("needs 2 or more GPUs")


def loss_fn(model, batch, *, tables, working, capacity):
  out = model(batch["x"], tables, batch["replay"], capacity=capacity, working=working)
  return jnp.mean((out.y.astype(jnp.float32) - batch["target"]) ** 2), {"dropped": out.dropped}


def rel_err(a, b):
  a, b = np.float64(np.asarray(a, np.float32)), np.float64(np.asarray(b, np.float32))
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def test_bf16_step_under_changing_placements_equals_static():
  num_devices = len(jax.devices())
  num_experts, slots = 8 * num_devices, 9
  mesh = cpu_mesh(1, num_devices)
  cfg = MoEConfig(d_model=H, d_ff_expert=F, num_experts=num_experts, top_k=K, slots_per_device=slots,
                  dispatch="padded", dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  make = lambda: MoEStack(cfg, L, mesh=mesh, rngs=nnx.Rngs(0))  # noqa: E731
  rng = np.random.default_rng(0)
  hot = rng.dirichlet(np.full(num_experts, 0.2), size=(M, L))  # skewed, different per micro-step
  batches, counts = [], np.zeros((M, L, num_devices, num_experts), np.int64)
  for m in range(M):
    routes = np.stack([np.stack([rng.choice(num_experts, K, replace=False, p=hot[m, l]) for l in range(L)])
                       for _ in range(num_devices * T)]).reshape(num_devices, T, L, K).astype(np.int32)
    for l in range(L):
      np.add.at(counts[m, l], (np.repeat(np.arange(num_devices), T * K), routes[:, :, l].reshape(-1)), 1)
    keys = jax.random.split(jax.random.key(m), 2)
    batches.append({"x": jax.random.normal(keys[0], (num_devices, T, H), jnp.bfloat16),
                    "target": jax.random.normal(keys[1], (num_devices, T, H)), "replay": jnp.asarray(routes)})
  results = {}
  for policy, prefetch in (("static", True), ("foremoe", True), ("foremoe", False)):
    plan = plan_step(counts, PlanConfig(num_experts, num_devices, slots, policy=policy,
                                        cost=CostModel(link_bytes_per_s=1e18)))
    step = prepare_step(plan, counts, num_experts, capacity=T * K)
    model = make()
    ex = Executor(model, optax.sgd(0.1), loss_fn, mesh, prefetch=prefetch)
    params, opt_state = ex.init(model)
    grads = ex.gradients(params, batches, step)
    params, _, out = ex.train_step(params, opt_state, batches, step)
    results[policy, prefetch] = (plan, step, out, grads, params)
  static_plan, _, want, want_grads, want_params = results["static", True]
  for key in (("foremoe", True), ("foremoe", False)):
    plan, step, out, grads, params = results[key]
    assert plan.imbalance(counts) < static_plan.imbalance(counts) and step.moved_slots > 0
    assert int(np.sum(out["metrics"]["dropped"])) == 0
    np.testing.assert_allclose(out["loss"], want["loss"], rtol=1e-2)
    for got, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
      assert rel_err(got, ref) < 2e-2
    for got, ref in zip(jax.tree.leaves(params), jax.tree.leaves(want_params)):
      assert rel_err(got, ref) < 1e-2
