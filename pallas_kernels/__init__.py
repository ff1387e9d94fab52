"""Grouped-matmul and dispatch kernels for MoE expert parallelism.

`gmm(lhs_MxK, rhs_GxKxN, group_sizes_G)`: rows of `lhs` are grouped consecutively, group g owning
`group_sizes[g]` rows; rows past `sum(group_sizes)` produce zeros.
"""
import jax
import jax.numpy as jnp


def gmm(lhs_MxK: jax.Array, rhs_GxKxN: jax.Array, group_sizes_G: jax.Array) -> jax.Array:
  """Grouped matmul reference (XLA `ragged_dot`, f32 accumulation) -> [M, N] in lhs dtype."""
  out_MxN = jax.lax.ragged_dot(lhs_MxK, rhs_GxKxN, group_sizes_G.astype(jnp.int32),
                               preferred_element_type=jnp.float32)
  return out_MxN.astype(lhs_MxK.dtype)
