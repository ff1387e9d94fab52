"""CPU tests of permute/combine: the Pallas Triton kernels run in the Pallas interpreter
("interpret" backend) and are checked, like the XLA path, against float64 numpy on values and on
gradients through the custom VJPs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import backend as kb
from pallas_kernels import triton_dispatch as td

BACKENDS = ["xla", "interpret"]
DTYPES = [jnp.float32, jnp.bfloat16]
# bf16 outputs are rounded once (8 mantissa bits); f32 ones only see summation-order differences.
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}
T, D = 37, 96  # neither a multiple of the default tiles (64 or 32 rows, 256 columns)


def rel_err(x, ref):
  return np.linalg.norm(np.float64(x) - ref) / max(np.linalg.norm(ref), 1e-30)


def rand(rng, shape, dtype=jnp.float32):
  return jnp.asarray(rng.normal(size=shape), jnp.float32).astype(dtype)


def gather_np(x, idx):
  x, idx = np.float64(x), np.asarray(idx)
  valid = (idx >= 0) & (idx < x.shape[0])
  return np.where(valid[..., None], x[np.where(valid, idx, 0)], 0)


def scatter_np(rows, idx, num_rows):
  """The adjoint of gather_np: rows[..., D] added onto their (valid) source rows."""
  rows, idx = np.float64(rows).reshape(-1, np.shape(rows)[-1]), np.asarray(idx).reshape(-1)
  valid = (idx >= 0) & (idx < num_rows)
  out = np.zeros((num_rows, rows.shape[1]))
  np.add.at(out, idx[valid], rows[valid])
  return out


def permute_idx(rng, k, unique_rows):
  """Expert-sorted slots of T tokens x k (unique: a permutation of the tokens) with padding slots:
  negative, == T, and far out of range."""
  tokens = rng.permutation(T) if unique_rows else rng.permutation(T * k) // k
  return jnp.asarray(np.concatenate([[-1], tokens[:20], [T, -7], tokens[20:], [10**6]]), jnp.int32)


def combine_idx(rng, k, unique_rows):
  """[T, k] rows of y (R = T*k + 3 rows); unique: each row used at most once, else repeats; a few
  pairs dropped (-1, == R, < 0)."""
  r = T * k + 3
  idx = rng.permutation(r)[: T * k] if unique_rows else rng.integers(0, r, T * k)
  idx = idx.reshape(T, k)
  idx[[1, 5, 30], [0, k - 1, k // 2]] = [-1, r, -5]
  return r, jnp.asarray(idx, jnp.int32)


def inverse_of(idx, k):
  """[T, k]: the rows reading each token (-1 fills), in a shuffled column order."""
  rows = [[r for r, t in enumerate(np.asarray(idx)) if t == token] for token in range(T)]
  inverse = np.full((T, k), -1, np.int32)
  for token, rs in enumerate(rows):
    inverse[token, np.random.default_rng(token).permutation(k)[:len(rs)]] = rs
  return jnp.asarray(inverse)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,unique_rows,with_inverse", [(1, True, False), (8, False, False), (8, False, True)])
def test_permute_values_and_grads(backend, dtype, k, unique_rows, with_inverse):
  rng = np.random.default_rng(k)
  x, idx = rand(rng, (T, D), dtype), permute_idx(rng, k, unique_rows)
  inverse = inverse_of(idx, k) if with_inverse else None
  dy = rand(rng, (idx.shape[0], D), dtype)
  f = jax.jit(lambda a: jax.vjp(lambda b: pk.permute(b, idx, unique_rows=unique_rows, inverse_TxK=inverse,
                                                     backend=backend), a))
  out, vjp = f(x)
  assert out.dtype == dtype and out.shape == (idx.shape[0], D)
  np.testing.assert_array_equal(np.float64(out), gather_np(x, idx))  # a gather is exact
  (dx,) = vjp(dy)
  assert dx.dtype == dtype and rel_err(dx, scatter_np(dy, idx, T)) < TOL[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 8])
@pytest.mark.parametrize("unique_rows", [False, True])
def test_combine_values_and_grads(backend, dtype, k, unique_rows):
  rng = np.random.default_rng(10 + k)
  r, idx = combine_idx(rng, k, unique_rows)
  y, dout = rand(rng, (r, D), dtype), rand(rng, (T, D), dtype)
  w = jax.nn.softmax(rand(rng, (T, k)), axis=-1)
  out_dtype = jnp.float32 if k == 8 else None  # also: an output wider than y
  loss = lambda a, b: jnp.sum(pk.combine(a, idx, b, unique_rows=unique_rows, backend=backend)
                              .astype(jnp.float32) * dout.astype(jnp.float32))
  out = jax.jit(lambda a, b: pk.combine(a, idx, b, unique_rows=unique_rows, out_dtype=out_dtype,
                                        backend=backend))(y, w)
  dy, dw = jax.jit(jax.grad(loss, argnums=(0, 1)))(y, w)
  ws, rows = np.float64(w), gather_np(y, idx)
  assert out.dtype == (out_dtype or dtype) and out.shape == (T, D)
  assert rel_err(out, np.einsum("tkd,tk->td", rows, ws)) < TOL[out_dtype or dtype]
  ref_dy = scatter_np(ws[:, :, None] * np.float64(dout)[:, None, :], idx, r)
  assert dy.dtype == dtype and rel_err(dy, ref_dy) < TOL[dtype]
  assert rel_err(dw, np.einsum("tkd,td->tk", rows, np.float64(dout))) < 1e-5


def test_kernels_partial_tiles_and_nan_padding():
  """Small tiles so the grid has many programs and both T and D end in partial tiles; rows of y
  that only padding indices point at hold NaN and must not leak."""
  rng = np.random.default_rng(3)
  cfg = td.GatherConfig(block_rows=8, block_d=16, num_warps=1)
  x, idx = rand(rng, (T, 40)), jnp.asarray(rng.integers(-4, T + 4, 45), jnp.int32)
  scale = rand(rng, (45,))
  np.testing.assert_array_equal(td.gather_rows(x, idx, config=cfg, interpret=True),
                                gather_np(x, idx))
  out = td.gather_rows(x, idx, scale, out_dtype=jnp.bfloat16, config=cfg, interpret=True)
  assert out.dtype == jnp.bfloat16
  assert rel_err(out, np.float64(scale)[:, None] * gather_np(x, idx)) < 1e-2
  y = rand(rng, (30, 40)).at[7].set(jnp.nan)
  idx_TxK = jnp.asarray(rng.integers(-3, 33, (T, 3)), jnp.int32)
  idx_TxK = jnp.where(idx_TxK == 7, -1, idx_TxK).at[2, 1].set(7 + 30)  # 37: past R, not row 7
  w = rand(rng, (T, 3))
  out = td.combine(y, idx_TxK, w, config=cfg, interpret=True)
  assert np.all(np.isfinite(out))
  assert rel_err(out, np.einsum("tkd,tk->td", gather_np(y, idx_TxK), np.float64(w))) < 1e-5


def test_empty_inputs_and_bad_config():
  x = jnp.ones((0, 8))
  assert pk.permute(x, jnp.array([0, -1]), backend="interpret").shape == (2, 8)
  np.testing.assert_array_equal(pk.combine(x, jnp.zeros((3, 2), jnp.int32), jnp.ones((3, 2)),
                                           backend="interpret"), np.zeros((3, 8)))
  with pytest.raises(ValueError, match="power of two"):
    td.GatherConfig(block_rows=48)


def test_backend_requests(monkeypatch):
  monkeypatch.delenv(kb.ENV_VAR, raising=False)
  assert kb.resolve("permute") == "xla" and kb.resolve("combine", "interpret") == "interpret"
  with pytest.raises(RuntimeError, match="triton"):  # a fast path asked for off GPU: no fallback
    pk.permute(jnp.ones((4, 8)), jnp.arange(4), backend="triton")
  with pytest.raises(ValueError, match="no combine kernel"):
    pk.combine(jnp.ones((4, 8)), jnp.zeros((2, 2), jnp.int32), jnp.ones((2, 2)),
               backend="mosaic_gpu")


def test_kernels_lower_to_triton_for_cuda():
  """The interpreter does not check Triton's rules (power-of-two tiles, pointer indexing); lowering
  for CUDA on CPU does, without a GPU."""
  x, idx_R = jnp.ones((100, 2048), jnp.bfloat16), jnp.zeros((800,), jnp.int32)
  idx_TxK, w = jnp.zeros((100, 8), jnp.int32), jnp.ones((100, 8))
  for fn, args in [(td.gather_rows, (x, idx_R)), (td.gather_rows, (x, idx_R, jnp.ones(800))),
                   (td.combine, (x, idx_TxK, w))]:
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "triton" in text


def test_kernels_take_invariant_inputs_inside_shard_map():
  """Under shard_map a pallas_call must be told how its result varies, also when every input is
  invariant (rows received by ragged_all_to_all are typed so). Traced only: the interpreter under
  shard_map on virtual CPU devices can deadlock."""
  from jax.sharding import PartitionSpec as P
  mesh = jax.make_mesh((2,), ("expert",), axis_types=(jax.sharding.AxisType.Explicit,))
  x, idx = jnp.ones((T, D), jnp.bfloat16), jnp.arange(T, dtype=jnp.int32)

  def body(x, idx):
    rows = pk.permute(x, idx, backend="interpret")
    return pk.combine(rows, idx[:, None], jnp.ones((T, 1)), unique_rows=True, backend="interpret")

  f = jax.shard_map(body, mesh=mesh, in_specs=(P(), P()), out_specs=P())
  assert jax.eval_shape(f, x, idx).shape == (T, D)
