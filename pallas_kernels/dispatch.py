"""Token permute (gather into expert-sorted order) and weighted combine, with custom VJPs.

permute(x[T, D], idx[R]) -> x[idx]: row r of the result is token idx[r]; an index outside [0, T)
  gives a zero row (padding slots). Backward: scatter-add of the row gradients onto the tokens (XLA);
  with unique_rows (no token gathered twice) a gather through the inverse index; with the caller's
  inverse[T, K] (every row reading token t) a k-row gather-sum, the combine kernel with unit weights.
combine(y[R, D], idx[T, K], weights[T, K]) -> out[T, D] = sum_k weights[t, k] * y[idx[t, k]],
  f32 accumulation, in y's dtype or out_dtype; an index outside [0, R) contributes 0. The gate-weight multiply is
  fused into the gather; the backward gives d(y) (scatter-add of weighted output gradients, or with
  unique_rows a weighted gather) and d(weights) (row dot products, XLA), so router probabilities
  stay differentiable.
Backends: "xla" (reference.py), "triton" (Pallas Triton kernels, triton_dispatch.py) and
"interpret" (the same kernels in the Pallas interpreter, for CPU tests). Scatter-adds stay XLA.
"""
import functools

import jax
import jax.numpy as jnp

from pallas_kernels import backend as _backend
from pallas_kernels import reference
from pallas_kernels.vma import vary_like


def _kernels():
  # Imported on first use: jax.experimental.pallas.triton warns (deprecated) on import in JAX 0.11.
  from pallas_kernels import triton_dispatch  # pylint: disable=g-import-not-at-top
  return triton_dispatch


def _vary_alike(*arrays):
  """Types every array as varying over all manual mesh axes any of them varies over (a pallas_call
  under shard_map takes its result type from its inputs; a no-op outside shard_map)."""
  return [vary_like(a, *arrays) for a in arrays]


def _gather(name, x_TxD, idx_R, scale_R=None, out_dtype=None):
  """x[idx] (times scale in f32), zero rows for padding indices, on backend `name`."""
  out_dtype = out_dtype or x_TxD.dtype
  if name == "xla":
    rows_RxD = reference.permute_xla(x_TxD, idx_R)
    if scale_R is None:
      return rows_RxD.astype(out_dtype)
    return (scale_R[:, None] * rows_RxD.astype("float32")).astype(out_dtype)
  if scale_R is None:
    x_TxD, idx_R = _vary_alike(x_TxD, idx_R)
  else:
    x_TxD, idx_R, scale_R = _vary_alike(x_TxD, idx_R, scale_R)
  return _kernels().gather_rows(x_TxD, idx_R, scale_R, out_dtype=out_dtype,
                                interpret=name == "interpret")


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _permute(x_TxD, idx_R, inverse_TxK, unique_rows, name):
  del inverse_TxK, unique_rows
  return _gather(name, x_TxD, idx_R)


def _permute_fwd(x_TxD, idx_R, inverse_TxK, unique_rows, name):
  return _permute(x_TxD, idx_R, inverse_TxK, unique_rows, name), (idx_R, inverse_TxK, x_TxD.shape[0])


def _permute_bwd(unique_rows, name, res, dy_RxD):
  idx_R, inverse_TxK, num_tokens = res
  if inverse_TxK is not None:
    if inverse_TxK.shape[1] == 1:  # each token read at most once: one row of dy
      return _gather(name, dy_RxD, inverse_TxK[:, 0]), None, None
    ones_TxK = jnp.ones(inverse_TxK.shape, dy_RxD.dtype)
    return _combine(dy_RxD, inverse_TxK, ones_TxK, True, name, dy_RxD.dtype), None, None
  if unique_rows:  # each token is read at most once: its gradient is one row of dy, a gather
    return _gather(name, dy_RxD, reference.inverse_index(idx_R, num_tokens)), None, None
  return reference.permute_transpose_xla(dy_RxD, idx_R, num_tokens), None, None


