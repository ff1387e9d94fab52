"""Plain-JAX (XLA) implementations: the CPU/TPU path and the references the Pallas kernels are tested on.

Group layout everywhere: rows of the [M, ...] operand are grouped consecutively, group g owning
`group_sizes[g]` rows; rows past `sum(group_sizes)` belong to no group.
"""
import jax.numpy as jnp
from jax import lax

_F32 = jnp.float32


def gmm_xla(lhs_MxK, rhs, group_sizes_G, transpose_rhs, out_dtype):
  """[M, K] x rhs[G, K, N] (or [G, N, K] if transpose_rhs) -> [M, N]; rows past the groups are 0."""
  contract_rhs = 2 if transpose_rhs else 1
  dims = lax.RaggedDotDimensionNumbers(
      dot_dimension_numbers=(((1,), (contract_rhs,)), ((), ())),
      lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])
  out_MxN = lax.ragged_dot_general(lhs_MxK, rhs, group_sizes_G, dims, preferred_element_type=_F32)
  return out_MxN.astype(out_dtype)


def tgmm_xla(lhs_MxK, rhs_MxN, group_sizes_G, out_dtype):
  """Per group g: lhs_g^T @ rhs_g -> [G, K, N]; empty groups give zeros; rows past the groups ignored."""
  dims = lax.RaggedDotDimensionNumbers(
      dot_dimension_numbers=(((0,), (0,)), ((), ())),
      lhs_ragged_dimensions=[0], rhs_group_dimensions=[])
  # Rows past the groups may hold anything (even NaN): zero them so they cannot leak into sums.
  valid_M = jnp.arange(lhs_MxK.shape[0]) < jnp.sum(group_sizes_G)
  lhs_MxK = jnp.where(valid_M[:, None], lhs_MxK, 0)
  rhs_MxN = jnp.where(valid_M[:, None], rhs_MxN, 0)
  out_GxKxN = lax.ragged_dot_general(lhs_MxK, rhs_MxN, group_sizes_G, dims,
                                     preferred_element_type=_F32)
  return out_GxKxN.astype(out_dtype)


def permute_xla(x_TxD, idx_R):
  """Row gather x[idx]; an index outside [0, T) gives a zero row (padding)."""
  return _gather_rows(x_TxD, idx_R)


def permute_transpose_xla(dy_RxD, idx_R, num_rows):
  """The adjoint of permute_xla: scatter-add rows of dy back to their source rows (f32 sums)."""
  valid_R = (idx_R >= 0) & (idx_R < num_rows)
  out_TxD = jnp.zeros((num_rows, dy_RxD.shape[1]), _F32)
  out_TxD = out_TxD.at[jnp.where(valid_R, idx_R, num_rows)].add(dy_RxD.astype(_F32), mode="drop")
  return out_TxD.astype(dy_RxD.dtype)


def combine_xla(y_RxD, idx_TxK, weights_TxK, out_dtype=None):
  """out[t] = sum_k weights[t, k] * y[idx[t, k]] (f32 accumulate, out_dtype or y's); idx outside [0, R)
  adds 0."""
  rows_TxKxD = _gather_rows(y_RxD, idx_TxK).astype(_F32)
  return jnp.einsum("tkd,tk->td", rows_TxKxD, weights_TxK.astype(_F32)).astype(out_dtype or y_RxD.dtype)


def combine_bwd_xla(y_RxD, idx_TxK, weights_TxK, dout_TxD, unique_rows=False):
  """Gradients of combine_xla: (dy[R, D], dweights[T, K] by row dot products).

  dy by scatter-add in general; with unique_rows (no row of y used twice, as in a dispatch
  permutation) by a gather through the inverse map, which needs no f32 [R, D] buffer.
  """
  R = y_RxD.shape[0]
  dout_f32 = dout_TxD.astype(_F32)
  if unique_rows:
    token_R, w_R = combine_unique_sources(idx_TxK, weights_TxK, R)
    dy_RxD = (w_R[:, None] * _gather_rows(dout_f32, token_R)).astype(y_RxD.dtype)
  else:
    valid_TxK = (idx_TxK >= 0) & (idx_TxK < R)
    contrib_TxKxD = weights_TxK.astype(_F32)[:, :, None] * dout_f32[:, None, :]
    dy_RxD = jnp.zeros(y_RxD.shape, _F32).at[jnp.where(valid_TxK, idx_TxK, R)].add(
        contrib_TxKxD, mode="drop").astype(y_RxD.dtype)
  return dy_RxD, combine_dweights_xla(y_RxD, idx_TxK, weights_TxK, dout_TxD)


def combine_dweights_xla(y_RxD, idx_TxK, weights_TxK, dout_TxD):
  """d(weights)[t, k] = y[idx[t, k]] . dout[t] (f32 dot), 0 where idx is padding."""
  rows_TxKxD = _gather_rows(y_RxD, idx_TxK).astype(_F32)
  dw_TxK = jnp.einsum("tkd,td->tk", rows_TxKxD, dout_TxD.astype(_F32))
  return dw_TxK.astype(weights_TxK.dtype)


def inverse_index(idx, num_rows):
  """inv[n] = the flat position p with idx.flat[p] == n, or -1 if none (idx must not repeat a row
  of [0, num_rows)); turns the transpose of an injective gather into a gather."""
  valid = (idx >= 0) & (idx < num_rows)
  return jnp.full((num_rows,), -1, jnp.int32).at[jnp.where(valid, idx, num_rows).reshape(-1)].set(
      jnp.arange(idx.size, dtype=jnp.int32), mode="drop")


def combine_unique_sources(idx_TxK, weights_TxK, num_rows):
  """For each row r of y: the token whose output it feeds (-1 if none) and that pair's weight (f32,
  0 if none), so that with unique rows d(y)[r] = w[r] * dout[token[r]]."""
  pair_R = inverse_index(idx_TxK, num_rows)
  used_R = pair_R >= 0
  w_R = jnp.where(used_R, weights_TxK.reshape(-1)[jnp.where(used_R, pair_R, 0)].astype(_F32), 0)
  return jnp.where(used_R, pair_R // idx_TxK.shape[1], -1), w_R


def _gather_rows(y_RxD, idx):
  """y[idx] with zero rows where idx is outside [0, R) (never reads those rows, even if NaN)."""
  R = y_RxD.shape[0]
  valid = (idx >= 0) & (idx < R)
  rows = jnp.take(y_RxD, jnp.where(valid, idx, 0), axis=0)
  return jnp.where(valid[..., None], rows, jnp.zeros((), y_RxD.dtype))
