"""Ragged dispatch equals padded dispatch on values and gradients (GPU only: XLA runs ragged_all_to_all
on GPU/TPU, not CPU)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from foremoe_jax import MoE, MoEConfig, make_tables
from moe_reference import cpu_mesh, random_placement

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def needs_two_gpus():
  if jax.devices()[0].platform != "gpu" or len(jax.devices()) < 2:
    pytest.skip("needs 2 or more GPUs")


@pytest.mark.parametrize("top_k,skewed,masked", [(2, False, False), (4, True, False), (4, True, True)])
def test_ragged_matches_padded(top_k, skewed, masked):
  """`masked`: a token mask (packed rows' padding) routes 40% of the tokens nowhere."""
  num_devices = len(jax.devices())
  mesh = cpu_mesh(1, num_devices)
  num_experts, slots = 4 * num_devices, 5
  rng = np.random.default_rng(top_k)
  tables = make_tables(*random_placement(rng, num_experts, num_devices, slots), num_experts=num_experts)
  x = jax.random.normal(jax.random.key(0), (2 * num_devices, 64, 32))
  if skewed:
    x = x + 3.0 * jax.random.normal(jax.random.key(1), (32,))
  token_mask = jax.random.uniform(jax.random.key(2), x.shape[:2]) < 0.6 if masked else None
  outs = {}
  for mode in ("padded", "ragged"):
    cfg = MoEConfig(d_model=32, d_ff_expert=16, num_experts=num_experts, top_k=top_k, slots_per_device=slots,
                    dispatch=mode)
    moe = MoE(cfg, mesh=mesh, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(moe)
    capacity = 128 * top_k  # every pair of a source may go to one destination

    def loss(state, x):
      out = nnx.merge(graphdef, state)(x, tables, capacity=capacity, token_mask=token_mask)
      return jnp.sum(out.y ** 2), out

    (value, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(state, x)
    outs[mode] = (out, grads)
  (padded, g_padded), (ragged, g_ragged) = outs["padded"], outs["ragged"]
  assert int(padded.dropped) == int(ragged.dropped) == 0
  np.testing.assert_allclose(ragged.y, padded.y, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(ragged.slot_counts, padded.slot_counts)
  if masked:
    assert (np.asarray(ragged.y)[~np.asarray(token_mask)] == 0).all()
    assert int(ragged.slot_counts.sum()) == int(token_mask.sum()) * top_k
  for a, b in zip(jax.tree.leaves(g_ragged), jax.tree.leaves(g_padded)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)
