"""Differentiable grouped matmuls: `gmm` (forward, d(lhs)) and `tgmm` (d(rhs)), backend-dispatched.

Shapes: lhs[M, K]; rhs[G, K, N] (or rhs[G, N, K] with transpose_rhs); group_sizes[G] int. Rows of
lhs are grouped consecutively; rows past sum(group_sizes) give zero output rows and zero gradients.
bf16 (or any float) in, f32 accumulation, output in lhs's dtype unless preferred_element_type.
"""
import functools

import jax
import jax.numpy as jnp

from pallas_kernels import backend as _backend
from pallas_kernels import mosaic_gmm
from pallas_kernels import mosaic_tgmm
from pallas_kernels import reference
from pallas_kernels.vma import vary_like

_INTERPRET = []  # the GPU interpreter's params, made on first use


def _interpret_params():
  if not _INTERPRET:
    from jax._src.pallas.mosaic_gpu.interpret import params  # pylint: disable=g-import-not-at-top
    _INTERPRET.append(params.InterpretGPUParams())
  return _INTERPRET[0]


def _small_block(size):
  """Interpret-mode tiles: small (the interpreter is slow) but wgmma-legal."""
  return next((b for b in (64, 32) if size % b == 0), None)


def _gmm_config(name, m, k, n, dtype, out_dtype=None):
  if name == "interpret":
    bk, bn = _small_block(k), _small_block(n)
    return None if bk is None or bn is None else mosaic_gmm.GmmConfig(
        block_m=64, block_n=bn, block_k=bk, max_concurrent_steps=2, num_compute_wgs=1)
  return mosaic_gmm.default_config(m, k, n, dtype, out_dtype)


def _tgmm_config(name, m, k, n, dtype, out_dtype=None):
  if name == "interpret":
    bm, bn = _small_block(k), _small_block(n)
    return None if bm is None or bn is None else mosaic_tgmm.TgmmConfig(
        block_m=bm, block_n=bn, block_r=64, max_concurrent_steps=2)
  return mosaic_tgmm.default_config(m, k, n, dtype, out_dtype)


def _pallas_unsupported(name, m, k, n, dtype):
  """Why the Pallas kernels cannot run the forward and backward of an [M,K]x[K,N] grouped matmul."""
  if name == "xla":
    return None
  if (_gmm_config(name, m, k, n, dtype) is None or _gmm_config(name, m, n, k, dtype) is None
      or _tgmm_config(name, m, k, n, dtype) is None or _tgmm_config(name, m, n, k, dtype) is None):
    return f"no {name} tiling for M={m}, K={k}, N={n}, dtype={jnp.dtype(dtype).name}"
  return None


# Each Pallas kernel call goes through its own jit. A model calls a kernel with the same shapes in every
# layer; JAX lowers a jitted call once per program (its lowering is cached by the call's jaxpr), while a
# bare kernel call is lowered again at every call site, and the Mosaic GPU lowering is slow (seconds per
# MoE layer: BENCHMARKS.md, numbers behind choices).
_mosaic_gmm = jax.jit(mosaic_gmm.gmm, static_argnames=("transpose_rhs", "out_dtype", "config", "interpret"))
_mosaic_tgmm = jax.jit(mosaic_tgmm.tgmm, static_argnames=("out_dtype", "config", "interpret"))


def _gmm_impl(name, lhs, rhs, group_sizes, transpose_rhs, out_dtype):
  if name == "xla":
    return reference.gmm_xla(lhs, rhs, group_sizes, transpose_rhs, out_dtype)
  (m, k), n = lhs.shape, rhs.shape[1 if transpose_rhs else 2]
  return _mosaic_gmm(lhs, rhs, group_sizes, transpose_rhs=transpose_rhs, out_dtype=out_dtype,
                     config=_gmm_config(name, m, k, n, lhs.dtype, out_dtype),
                     interpret=_interpret_params() if name == "interpret" else None)