_permute.defvjp(_permute_fwd, _permute_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _combine(y_RxD, idx_TxK, weights_TxK, unique_rows, name, out_dtype):
  del unique_rows
  if name == "xla":
    return reference.combine_xla(y_RxD, idx_TxK, weights_TxK, out_dtype)
  return _kernels().combine(*_vary_alike(y_RxD, idx_TxK, weights_TxK), out_dtype=out_dtype,
                           interpret=name == "interpret")


def _combine_fwd(y_RxD, idx_TxK, weights_TxK, unique_rows, name, out_dtype):
  out = _combine(y_RxD, idx_TxK, weights_TxK, unique_rows, name, out_dtype)
  return out, (y_RxD, idx_TxK, weights_TxK)


def _combine_bwd(unique_rows, name, out_dtype, res, dout_TxD):
  del out_dtype
  y_RxD, idx_TxK, weights_TxK = res
  if name == "xla" or not unique_rows:
    dy_RxD, dw_TxK = reference.combine_bwd_xla(y_RxD, idx_TxK, weights_TxK, dout_TxD, unique_rows)
    return dy_RxD, None, dw_TxK
  token_R, w_R = reference.combine_unique_sources(idx_TxK, weights_TxK, y_RxD.shape[0])
  dy_RxD = _gather(name, dout_TxD, token_R, w_R, out_dtype=y_RxD.dtype)
  return dy_RxD, None, reference.combine_dweights_xla(y_RxD, idx_TxK, weights_TxK, dout_TxD)


_combine.defvjp(_combine_fwd, _combine_bwd)


def permute(x_TxD: jax.Array, idx_R: jax.Array, *, unique_rows: bool = False,
            inverse_TxK: jax.Array | None = None, backend: str | None = None) -> jax.Array:
  """Gathers rows x[idx] -> [R, D]; out-of-range indices give zero rows. Differentiable in x.

  unique_rows: the caller promises no token index in [0, T) appears twice in idx (idx is part of a
  permutation); the backward then gathers instead of scatter-adding.
  inverse_TxK: the caller's inverse of idx, [T, K] int: inverse[t] lists every row r with
  idx[r] == t (-1 fills the rest). The backward is then dx[t] = sum_k dy[inverse[t, k]], a gather
  (K = 1) or the combine kernel (top-k dispatch: each token is read k times), never a scatter-add.
  """
  if x_TxD.ndim != 2 or idx_R.ndim != 1:
    raise ValueError(f"permute wants x[T, D] and idx[R]; got {x_TxD.shape}, {idx_R.shape}")
  if inverse_TxK is not None:
    if inverse_TxK.ndim != 2 or inverse_TxK.shape[0] != x_TxD.shape[0]:
      raise ValueError(f"permute's inverse must be [T, K] with T = {x_TxD.shape[0]}; got {inverse_TxK.shape}")
    inverse_TxK = inverse_TxK.astype("int32")
  return _permute(x_TxD, idx_R.astype("int32"), inverse_TxK, unique_rows,
                  _backend.resolve("permute", backend))


def combine(y_RxD: jax.Array, idx_TxK: jax.Array, weights_TxK: jax.Array, *,
            unique_rows: bool = False, out_dtype=None, backend: str | None = None) -> jax.Array:
  """out[t] = sum_k weights[t, k] * y[idx[t, k]] -> [T, D] in out_dtype (y's by default), summed in
  f32. Differentiable in y and weights.

  unique_rows: the caller promises no row of y is used by two (t, k) pairs (true when idx is the
  inverse of a dispatch permutation); the backward then gathers instead of scatter-adding.
  """
  if y_RxD.ndim != 2 or idx_TxK.ndim != 2 or idx_TxK.shape != weights_TxK.shape:
    raise ValueError(f"combine wants y[R, D], idx[T, K], weights[T, K]; got {y_RxD.shape}, "
                     f"{idx_TxK.shape}, {weights_TxK.shape}")
  return _combine(y_RxD, idx_TxK.astype("int32"), weights_TxK, unique_rows,
                  _backend.resolve("combine", backend), jnp.dtype(out_dtype or y_RxD.dtype))
