"""Host-free tile bookkeeping for grouped matmuls (small XLA ops on [G]-sized arrays)."""
import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class RowTiles:
  """Row tiles of a grouped [M, ...] operand: one entry per (group, block_m row block) pair.

  A row block that straddles a group boundary appears once per group it holds rows of. The rows
  past the last group form one extra segment, "group" G, whose tiles store zeros. Entries past the
  real tile count have size 0 and do nothing. Each field is int32 [max_tiles].
  """
  group: jax.Array  # segment index in [0, G]; G = the tail past the groups
  block: jax.Array  # row block index: rows [block * block_m, (block + 1) * block_m)
  start: jax.Array  # first row of this segment inside the block
  size: jax.Array  # rows of this segment inside the block (0 = nothing to do)


def max_row_tiles(m: int, num_groups: int, block_m: int) -> int:
  """Each of the G boundaries between the G + 1 segments can split one more block."""
  return -(-m // block_m) + num_groups


def clipped_bounds(group_sizes_G: jax.Array, m: int) -> tuple[jax.Array, jax.Array]:
  """Group [start, end) rows, clipped to m (the groups never claim rows past the array)."""
  ends_G = jnp.minimum(jnp.cumsum(group_sizes_G.astype(jnp.int32)), m)
  starts_G = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends_G[:-1]])
  return starts_G, ends_G


def row_tiles(group_sizes_G: jax.Array, m: int, block_m: int) -> RowTiles:
  num_groups = group_sizes_G.shape[0]
  starts_G, ends_G = clipped_bounds(group_sizes_G, m)
  starts_S = jnp.concatenate([starts_G, ends_G[-1:]])  # S = G + 1 segments, the tail last
  ends_S = jnp.concatenate([ends_G, jnp.full((1,), m, jnp.int32)])
  first_S = starts_S // block_m
  tiles_S = jnp.where(ends_S > starts_S, (ends_S - 1) // block_m - first_S + 1, 0)
  tile_end_S = jnp.cumsum(tiles_S)
  i_T = jnp.arange(max_row_tiles(m, num_groups, block_m), dtype=jnp.int32)
  # compare_all: one small fusion; the default method is a loop (a chain of tiny kernels on GPU).
  seg_T = jnp.searchsorted(tile_end_S, i_T, side="right", method="compare_all").astype(jnp.int32)
  valid_T = seg_T <= num_groups
  seg_T = jnp.minimum(seg_T, num_groups)
  block_T = first_S[seg_T] + i_T - (tile_end_S[seg_T] - tiles_S[seg_T])
  lo_T = jnp.maximum(starts_S[seg_T], block_T * block_m)
  hi_T = jnp.minimum(ends_S[seg_T], (block_T + 1) * block_m)
  size_T = jnp.where(valid_T, hi_T - lo_T, 0)
  return RowTiles(group=seg_T, block=jnp.where(valid_T, block_T, 0),
                  start=lo_T - block_T * block_m, size=size_T)