def _tgmm_impl(name, lhs, rhs, group_sizes, out_dtype):
  if name == "xla":
    return reference.tgmm_xla(lhs, rhs, group_sizes, out_dtype)
  (m, k), n = lhs.shape, rhs.shape[1]
  return _mosaic_tgmm(lhs, rhs, group_sizes, out_dtype=out_dtype,
                      config=_tgmm_config(name, m, k, n, lhs.dtype, out_dtype),
                      interpret=_interpret_params() if name == "interpret" else None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _gmm(lhs, rhs, group_sizes, transpose_rhs, name, out_dtype):
  return vary_like(_gmm_impl(name, lhs, rhs, group_sizes, transpose_rhs, out_dtype), lhs, rhs)


def _gmm_fwd(lhs, rhs, group_sizes, transpose_rhs, name, out_dtype):
  return _gmm(lhs, rhs, group_sizes, transpose_rhs, name, out_dtype), (lhs, rhs, group_sizes)


def _gmm_bwd(transpose_rhs, name, out_dtype, res, dout):
  del out_dtype
  lhs, rhs, group_sizes = res
  dout = dout.astype(lhs.dtype)
  # d(lhs) = dout @ rhs_g^T: the same kernel with the weight read the other way round.
  dlhs = _gmm(dout, rhs, group_sizes, not transpose_rhs, name, lhs.dtype)
  if transpose_rhs:  # rhs[g] is [N, K]: d(rhs_g) = dout_g^T @ lhs_g
    drhs = _tgmm(dout, lhs, group_sizes, name, rhs.dtype)
  else:
    drhs = _tgmm(lhs, dout, group_sizes, name, rhs.dtype)
  return vary_like(dlhs, lhs), vary_like(drhs, rhs), None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _tgmm(lhs, rhs, group_sizes, name, out_dtype):
  return vary_like(_tgmm_impl(name, lhs, rhs, group_sizes, out_dtype), lhs, rhs)


def _tgmm_fwd(lhs, rhs, group_sizes, name, out_dtype):
  return _tgmm(lhs, rhs, group_sizes, name, out_dtype), (lhs, rhs, group_sizes)


def _tgmm_bwd(name, out_dtype, res, dout_GxKxN):
  del out_dtype
  lhs, rhs, group_sizes = res
  dout_GxKxN = dout_GxKxN.astype(lhs.dtype)
  dlhs = _gmm(rhs, dout_GxKxN, group_sizes, True, name, lhs.dtype)  # rhs_g @ dout_g^T
  drhs = _gmm(lhs, dout_GxKxN, group_sizes, False, name, rhs.dtype)  # lhs_g @ dout_g
  return vary_like(dlhs, lhs), vary_like(drhs, rhs), None


_tgmm.defvjp(_tgmm_fwd, _tgmm_bwd)


def _check_groups(group_sizes, num_groups):
  if group_sizes.ndim != 1 or group_sizes.shape[0] != num_groups:
    raise ValueError(f"group_sizes must have shape ({num_groups},), got {group_sizes.shape}")
  if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
    raise ValueError(f"group_sizes must be integers, got {group_sizes.dtype}")
  return group_sizes.astype(jnp.int32)


def gmm(lhs_MxK: jax.Array, rhs: jax.Array, group_sizes_G: jax.Array, *,
        transpose_rhs: bool = False, backend: str | None = None,
        preferred_element_type=None) -> jax.Array:
  """Grouped matmul: out[rows of g] = lhs[rows of g] @ rhs[g] (rhs[g]^T if transpose_rhs) -> [M, N].

  rhs is [G, K, N], or [G, N, K] with transpose_rhs. Rows past sum(group_sizes) are zeros.
  Differentiable in lhs and rhs (custom VJP: d(lhs) by gmm, d(rhs) by tgmm, same backend).
  """
  if lhs_MxK.ndim != 2 or rhs.ndim != 3:
    raise ValueError(f"gmm wants lhs[M, K] and rhs[G, K, N]; got {lhs_MxK.shape}, {rhs.shape}")
  k_rhs = rhs.shape[2] if transpose_rhs else rhs.shape[1]
  if lhs_MxK.shape[1] != k_rhs:
    raise ValueError(f"gmm contracting sizes differ: lhs {lhs_MxK.shape}, rhs {rhs.shape} "
                     f"(transpose_rhs={transpose_rhs})")
  group_sizes_G = _check_groups(group_sizes_G, rhs.shape[0])
  name = _backend.resolve("gmm", backend)
  m, k = lhs_MxK.shape
  if reason := _pallas_unsupported(name, m, k, rhs.shape[1] + rhs.shape[2] - k, lhs_MxK.dtype):
    name = _backend.fallback("gmm", backend, reason)
  out_dtype = jnp.dtype(preferred_element_type or lhs_MxK.dtype)
  return _gmm(lhs_MxK, rhs.astype(lhs_MxK.dtype), group_sizes_G, transpose_rhs, name, out_dtype)


def tgmm(lhs_MxK: jax.Array, rhs_MxN: jax.Array, group_sizes_G: jax.Array, *,
         num_groups: int | None = None, backend: str | None = None,
         preferred_element_type=None) -> jax.Array:
  """Per-group lhs_g^T @ rhs_g -> [G, K, N] (the weight gradient of gmm); empty groups give zeros.

  Rows past sum(group_sizes) are never read as data (they may hold anything, NaN included).
  """
  if lhs_MxK.ndim != 2 or rhs_MxN.ndim != 2 or lhs_MxK.shape[0] != rhs_MxN.shape[0]:
    raise ValueError(f"tgmm wants lhs[M, K] and rhs[M, N]; got {lhs_MxK.shape}, {rhs_MxN.shape}")
  group_sizes_G = _check_groups(group_sizes_G, num_groups or group_sizes_G.shape[0])
  name = _backend.resolve("tgmm", backend)
  (m, k), n = lhs_MxK.shape, rhs_MxN.shape[1]
  if reason := _pallas_unsupported(name, m, k, n, lhs_MxK.dtype):
    name = _backend.fallback("tgmm", backend, reason)
  out_dtype = jnp.dtype(preferred_element_type or lhs_MxK.dtype)
  return _tgmm(lhs_MxK, rhs_MxN.astype(lhs_MxK.dtype), group_sizes_G, name, out_dtype)
