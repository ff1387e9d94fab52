"""Host-free tile bookkeeping for grouped matmuls (small XLA ops on [G]-sized arrays)."""
import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class RowTiles:
  """Row tiles of a grouped [M, ...] operand, each group tiled from its own first row.

  A segment of rows [s, e) is tiled in block_m blocks from s rounded down to a multiple of `ALIGN`
  (Mosaic's TMA loads need that much alignment), so it costs ceil((e - s + s % ALIGN) / block_m)
  tiles wherever it starts; blocks aligned to the array instead cost one more per group boundary
  inside a block (BENCHMARKS.md, numbers behind choices). The kernel loads block_m rows from `row0`
  (pulled back so the block stays inside the array) and stores rows [row0 + start, row0 + start +
  size). The rows past the last group form one extra segment, "group" G, whose tiles store zeros.
  Entries past the real tile count have size 0 and do nothing. Each field is int32 [max_tiles].
  """
  group: jax.Array  # segment index in [0, G]; G = the tail past the groups
  row0: jax.Array  # first row of the loaded block, a multiple of ALIGN
  start: jax.Array  # first row of this segment inside the block
  size: jax.Array  # rows of this segment inside the block (0 = nothing to do)


ALIGN = 8


def max_row_tiles(m: int, num_groups: int, block_m: int) -> int:
  """Each of the G + 1 segments ends in at most one partial tile."""
  return -(-m // block_m) + num_groups


def clipped_bounds(group_sizes_G: jax.Array, m: int) -> tuple[jax.Array, jax.Array]:
  """Group [start, end) rows, clipped to m (the groups never claim rows past the array)."""
  ends_G = jnp.minimum(jnp.cumsum(group_sizes_G.astype(jnp.int32)), m)
  starts_G = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends_G[:-1]])
  return starts_G, ends_G


def searchsorted(sorted_S: jax.Array, queries: jax.Array) -> jax.Array:
  """int32 `jnp.searchsorted(side="right")` for short sorted arrays (groups, slots, devices): one
  compare-and-count fusion instead of the default method's loop (a chain of tiny kernels on GPU)."""
  return jnp.searchsorted(sorted_S, queries, side="right", method="compare_all").astype(jnp.int32)


def row_tiles(group_sizes_G: jax.Array, m: int, block_m: int) -> RowTiles:
  """The tiles of m rows (a multiple of ALIGN) split into groups of group_sizes_G rows."""
  if m % ALIGN or block_m % ALIGN:
    raise ValueError(f"row_tiles needs m and block_m divisible by {ALIGN}; got m={m}, block_m={block_m}")
  num_groups = group_sizes_G.shape[0]
  starts_G, ends_G = clipped_bounds(group_sizes_G, m)
  starts_S = jnp.concatenate([starts_G, ends_G[-1:]])  # S = G + 1 segments, the tail last
  ends_S = jnp.concatenate([ends_G, jnp.full((1,), m, jnp.int32)])
  from_S = starts_S // ALIGN * ALIGN
  tiles_S = jnp.where(ends_S > starts_S, -(-(ends_S - from_S) // block_m), 0)
  tile_end_S = jnp.cumsum(tiles_S)
  i_T = jnp.arange(max_row_tiles(m, num_groups, block_m), dtype=jnp.int32)
  seg_T = searchsorted(tile_end_S, i_T)
  valid_T = seg_T <= num_groups
  seg_T = jnp.minimum(seg_T, num_groups)
  block0_T = from_S[seg_T] + (i_T - (tile_end_S[seg_T] - tiles_S[seg_T])) * block_m
  lo_T = jnp.maximum(starts_S[seg_T], block0_T)
  size_T = jnp.where(valid_T, jnp.minimum(ends_S[seg_T], block0_T + block_m) - lo_T, 0)
  row0_T = jnp.where(valid_T, jnp.minimum(block0_T, max(m - block_m, 0)), 0)
  return RowTiles(group=seg_T, row0=row0_T, start=jnp.where(valid_T, lo_T - row0_T, 0), size=size_T)
