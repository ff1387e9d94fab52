"""GPU tests of the Mosaic GPU kernels against float64 numpy and XLA (run on an H100; skipped elsewhere)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import backend as kb
from pallas_kernels import mosaic_gmm, mosaic_tgmm
from tests.test_kernels import gmm_np, rand, rel_err, tgmm_np

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not kb.is_hopper(), reason="needs a Hopper GPU")]

# Sizes that are not tile multiples, empty and skewed groups, M padded past the groups.
# M=2100 is not a multiple of 8 (the wrapper pads it for TMA).
GROUPS = [
    (1000, [0, 300, 1, 0, 555, 44]),
    (2100, [1500, 0, 3, 0, 100, 1]),
]
GMM_CONFIGS = [
    mosaic_gmm.GmmConfig(),
    mosaic_gmm.GmmConfig(delay_release=1),
    mosaic_gmm.GmmConfig(epi_split=2, max_concurrent_steps=4, delay_release=1),
    mosaic_gmm.GmmConfig(block_n=64, max_concurrent_steps=4, grid_block_n=1),
    mosaic_gmm.GmmConfig(num_compute_wgs=1, block_n=192, max_concurrent_steps=4),
    mosaic_gmm.GmmConfig(delay_release=1, grid_block_n=4),
    mosaic_gmm.GmmConfig(block_n=64, max_concurrent_steps=5, delay_release=1),
    mosaic_gmm.GmmConfig(block_n=256, split_m=True, delay_release=1),
    mosaic_gmm.GmmConfig(block_m=256, split_m=True, max_concurrent_steps=2),
]


@pytest.mark.parametrize("m,sizes", GROUPS)
@pytest.mark.parametrize("config", GMM_CONFIGS, ids=str)
@pytest.mark.parametrize("transpose_rhs", [False, True])
def test_mosaic_gmm(m, sizes, config, transpose_rhs):
  k, n = 256, 768
  lhs = rand(1, (m, k), jnp.bfloat16)
  rhs = rand(2, (len(sizes), n, k) if transpose_rhs else (len(sizes), k, n), jnp.bfloat16)
  out = jax.jit(lambda a, b, g: mosaic_gmm.gmm(a, b, g, transpose_rhs=transpose_rhs,
                                               config=config))(lhs, rhs, jnp.array(sizes))
  out = np.asarray(out.astype(jnp.float32))
  assert rel_err(out, gmm_np(lhs.astype(jnp.float32), rhs.astype(jnp.float32), sizes,
                             transpose_rhs)) < 1e-2
  np.testing.assert_array_equal(out[sum(sizes):], 0)


def test_f32_outputs_use_fitting_default_tiles():
  sizes = jnp.array([900, 0, 77])
  lhs, rhs = rand(8, (1000, 2048), jnp.bfloat16), rand(9, (3, 2048, 1536), jnp.bfloat16)
  out = pk.gmm(lhs, rhs, sizes, backend="mosaic_gpu", preferred_element_type=jnp.float32)
  assert out.dtype == jnp.float32
  assert rel_err(np.asarray(out), gmm_np(lhs.astype(jnp.float32), rhs.astype(jnp.float32),
                                         [900, 0, 77])) < 1e-3
  dw = pk.tgmm(lhs, lhs[:, :1536], sizes, backend="mosaic_gpu", preferred_element_type=jnp.float32)
  ref = tgmm_np(np.float32(lhs.astype(jnp.float32)), np.float32(lhs[:, :1536].astype(jnp.float32)),
                [900, 0, 77])
  assert rel_err(np.asarray(dw), ref) < 1e-3


@pytest.mark.parametrize("m,sizes", GROUPS)
@pytest.mark.parametrize("config", [mosaic_tgmm.TgmmConfig(),
                                    mosaic_tgmm.TgmmConfig(block_n=64, max_concurrent_steps=2,
                                                           grid_block_n=1)],
                         ids=str)
def test_mosaic_tgmm_nan_padding(m, sizes, config):
  k, n = 256, 384
  end = sum(sizes)
  lhs = rand(3, (m, k), jnp.bfloat16).at[end:].set(jnp.nan)
  rhs = rand(4, (m, n), jnp.bfloat16).at[end:].set(jnp.nan)
  out = jax.jit(lambda a, b, g: mosaic_tgmm.tgmm(a, b, g, config=config))(lhs, rhs,
                                                                          jnp.array(sizes))
  ref = tgmm_np(np.float32(lhs.astype(jnp.float32))[:end], np.float32(rhs.astype(jnp.float32))[:end],
                sizes)
  assert rel_err(np.asarray(out.astype(jnp.float32)), ref) < 1e-2


@pytest.mark.parametrize("m", [2001, 4096])
def test_default_backend_is_mosaic_and_grads_match_xla(monkeypatch, m):
  monkeypatch.delenv(kb.ENV_VAR, raising=False)
  assert kb.resolve("gmm") == "mosaic_gpu" and kb.resolve("tgmm") == "mosaic_gpu"
  sizes, k, n = jnp.array([700, 0, 1, 1200, 100]), 512, 768
  lhs, rhs, dout = rand(5, (m, k), jnp.bfloat16), rand(6, (5, k, n), jnp.bfloat16), rand(7, (m, n))

  def grads(backend):
    loss = lambda a, w: jnp.sum(pk.gmm(a, w, sizes, backend=backend).astype(jnp.float32) * dout)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(lhs, rhs)

  (v, (da, dw)), (rv, (rda, rdw)) = grads(None), grads("xla")
  assert abs(float(v) - float(rv)) <= 1e-2 * abs(float(rv)) + 1.0
  assert rel_err(np.float32(da.astype(jnp.float32)), np.float64(rda.astype(jnp.float32))) < 1e-2
  assert rel_err(np.float32(dw.astype(jnp.float32)), np.float64(rdw.astype(jnp.float32))) < 1e-2


def test_unsupported_shape_falls_back_only_when_not_asked(monkeypatch):
  monkeypatch.delenv(kb.ENV_VAR, raising=False)
  lhs, rhs, sizes = jnp.ones((64, 48), jnp.bfloat16), jnp.ones((2, 48, 64), jnp.bfloat16), jnp.array([30, 30])
  assert pk.gmm(lhs, rhs, sizes).shape == (64, 64)  # default: logged fallback to XLA
  with pytest.raises(ValueError, match="cannot run these inputs"):
    pk.gmm(lhs, rhs, sizes, backend="mosaic_gpu")


@pytest.mark.parametrize("unique", [False, True])
def test_triton_permute_combine_match_xla(unique):
  """The Pallas Triton gathers against XLA on values and gradients (odd sizes, padding indices)."""
  t, k, d = 1001, 8, 2048 + 96
  x = rand(3, (t, d), jnp.bfloat16)
  # unique: every source row is read at most once (the case whose backward is a gather too).
  idx_R = jax.random.permutation(jax.random.key(4), t) if unique else \
      jax.random.randint(jax.random.key(4), (t * k,), -3, t + 3)
  y = rand(5, (t * k, d), jnp.bfloat16)
  order = jax.random.permutation(jax.random.key(6), t * k) if unique else \
      jax.random.randint(jax.random.key(6), (t * k,), -2, t * k + 2)
  idx_TxK = order.reshape(t, k).astype(jnp.int32)
  w = jax.nn.softmax(rand(7, (t, k), jnp.float32))

  def run(backend):
    def loss(x, y, w):
      p = pk.permute(x, idx_R, backend=backend, unique_rows=unique)
      c = pk.combine(y, idx_TxK, w, backend=backend, unique_rows=unique)
      return jnp.sum(p.astype(jnp.float32) ** 2) + jnp.sum(c.astype(jnp.float32) * 1.5), (p, c)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(x, y, w)

  (_, outs), grads = run("triton")
  (_, want_outs), want_grads = run("xla")
  for got, want in zip((*outs, *grads), (*want_outs, *want_grads)):
    assert rel_err(np.asarray(got.astype(jnp.float32)), np.asarray(want.astype(jnp.float32))) < 1e-2
