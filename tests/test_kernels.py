"""CPU tests of pallas_kernels: the Pallas kernels run in the GPU interpreter ("interpret" backend)
and are checked, like the XLA path, against float64 numpy on values and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import importlib

import pallas_kernels as pk
from pallas_kernels import backend as kb

BACKENDS = ["xla", "interpret"]
pk_gmm = importlib.import_module("pallas_kernels.gmm")  # the module (the package exports the function)


def _groups_np(sizes):
  ends = np.cumsum(sizes)
  return list(zip(ends - np.asarray(sizes), ends))


def gmm_np(lhs, rhs, sizes, transpose_rhs=False):
  lhs, rhs = np.float64(lhs), np.float64(rhs)
  out = np.zeros((lhs.shape[0], rhs.shape[1] if transpose_rhs else rhs.shape[2]))
  for g, (a, b) in enumerate(_groups_np(sizes)):
    out[a:b] = lhs[a:b] @ (rhs[g].T if transpose_rhs else rhs[g])
  return out


def tgmm_np(lhs, rhs, sizes):
  lhs, rhs = np.float64(lhs), np.float64(rhs)
  return np.stack([lhs[a:b].T @ rhs[a:b] for a, b in _groups_np(sizes)])


def rel_err(x, ref):
  return np.linalg.norm(np.float64(x) - ref) / max(np.linalg.norm(ref), 1e-30)


def rand(key, shape, dtype=jnp.float32):
  return jax.random.normal(jax.random.key(key), shape, jnp.float32).astype(dtype)


# (M, K, N, group sizes): empty groups, skew, sizes that are not tile multiples, M padded past the sum.
CASES = [
    (128, 64, 64, [64, 64]),
    (200, 64, 128, [0, 37, 60, 3, 0]),
    (256, 128, 64, [5, 0, 190, 1]),
    (96, 64, 64, [0, 0, 0]),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m,k,n,sizes", CASES)
def test_gmm_values(backend, m, k, n, sizes):
  lhs, rhs = rand(1, (m, k)), rand(2, (len(sizes), k, n))
  out = pk.gmm(lhs, rhs, jnp.array(sizes), backend=backend)
  ref = gmm_np(lhs, rhs, sizes)
  assert out.shape == (m, n) and out.dtype == lhs.dtype
  assert rel_err(out, ref) < 1e-5 if sum(sizes) else np.all(np.asarray(out) == 0)
  np.testing.assert_array_equal(np.asarray(out)[sum(sizes):], 0)


def _tuned_gmm_configs():
  from pallas_kernels import mosaic_gmm
  return sorted({c for table in mosaic_gmm.TUNED_BY_CARD.values() for c in table.values()}, key=str)


@pytest.mark.parametrize("cfg", _tuned_gmm_configs(),
                         ids=lambda c: f"n{c.block_n}_split{int(c.split_m)}_snake{c.grid_block_n}_epi{c.epi_split}")
def test_tuned_gmm_configs_in_the_interpreter(cfg):
  """The warp-specialized kernel (two compute warpgroups splitting the N tile or the rows, one TMA loader)
  in every tile a card's tuned table commits (tile order, epilogue chunks), on boundary-straddling, empty
  and tail row tiles, against float64 numpy."""
  from pallas_kernels import mosaic_gmm
  m, k, n, sizes = 300, 128, 2 * cfg.cta_n, [70, 0, 130, 50]  # block 0: group 2's rows 70-127 miss row half 0
  lhs, rhs = rand(1, (m, k), jnp.bfloat16), rand(2, (len(sizes), k, n), jnp.bfloat16)
  out = mosaic_gmm.gmm(lhs, rhs, jnp.array(sizes), config=cfg, interpret=pk_gmm._interpret_params())
  assert rel_err(out, gmm_np(lhs, rhs, sizes)) < 1e-2  # bf16 output rounding
  np.testing.assert_array_equal(np.asarray(out, np.float32)[sum(sizes):], 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gmm_bf16_transpose_rhs_matches_ragged_dot(backend):
  sizes = [70, 0, 33, 90]
  lhs, rhs = rand(3, (224, 64), jnp.bfloat16), rand(4, (4, 128, 64), jnp.bfloat16)
  out = pk.gmm(lhs, rhs, jnp.array(sizes), transpose_rhs=True, backend=backend,
               preferred_element_type=jnp.float32)
  ref = jax.lax.ragged_dot(lhs, jnp.swapaxes(rhs, 1, 2), jnp.array(sizes),
                           preferred_element_type=jnp.float32)
  assert out.dtype == jnp.float32
  assert rel_err(out, gmm_np(lhs, rhs, sizes, transpose_rhs=True)) < 1e-5
  assert rel_err(out, np.float64(ref)) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_tgmm_ignores_padding_even_nan(backend):
  sizes = [0, 37, 60, 3, 0]
  lhs = rand(5, (256, 64)).at[100:].set(jnp.nan)
  rhs = rand(6, (256, 128)).at[100:].set(jnp.nan)
  out = pk.tgmm(lhs, rhs, jnp.array(sizes), backend=backend)
  assert out.shape == (5, 64, 128)
  ref = tgmm_np(np.asarray(lhs)[:100], np.asarray(rhs)[:100], sizes)
  assert rel_err(out, ref) < 1e-5
  np.testing.assert_array_equal(np.asarray(out)[[0, 4]], 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("transpose_rhs", [False, True])
def test_gmm_grads(backend, transpose_rhs):
  sizes, m, k, n = [40, 0, 77, 11], 160, 64, 128
  lhs = rand(7, (m, k))
  rhs = rand(8, (4, n, k) if transpose_rhs else (4, k, n))
  dout = rand(9, (m, n))
  loss = lambda a, w: jnp.sum(pk.gmm(a, w, jnp.array(sizes), transpose_rhs=transpose_rhs,
                                     backend=backend) * dout)
  dlhs, drhs = jax.jit(jax.grad(loss, argnums=(0, 1)))(lhs, rhs)
  w = np.swapaxes(np.float64(rhs), 1, 2) if transpose_rhs else np.float64(rhs)
  ref_dlhs = gmm_np(dout, w, sizes, transpose_rhs=True)
  ref_drhs = tgmm_np(lhs, dout, sizes)
  assert rel_err(dlhs, ref_dlhs) < 1e-5
  assert rel_err(drhs, np.swapaxes(ref_drhs, 1, 2) if transpose_rhs else ref_drhs) < 1e-5
  ref_grads = jax.grad(lambda a, w: jnp.sum(jax.lax.ragged_dot(a, w, jnp.array(sizes)) * dout),
                       argnums=(0, 1))(lhs, jnp.swapaxes(rhs, 1, 2) if transpose_rhs else rhs)
  assert rel_err(dlhs, np.float64(ref_grads[0])) < 1e-5


def test_tgmm_grads_xla():
  sizes = [20, 0, 44]
  lhs, rhs, dout = rand(10, (64, 64)), rand(11, (64, 32)), rand(12, (3, 64, 32))
  loss = lambda a, b: jnp.sum(pk.tgmm(a, b, jnp.array(sizes), backend="xla") * dout)
  da, db = jax.grad(loss, argnums=(0, 1))(lhs, rhs)
  ref = jax.grad(lambda a, b: jnp.sum(jnp.stack(
      [a[s:e].T @ b[s:e] for s, e in _groups_np(sizes)]) * dout), argnums=(0, 1))(lhs, rhs)
  assert rel_err(da, np.float64(ref[0])) < 1e-5 and rel_err(db, np.float64(ref[1])) < 1e-5


def test_permute_combine_values_and_grads():
  t, k, d, r = 10, 2, 16, 24
  x = rand(13, (t, d))
  idx_R = jnp.array(np.r_[np.random.default_rng(0).permutation(t * k) // k, [-1, t, -1, t]])
  y = rand(14, (r, d))
  idx_TxK = jnp.array(np.random.default_rng(1).permutation(r)[: t * k].reshape(t, k))
  idx_TxK = idx_TxK.at[3, 1].set(-1)  # a dropped (token, expert) pair adds nothing
  w = jax.nn.softmax(rand(15, (t, k)))
  xs, ys, ws, ii, jj = map(np.asarray, (x, y, w, idx_R, idx_TxK))
  np.testing.assert_allclose(pk.permute(x, idx_R), np.where((ii >= 0)[:, None] & (ii < t)[:, None],
                                                            xs[np.clip(ii, 0, t - 1)], 0))
  ref = np.einsum("tkd,tk->td", np.where((jj >= 0)[..., None], ys[jj], 0), ws)
  np.testing.assert_allclose(pk.combine(y, idx_TxK, w), ref, rtol=1e-5, atol=1e-6)
  dout_R, dout_T = rand(16, (r, d)), rand(17, (t, d))
  dx = jax.grad(lambda a: jnp.sum(pk.permute(a, idx_R) * dout_R))(x)
  ref_dx = np.zeros((t, d))
  np.add.at(ref_dx, ii[ii >= 0][ii[ii >= 0] < t], np.asarray(dout_R)[(ii >= 0) & (ii < t)])
  np.testing.assert_allclose(dx, ref_dx, rtol=1e-5, atol=1e-5)
  ref_dy, ref_dw = np.zeros((r, d)), np.zeros((t, k))
  for ti in range(t):
    for ki in range(k):
      if jj[ti, ki] >= 0:
        ref_dy[jj[ti, ki]] += ws[ti, ki] * np.asarray(dout_T)[ti]
        ref_dw[ti, ki] = ys[jj[ti, ki]] @ np.asarray(dout_T)[ti]
  for unique_rows in (False, True):  # idx_TxK uses each row at most once: both paths apply
    dy, dw = jax.grad(lambda a, b: jnp.sum(pk.combine(a, idx_TxK, b, unique_rows=unique_rows)
                                           * dout_T), argnums=(0, 1))(y, w)
    np.testing.assert_allclose(dy, ref_dy, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, ref_dw, rtol=1e-5, atol=1e-5)


def _lowered_chars(layer, num_layers, x, w):
  """Characters of the lowered forward + backward of `num_layers` identical layer calls."""
  def f(x, ws):
    for w in ws:
      x = layer(x, w)
    return x.astype(jnp.float32).sum()
  return len(jax.jit(jax.grad(f, argnums=(0, 1))).lower(x, [w] * num_layers).as_text())


@pytest.mark.parametrize("op", ["gmm", "permute_combine"])
def test_repeated_kernel_calls_lower_once_per_program(op):
  # A model calls each kernel with one shape in every layer: the kernels' lowering must be shared, not
  # repeated per call site (Mosaic GPU lowering costs ~0.6 s per call on an H200).
  if op == "gmm":
    sizes = jnp.array([64, 0, 100, 92], jnp.int32)
    layer = lambda x, w: pk.gmm(x, w, sizes, backend="interpret")  # noqa: E731
    x, w = rand(20, (256, 128), jnp.bfloat16), rand(21, (4, 128, 128), jnp.bfloat16)
  else:
    idx_R = jnp.array(np.random.default_rng(2).permutation(32) // 2)
    idx_TxK = jnp.array(np.random.default_rng(3).permutation(32).reshape(16, 2))
    layer = lambda x, w: pk.combine(pk.permute(x, idx_R, backend="interpret") * w, idx_TxK,  # noqa: E731
                                    jnp.full((16, 2), 0.5), backend="interpret")
    x, w = rand(22, (16, 64)), rand(23, (32, 64))
  one, two, four = (_lowered_chars(layer, n, x, w) for n in (1, 2, 4))
  # Lowered per call site, two more layers would add twice what the second one did.
  assert four - two < two - one, (one, two, four)


def test_combine_repeated_rows_scatter_adds():
  y, w = rand(18, (4, 8)), rand(19, (3, 2))
  idx = jnp.array([[0, 0], [1, 0], [3, 3]])
  dy = jax.grad(lambda a: jnp.sum(pk.combine(a, idx, w)))(y)
  ws = np.asarray(w)
  ref = np.stack([np.full(8, ws[0, 0] + ws[0, 1] + ws[1, 1]), np.full(8, ws[1, 0]), np.zeros(8),
                  np.full(8, ws[2, 0] + ws[2, 1])])
  np.testing.assert_allclose(dy, ref, rtol=1e-5, atol=1e-6)


def test_backend_selection(monkeypatch):
  monkeypatch.delenv(kb.ENV_VAR, raising=False)
  assert kb.resolve("gmm") == "xla"  # CPU default
  assert kb.resolve("gmm", "interpret") == "interpret"
  with pytest.raises(RuntimeError, match="mosaic_gpu"):
    kb.resolve("gmm", "mosaic_gpu")  # asked for a fast path that cannot run here: no fallback
  with pytest.raises(ValueError, match="unknown backend"):
    kb.resolve("gmm", "cuda")
  with pytest.raises(ValueError, match="no permute kernel"):
    kb.resolve("permute", "mosaic_gpu")
  monkeypatch.setenv(kb.ENV_VAR, "interpret")
  assert kb.resolve("tgmm") == "interpret"
  with pytest.raises(ValueError, match="cannot run these inputs"):  # K=48: no interpret tiling
    pk.gmm(jnp.ones((8, 48)), jnp.ones((2, 48, 64)), jnp.array([4, 4]))


@pytest.mark.parametrize("kind,want", [("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"),
                                       ("NVIDIA GH200 480GB", "h200"), ("cpu", "h200")])
def test_tuned_tables_follow_the_card(monkeypatch, kind, want):
  class Device:
    device_kind = kind
  monkeypatch.setattr(kb.jax, "devices", lambda *a: [Device()])
  assert kb.card_table({"H200": "h200", "H100": "h100"}) == want
  from pallas_kernels import mosaic_gmm, mosaic_tgmm
  assert mosaic_gmm.tuned() is mosaic_gmm.TUNED_BY_CARD[want.upper()]
  assert mosaic_tgmm.tuned() is mosaic_tgmm.TUNED_BY_CARD[want.upper()]


def test_shape_errors():
  with pytest.raises(ValueError, match="contracting"):
    pk.gmm(jnp.ones((8, 16)), jnp.ones((2, 32, 8)), jnp.array([4, 4]))
  with pytest.raises(ValueError, match="group_sizes"):
    pk.gmm(jnp.ones((8, 16)), jnp.ones((2, 16, 8)), jnp.array([4, 2, 2]))
  from pallas_kernels import mosaic_gmm  # pylint: disable=g-import-not-at-top
  lhs, rhs = jnp.ones((128, 64), jnp.bfloat16), jnp.ones((2, 64, 128), jnp.bfloat16)
  with pytest.raises(ValueError, match="several compute warpgroups"):
    mosaic_gmm.gmm(lhs, rhs, jnp.array([64, 64]), config=mosaic_gmm.GmmConfig(split_m=True, num_compute_wgs=1))


def test_row_tiles_cover_every_row_once():
  """Every row in exactly one tile of its own segment, blocks inside the array, ceil(g / block) tiles
  per segment of g rows."""
  from pallas_kernels import tiling  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(2)
  for _ in range(20):
    m, block, g = 8 * int(rng.integers(1, 40)), int(rng.choice([8, 64])), int(rng.integers(1, 6))
    sizes = rng.multinomial(int(rng.integers(0, m + 1)), np.ones(g) / g)
    t = tiling.row_tiles(jnp.array(sizes), m, block)
    owner = np.full(m, -1)
    used = np.zeros(g + 1, int)
    for grp, row0, start, size in zip(*map(np.asarray, (t.group, t.row0, t.start, t.size))):
      if size == 0:
        continue
      assert 0 <= start and start + size <= block and (row0 + block <= m or row0 == 0) and row0 % 8 == 0
      rows = np.arange(row0 + start, row0 + start + size)
      assert np.all(owner[rows] == -1)
      owner[rows] = grp
      used[grp] += 1
    ends = np.cumsum(sizes)
    np.testing.assert_array_equal(owner, np.searchsorted(ends, np.arange(m), side="right"))
    first = np.concatenate([[0], ends])
    np.testing.assert_array_equal(used, np.where(np.append(sizes, m - sizes.sum()) > 0,
                                                 -(-(np.append(ends, m) - first // 8 * 8) // block), 0))
  with pytest.raises(ValueError, match="divisible by 8"):
    tiling.row_tiles(jnp.array([3, 4]), 12, 8)


def test_new_group_sizes_do_not_recompile():
  f = jax.jit(lambda a, w, g: pk.gmm(a, w, g, backend="xla"))
  lhs, rhs = rand(20, (64, 32)), rand(21, (3, 32, 16))
  for sizes in ([10, 20, 30], [0, 64, 0], [5, 5, 5]):
    f(lhs, rhs, jnp.array(sizes))
  assert f._cache_size() == 1


def test_backend_choice_is_logged_once(caplog, monkeypatch):
  monkeypatch.delenv(kb.ENV_VAR, raising=False)
  monkeypatch.setattr(kb, "_logged", set())
  with caplog.at_level("INFO", logger="pallas_kernels"):
    for _ in range(3):
      kb.resolve("tgmm")
  assert [r.getMessage() for r in caplog.records] == [
      "pallas_kernels.tgmm runs on backend 'xla' (default for platform cpu)"]
