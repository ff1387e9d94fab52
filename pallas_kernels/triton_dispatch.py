"""Pallas Triton kernels for token dispatch: a row gather (`gather_rows`, permute's forward and the
gather-form backwards) and the weighted k-row gather-sum (`combine`).

Why the Triton dialect and not Mosaic GPU: both ops are row gathers through an index vector, and the
whole job is moving bytes at copy bandwidth. A Triton block loads a [rows, cols] tile through a
vector of row indices in one masked load (pointer = base + idx[:, None] * D + cols[None, :]), so the
hardware sees wide coalesced loads of each row's column tile, with as many rows in flight as the
tile has. Mosaic GPU on Hopper would have to issue one TMA copy per row (TMA has no row gather
before Blackwell, and a box is at most 256 elements per dim, so a 2048-wide bf16 row is 8 boxes),
i.e. tens of thousands of tiny async copies plus their barriers. `jax.experimental.pallas.triton` is
deprecated since JAX 0.11; it is imported only here, so dropping it later touches this file alone.

Layout: one program per (row tile, column tile), column tiles fastest (a 1-D grid, so no grid-dim
limit on the row count): neighbouring programs read the same source rows and write one contiguous
output row block. Every load and store is masked, so the row count and D need not be multiples of
the tile; an index outside [0, num_rows) reads nothing and gives a zero row / adds 0. combine keeps
an f32 [tile_t, tile_d] accumulator and unrolls its k gathers (all independent loads in flight).
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from pallas_kernels import vma

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class GatherConfig:
  """Tile of one program: `block_rows` output rows (permute) or tokens (combine) x `block_d`
  hidden columns. Triton tiles must be powers of two."""
  block_rows: int = 64
  block_d: int = 256
  num_warps: int = 4
  num_stages: int = 1

  def __post_init__(self):
    for name in ("block_rows", "block_d", "num_warps"):
      value = getattr(self, name)
      if value < 1 or value & (value - 1):
        raise ValueError(f"GatherConfig.{name} must be a power of two, got {value}")


PERMUTE_DEFAULT = GatherConfig(block_rows=64, block_d=256, num_warps=4)  # H200 sweep winner
COMBINE_DEFAULT = GatherConfig(block_rows=8, block_d=1024, num_warps=4)  # H200 sweep winner
# Candidates the benchmark times (benchmarks/kernels.py --sweep); winners become the defaults above.
SWEEP = [
    GatherConfig(32, 256, 4), GatherConfig(64, 256, 4), GatherConfig(16, 512, 4),
    GatherConfig(32, 512, 8), GatherConfig(64, 512, 8), GatherConfig(8, 1024, 4),
    GatherConfig(16, 1024, 8), GatherConfig(128, 128, 4),
]


def _tile(num_rows, d, config):
  """This program's row and column index vectors and their in-bounds masks."""
  num_d_tiles = pl.cdiv(d, config.block_d)
  pid = pl.program_id(0)
  rows = (pid // num_d_tiles) * config.block_rows + jnp.arange(config.block_rows, dtype=jnp.int32)
  cols = (pid % num_d_tiles) * config.block_d + jnp.arange(config.block_d, dtype=jnp.int32)
  return rows, cols, rows < num_rows, cols < d


def _load_rows(src_ref, idx, in_rows, cols, in_cols):
  """src[idx[i], cols] for each i; rows with idx outside [0, len(src)) (or masked off) are 0 and the
  clamped index keeps even masked lanes' addresses inside the array."""
  valid = in_rows & (idx >= 0) & (idx < src_ref.shape[0])
  safe = jnp.where(valid, idx, 0)
  tile = pl_triton.load(src_ref.at[safe[:, None], cols[None, :]],
                        mask=valid[:, None] & in_cols[None, :], other=0)
  return tile, valid


def _gather_kernel(idx_ref, *refs, config, scaled):
  if scaled:
    scale_ref, x_ref, out_ref = refs
  else:
    x_ref, out_ref = refs
  rows, cols, in_rows, in_cols = _tile(out_ref.shape[0], x_ref.shape[1], config)
  idx = pl_triton.load(idx_ref.at[rows], mask=in_rows, other=-1)
  tile, _ = _load_rows(x_ref, idx, in_rows, cols, in_cols)
  if scaled:
    scale = pl_triton.load(scale_ref.at[rows], mask=in_rows, other=0)
    tile = scale[:, None] * tile.astype(_F32)
  pl_triton.store(out_ref.at[rows[:, None], cols[None, :]], tile.astype(out_ref.dtype),
                  mask=in_rows[:, None] & in_cols[None, :])


def _combine_kernel(idx_ref, w_ref, y_ref, out_ref, *, config):
  rows, cols, in_rows, in_cols = _tile(out_ref.shape[0], y_ref.shape[1], config)
  acc = jnp.zeros((config.block_rows, config.block_d), _F32)
  for k in range(idx_ref.shape[1]):  # k is small (top-k): unrolled so all k gathers overlap
    idx = pl_triton.load(idx_ref.at[rows, k], mask=in_rows, other=-1)
    w = pl_triton.load(w_ref.at[rows, k], mask=in_rows, other=0).astype(_F32)
    tile, valid = _load_rows(y_ref, idx, in_rows, cols, in_cols)
    acc += jnp.where(valid, w, 0)[:, None] * tile.astype(_F32)
  pl_triton.store(out_ref.at[rows[:, None], cols[None, :]], acc.astype(out_ref.dtype),
                  mask=in_rows[:, None] & in_cols[None, :])


def _call(kernel, out_shape, num_rows, d, config, interpret, name):
  grid = (pl.cdiv(num_rows, config.block_rows) * pl.cdiv(d, config.block_d),)
  return pl.pallas_call(
      kernel, out_shape=out_shape, grid=grid, interpret=interpret, name=name,
      compiler_params=pl_triton.CompilerParams(num_warps=config.num_warps,
                                               num_stages=config.num_stages))


# jitted so that a model's repeated calls with one shape lower once per program (see gmm.py)
@functools.partial(jax.jit, static_argnames=("out_dtype", "config", "interpret"))
def gather_rows(x_TxD: jax.Array, idx_R: jax.Array, scale_R: jax.Array | None = None, *,
                out_dtype=None, config: GatherConfig = PERMUTE_DEFAULT,
                interpret: bool = False) -> jax.Array:
  """out[r] = x[idx[r]] (times scale[r] in f32 when given) -> [R, D] in out_dtype (x's by default);
  an index outside [0, T) gives a zero row."""
  (_, d), num_rows = x_TxD.shape, idx_R.shape[0]
  out_shape = vma.result_type((num_rows, d), jnp.dtype(out_dtype or x_TxD.dtype), x_TxD)
  if num_rows == 0 or d == 0 or x_TxD.shape[0] == 0:  # nothing to read: every row is padding
    return jnp.zeros(out_shape.shape, out_shape.dtype)
  kernel = functools.partial(_gather_kernel, config=config, scaled=scale_R is not None)
  args = (idx_R.astype(jnp.int32),) + (() if scale_R is None else (scale_R.astype(_F32),))
  call = _call(kernel, out_shape, num_rows, d, config, interpret, "permute_gather_rows")
  return call(*args, x_TxD)


@functools.partial(jax.jit, static_argnames=("out_dtype", "config", "interpret"))
def combine(y_RxD: jax.Array, idx_TxK: jax.Array, weights_TxK: jax.Array, *, out_dtype=None,
            config: GatherConfig = COMBINE_DEFAULT, interpret: bool = False) -> jax.Array:
  """out[t] = sum_k weights[t, k] * y[idx[t, k]] -> [T, D] in out_dtype (y's by default), f32
  accumulation; an index outside [0, R) adds 0."""
  (num_tokens, _), d = idx_TxK.shape, y_RxD.shape[1]
  out_shape = vma.result_type((num_tokens, d), jnp.dtype(out_dtype or y_RxD.dtype), y_RxD)
  if num_tokens == 0 or d == 0 or y_RxD.shape[0] == 0:
    return jnp.zeros(out_shape.shape, out_shape.dtype)
  kernel = functools.partial(_combine_kernel, config=config)
  call = _call(kernel, out_shape, num_tokens, d, config, interpret, "combine_gather_sum")
  return call(idx_TxK.astype(jnp.int32), weights_TxK, y_RxD)
