"""Token permute (gather into expert-sorted order) and weighted combine, with custom VJPs.

permute(x[T, D], idx[R]) -> x[idx]: row r of the result is token idx[r]; an index outside [0, T)
  gives a zero row (padding slots). Backward: scatter-add of the row gradients onto the tokens.
combine(y[R, D], idx[T, K], weights[T, K]) -> out[T, D] = sum_k weights[t, k] * y[idx[t, k]],
  f32 accumulation, in y's dtype; an index outside [0, R) contributes 0. The gate-weight multiply is
  fused into the gather; the backward gives d(y) (scatter-add of weighted output gradients) and
  d(weights) (row dot products), so router probabilities stay differentiable.
"""
import functools

import jax

from pallas_kernels import backend as _backend
from pallas_kernels import reference


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _permute(x_TxD, idx_R, name):
  del name  # one implementation so far (XLA); the slot keeps the signature for kernel backends
  return reference.permute_xla(x_TxD, idx_R)


def _permute_fwd(x_TxD, idx_R, name):
  return _permute(x_TxD, idx_R, name), (idx_R, x_TxD.shape[0])


def _permute_bwd(name, res, dy_RxD):
  del name
  idx_R, num_tokens = res
  return reference.permute_transpose_xla(dy_RxD, idx_R, num_tokens), None


_permute.defvjp(_permute_fwd, _permute_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _combine(y_RxD, idx_TxK, weights_TxK, unique_rows, name):
  del unique_rows, name
  return reference.combine_xla(y_RxD, idx_TxK, weights_TxK)


def _combine_fwd(y_RxD, idx_TxK, weights_TxK, unique_rows, name):
  out = _combine(y_RxD, idx_TxK, weights_TxK, unique_rows, name)
  return out, (y_RxD, idx_TxK, weights_TxK)


def _combine_bwd(unique_rows, name, res, dout_TxD):
  del name
  y_RxD, idx_TxK, weights_TxK = res
  dy_RxD, dw_TxK = reference.combine_bwd_xla(y_RxD, idx_TxK, weights_TxK, dout_TxD, unique_rows)
  return dy_RxD, None, dw_TxK


_combine.defvjp(_combine_fwd, _combine_bwd)


def permute(x_TxD: jax.Array, idx_R: jax.Array, *, backend: str | None = None) -> jax.Array:
  """Gathers rows x[idx] -> [R, D]; out-of-range indices give zero rows. Differentiable in x."""
  if x_TxD.ndim != 2 or idx_R.ndim != 1:
    raise ValueError(f"permute wants x[T, D] and idx[R]; got {x_TxD.shape}, {idx_R.shape}")
  return _permute(x_TxD, idx_R.astype("int32"), _backend.resolve("permute", backend))


def combine(y_RxD: jax.Array, idx_TxK: jax.Array, weights_TxK: jax.Array, *,
            unique_rows: bool = False, backend: str | None = None) -> jax.Array:
  """out[t] = sum_k weights[t, k] * y[idx[t, k]] -> [T, D]. Differentiable in y and weights.

  unique_rows: the caller promises no row of y is used by two (t, k) pairs (true when idx is the
  inverse of a dispatch permutation); the backward then gathers instead of scatter-adding.
  """
  if y_RxD.ndim != 2 or idx_TxK.ndim != 2 or idx_TxK.shape != weights_TxK.shape:
    raise ValueError(f"combine wants y[R, D], idx[T, K], weights[T, K]; got {y_RxD.shape}, "
                     f"{idx_TxK.shape}, {weights_TxK.shape}")
  return _combine(y_RxD, idx_TxK.astype("int32"), weights_TxK, unique_rows,
                  _backend.resolve("combine", backend))
