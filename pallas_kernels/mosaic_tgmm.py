"""The weight-gradient grouped matmul (tgmm) on Hopper with Pallas Mosaic GPU.

out[g] = lhs_g^T @ rhs_g for lhs[M, K], rhs[M, N] -> [G, K, N]: a reduction over each group's rows.
Work unit: (group, K tile, N tile); the pipeline walks the group's row blocks, from its first row
rounded down to 8 (TMA's alignment), so a group costs ceil(rows / block_r) blocks plus at most 7 rows
wherever it starts. The first and last blocks may hold rows of its neighbours (or padding past the
groups): those rows are zeroed in both operands in shared memory before the wgmma, with a select, so
NaN padding cannot leak.
Empty groups store zeros.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import backend, tiling
from pallas_kernels.mosaic_gmm import num_sms


@dataclasses.dataclass(frozen=True)
class TgmmConfig:
  block_m: int = 128  # output rows (the K dimension of lhs)
  block_n: int = 128  # output columns (the N dimension of rhs)
  block_r: int = 64  # rows of the group reduced per pipeline step
  max_concurrent_steps: int = 5
  grid_block_n: int = 4  # planar_snake width over the (K tile, N tile) grid of one group


# Sweep winners at 64K rows, 17 balanced groups (benchmarks/results/kernels.md, jax 0.11.2), per card,
# keyed by (K, N) of the call.
TUNED_BY_CARD: dict[str, dict[tuple[int, int], TgmmConfig]] = {
    "H200": {(2048, 1536): TgmmConfig(max_concurrent_steps=6), (768, 2048): TgmmConfig()},
    "H100": {(2048, 1536): TgmmConfig(), (768, 2048): TgmmConfig()},
}


def tuned() -> dict[tuple[int, int], TgmmConfig]:
  """This card's tuned tiles by (K, N) (H200's where the card has no table of its own)."""
  return backend.card_table(TUNED_BY_CARD)


def default_config(m, k, n, dtype, out_dtype=None) -> TgmmConfig | None:
  """The tuned tiles for an lhs[M, K], rhs[M, N] call, or None where the kernel cannot run it."""
  del m
  if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
    return None
  config = tuned().get((k, n))
  if config is None or k % config.block_m or n % config.block_n:
    block_m = next((b for b in (128, 64) if k % b == 0), None)
    block_n = next((b for b in (128, 64) if n % b == 0), None)
    if block_m is None or block_n is None:
      return None
    config = TgmmConfig(block_m=block_m, block_n=block_n)
  if jnp.dtype(out_dtype or dtype).itemsize > 2:
    # A 4-byte output tile takes 64 KB of smem: leave room by keeping at most 4 stages.
    config = dataclasses.replace(config, max_concurrent_steps=min(config.max_concurrent_steps, 4))
  return config


def _mask_rows(smem, row_axis, keep, interpret):
  """Zeroes the rows (along row_axis of the tile) where keep(row index) is False."""
  tile = smem[...]
  rows = lax.broadcasted_iota(jnp.int32, tile.shape, row_axis)
  if not interpret:  # the interpreter has no layouts
    rows = plgpu.layout_cast(rows, plgpu.Layout.WGMMA)
  smem[...] = jnp.where(keep(rows), tile, jnp.zeros_like(tile))


def tgmm(lhs_MxK, rhs_MxN, group_sizes_G, *, out_dtype=None, config: TgmmConfig = TgmmConfig(),
         interpret=None):
  if lhs_MxK.dtype != rhs_MxN.dtype:
    raise ValueError(f"mosaic tgmm needs one operand dtype, got {lhs_MxK.dtype}, {rhs_MxN.dtype}")
  m, k = lhs_MxK.shape
  n = rhs_MxN.shape[1]
  g = group_sizes_G.shape[0]
  c = config
  if k % c.block_m or n % c.block_n:
    raise ValueError(f"mosaic tgmm needs K % {c.block_m} == 0 and N % {c.block_n} == 0; "
                     f"got K={k}, N={n}")
  out_dtype = out_dtype or lhs_MxK.dtype
  if m % (row_multiple := c.block_r if interpret else 8):
    # TMA's (8, 64) smem tiling needs a row count divisible by 8; the interpreter also raises on
    # the partial last row block that TMA zero-fills on GPU. Padded rows are past the groups.
    pad = ((0, row_multiple - m % row_multiple), (0, 0))
    return tgmm(jnp.pad(lhs_MxK, pad), jnp.pad(rhs_MxN, pad), group_sizes_G, out_dtype=out_dtype,
                config=config, interpret=interpret)
  starts_G, ends_G = tiling.clipped_bounds(group_sizes_G, m)
  first_G = starts_G // tiling.ALIGN * tiling.ALIGN  # the group's first block starts here
  blocks_G = jnp.where(ends_G > starts_G, -(-(ends_G - first_G) // c.block_r), 0)
  # The GPU interpreter has no transposed wgmma operands: there, lhs is handed over as [K, M].
  k_major = bool(interpret)
  lhs = lhs_MxK.T if k_major else lhs_MxK
  grid_k, grid_n = k // c.block_m, n // c.block_n
  delay = 1 if c.max_concurrent_steps > 1 else 0

  def body(starts_gmem, ends_gmem, first_gmem, blocks_gmem, lhs_gmem, rhs_gmem, out_gmem):
    @plgpu.nd_loop((g, grid_k * grid_n), collective_axes="sm")
    def _tile(info):
      gi = info.index[0]
      ki, ni = plgpu.planar_snake(info.index[1], (grid_k, grid_n), 1, c.grid_block_n)
      num_blocks = blocks_gmem[gi]
      row0 = pl.multiple_of(first_gmem[gi], tiling.ALIGN)
      lo = starts_gmem[gi] - row0  # first valid row inside the first block
      hi = ends_gmem[gi] - row0 - (num_blocks - 1) * c.block_r  # rows valid in the last block

      def step(idx, lhs_smem, rhs_smem, acc_ref):
        r = idx[0]
        lhs_rows = 1 if k_major else 0

        @pl.when(r == 0)
        def _():
          _mask_rows(lhs_smem, lhs_rows, lambda i: i >= lo, k_major)
          _mask_rows(rhs_smem, 0, lambda i: i >= lo, k_major)
          plgpu.commit_smem()

        @pl.when(r == num_blocks - 1)
        def _():
          _mask_rows(lhs_smem, lhs_rows, lambda i: i < hi, k_major)
          _mask_rows(rhs_smem, 0, lambda i: i < hi, k_major)
          plgpu.commit_smem()

        a = lhs_smem if k_major else plgpu.transpose_ref(lhs_smem, (1, 0))
        plgpu.wgmma(acc_ref, a, rhs_smem)
        if not delay:
          plgpu.wgmma_wait(0)

      def acc_scope(acc_ref):
        @pl.when(num_blocks > 0)
        def _():
          lhs_spec = plgpu.BlockSpec((c.block_m, c.block_r), lambda r: (ki, r),
                                     delay_release=delay) if k_major else \
              plgpu.BlockSpec((c.block_r, c.block_m), lambda r: (r, ki), delay_release=delay)
          rows = pl.ds(row0, m)  # may reach past M: the pipeline reads only num_blocks blocks
          plgpu.emit_pipeline(
              functools.partial(step, acc_ref=acc_ref),
              grid=(num_blocks,),
              in_specs=[lhs_spec,
                        plgpu.BlockSpec((c.block_r, c.block_n), lambda r: (r, ni),
                                        delay_release=delay)],
              max_concurrent_steps=c.max_concurrent_steps,
          )(lhs_gmem.at[:, rows] if k_major else lhs_gmem.at[rows], rhs_gmem.at[rows])
        return acc_ref[...]

      acc = pl.run_scoped(acc_scope, plgpu.ACC((c.block_m, c.block_n)))

      @functools.partial(pl.run_scoped, o_smem=plgpu.SMEM((c.block_m, c.block_n), out_dtype))
      def _(o_smem):
        o_smem[...] = acc.astype(out_dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(
            o_smem, out_gmem.at[gi, pl.ds(ki * c.block_m, c.block_m),
                                pl.ds(ni * c.block_n, c.block_n)])
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  kernel = plgpu.kernel(
      body,
      out_type=jax.ShapeDtypeStruct((g, k, n), out_dtype),
      grid=(num_sms(interpret),),
      grid_names=("sm",),
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      interpret=interpret,
  )
  return kernel(starts_G, ends_G, first_G, blocks_G, lhs, rhs_MxN)
