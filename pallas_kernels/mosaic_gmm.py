"""Grouped matmul forward on Hopper with Pallas Mosaic GPU (wgmma + TMA).

out[M, N] = lhs[M, K] @ rhs[g] for the rows of group g; rows past the groups are written as zeros.
Work unit: a (row tile, N tile) pair. Row tiles come from `tiling.row_tiles`: each group is tiled
from its own first row (rounded down to 8 rows for TMA), and a tile stores only its group's rows,
with a ladder of power-of-two-row TMA stores (TMA boxes are static). The loop is persistent (one CTA per
SM walking the tiles), two compute warpgroups split the N tile (or, with split_m, the rows, so each
issues wgmmas twice as wide in N), a third one feeds TMA loads.
"""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import backend, tiling


@dataclasses.dataclass(frozen=True)
class GmmConfig:
  block_m: int = 128
  block_n: int = 128  # per compute warpgroup; a CTA covers num_compute_wgs * block_n columns
  block_k: int = 64
  max_concurrent_steps: int = 3
  # Tile order (planar_snake width): N tiles walked before the next row tile; 0 = all of them,
  # so each lhs row tile is read from HBM once while its N tiles run on neighbouring SMs.
  grid_block_n: int = 0
  num_compute_wgs: int = 2  # 1: no warp specialization (one warpgroup loads and computes)
  # Warp-specialized only: wgmma steps left in flight before a smem slot goes back to the loader.
  delay_release: int = 0
  # Epilogue in this many column chunks per warpgroup: less smem for it, more for the pipeline.
  epi_split: int = 1
  # Warp-specialized only: the compute warpgroups split the CTA's block_m rows instead of its columns;
  # each then covers all block_n columns (the CTA tile is block_m x block_n).
  split_m: bool = False

  @property
  def cta_n(self) -> int:
    return self.block_n if self.split_m else self.block_n * self.num_compute_wgs

  @property
  def wg_m(self) -> int:
    return self.block_m // self.num_compute_wgs if self.split_m else self.block_m


_PARAMS = plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup)


def num_sms(interpret=None) -> int:
  """Persistent grid size: one CTA per SM (a few in interpret mode, where each CTA is a thread)."""
  if interpret:
    return 3
  return getattr(jax.devices()[0], "core_count", None) or 132


# Sweep winners at 64K rows, 17 balanced groups (benchmarks/results/kernels.md), per card, keyed by
# (K, N) of the call: the gate+up and down projections of Qwen3-30B-A3B and their d(lhs). On H200 (run 4)
# the row-split warpgroups (64 x 256 wgmmas each) with 4 stages and a halved epilogue won at every shape;
# on H100 (run 7) two shapes preferred 128 x 128 column-split tiles with 4 stages and the row split
# walked 4 N tiles per row tile.
_ROW_SPLIT = GmmConfig(block_n=256, split_m=True, max_concurrent_steps=4, epi_split=2, delay_release=1)
_ROW_SPLIT_SNAKE = dataclasses.replace(_ROW_SPLIT, grid_block_n=4)
_COL_SPLIT_4 = GmmConfig(max_concurrent_steps=4, epi_split=2, delay_release=1)
TUNED_BY_CARD: dict[str, dict[tuple[int, int], GmmConfig]] = {
    "H200": {(2048, 1536): _ROW_SPLIT, (1536, 2048): _ROW_SPLIT, (768, 2048): _ROW_SPLIT, (2048, 768): _ROW_SPLIT},
    "H100": {(2048, 1536): _COL_SPLIT_4, (1536, 2048): _ROW_SPLIT_SNAKE, (768, 2048): _ROW_SPLIT_SNAKE,
             (2048, 768): _COL_SPLIT_4},
}


def tuned() -> dict[tuple[int, int], GmmConfig]:
  """This card's tuned tiles by (K, N) (H200's where the card has no table of its own)."""
  return backend.card_table(TUNED_BY_CARD)


def _fits(config: GmmConfig, k: int, n: int) -> bool:
  return k % config.block_k == 0 and n % config.cta_n == 0


def default_config(m, k, n, dtype, out_dtype=None) -> GmmConfig | None:
  """The tuned tiles for an [M, K] x [K, N] call, or None where the kernel cannot run it."""
  del m
  if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
    return None
  tuned_config = tuned().get((k, n))
  config = tuned_config if tuned_config is not None and _fits(tuned_config, k, n) else next(
      (c for c in (GmmConfig(), GmmConfig(block_n=64, max_concurrent_steps=4)) if _fits(c, k, n)),
      None)
  if config is not None and jnp.dtype(out_dtype or dtype).itemsize > 2:
    # A 4-byte output doubles the epilogue's smem: store it in twice as many column chunks.
    config = dataclasses.replace(config, epi_split=2 * config.epi_split)
  return config


def _store_rows(acc, o_smem, out_gmem, row0, start, size, col0, block_m):
  """Stores rows [start, start + size) of the tile (base row row0, first column col0).

  Power-of-two-row TMA boxes cover any row count; the tile goes out in column chunks of o_smem's
  width. Leaves the last copies in flight (they overlap the next tile's main loop); the next call,
  and the kernel's end, wait for them before o_smem is reused.
  """
  width = o_smem.shape[1]
  for chunk in range(acc.shape[1] // width):
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    o_smem[...] = acc[:, chunk * width:(chunk + 1) * width].astype(o_smem.dtype)
    plgpu.commit_smem()
    rows, first = block_m, start
    while rows > 0:
      box = 1 << int(math.log2(rows))
      rows //= 2

      @pl.when(size & box != 0)
      def _():
        plgpu.copy_smem_to_gmem(
            o_smem.at[pl.ds(first, box)],
            out_gmem.at[pl.ds(row0 + first, box), pl.ds(col0 + chunk * width, width)])

      first = first + (size & box)


def gmm(lhs_MxK, rhs, group_sizes_G, *, transpose_rhs=False, out_dtype=None,
        config: GmmConfig = GmmConfig(), interpret=None):
  """lhs[M, K] x rhs[G, K, N] (or rhs[G, N, K] with transpose_rhs) -> [M, N] in out_dtype."""
  if lhs_MxK.dtype != rhs.dtype:
    raise ValueError(f"mosaic gmm needs one operand dtype, got {lhs_MxK.dtype} and {rhs.dtype}")
  m, k = lhs_MxK.shape
  g = rhs.shape[0]
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  if rhs.shape[2 if transpose_rhs else 1] != k:
    raise ValueError(f"contracting sizes differ: lhs {lhs_MxK.shape}, rhs {rhs.shape}")
  c = config
  cta_n = c.cta_n
  if c.split_m and (c.num_compute_wgs == 1 or c.wg_m % 64):
    raise ValueError(f"split_m needs several compute warpgroups of 64-row multiples; got {c}")
  if not _fits(c, k, n):
    raise ValueError(f"mosaic gmm needs K % {c.block_k} == 0 and N % {cta_n} == 0; got K={k}, N={n}")
  out_dtype = out_dtype or lhs_MxK.dtype
  if interpret and transpose_rhs:
    # The GPU interpreter has no transposed wgmma operands; on GPU wgmma reads rhs transposed.
    rhs, transpose_rhs = jnp.swapaxes(rhs, 1, 2), False
  # TMA's (8, 64) smem tiling needs a row count divisible by 8; the interpreter also raises on
  # the partial last row block that TMA zero-fills on GPU. Padded rows are past the groups.
  if m % (row_multiple := c.block_m if interpret else 8):
    lhs_MxK = jnp.pad(lhs_MxK, ((0, row_multiple - m % row_multiple), (0, 0)))
    return gmm(lhs_MxK, rhs, group_sizes_G, transpose_rhs=transpose_rhs, out_dtype=out_dtype,
               config=config, interpret=interpret)[:m]
  tiles = tiling.row_tiles(group_sizes_G, m, c.block_m)
  max_tiles = tiles.size.shape[0]
  grid_n = n // cta_n
  rhs_spec_shape = (cta_n, c.block_k) if transpose_rhs else (c.block_k, cta_n)
  rhs_index = (lambda ni: lambda ki: (ni, ki)) if transpose_rhs else (lambda ni: lambda ki: (ki, ni))

  def tile_info(t_group, t_row0, t_start, t_size, lin):
    mi, ni = plgpu.planar_snake(lin, (max_tiles, grid_n), 1, c.grid_block_n or grid_n)
    return ni, t_group[mi], t_row0[mi], t_start[mi], t_size[mi]

  def wgmma(acc_ref, lhs_smem, rhs_smem):
    plgpu.wgmma(acc_ref, lhs_smem,
                plgpu.transpose_ref(rhs_smem, (1, 0)) if transpose_rhs else rhs_smem)

  def simple_body(t_group, t_row0, t_start, t_size, lhs_gmem, rhs_gmem, out_gmem):
    @plgpu.nd_loop((max_tiles * grid_n,), collective_axes="sm")
    def _tile(info):
      ni, group, tile_row0, start, size = tile_info(t_group, t_row0, t_start, t_size, info.index[0])

      def acc_scope(acc_ref):
        @pl.when((group < g) & (size > 0))
        def _():
          plgpu.emit_pipeline(
              lambda _, lhs_smem, rhs_smem: wgmma(acc_ref, lhs_smem, rhs_smem),
              grid=(k // c.block_k,),
              in_specs=[
                  plgpu.BlockSpec((c.block_m, c.block_k), lambda ki: (0, ki), delay_release=1),
                  plgpu.BlockSpec(rhs_spec_shape, rhs_index(ni), delay_release=1),
              ],
              max_concurrent_steps=c.max_concurrent_steps,
          )(lhs_gmem.at[pl.ds(pl.multiple_of(tile_row0, tiling.ALIGN), c.block_m)],
            rhs_gmem.at[jnp.minimum(group, g - 1)])
        return acc_ref[...]

      acc = pl.run_scoped(acc_scope, plgpu.ACC((c.block_m, cta_n)))

      @pl.when(size > 0)
      def _():
        pl.run_scoped(
            lambda o_smem: _store_rows(acc, o_smem, out_gmem, tile_row0, start, size,
                                       ni * cta_n, c.block_m),
            plgpu.SMEM((c.block_m, cta_n), out_dtype))
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  def ws_body(t_group, t_row0, t_start, t_size, lhs_gmem, rhs_gmem, out_gmem):
    wg = lax.axis_index("wg")
    wg_cols = pl.ds(wg * c.block_n, c.block_n)

    def mma(_, lhs_smem, rhs_smem, acc_ref):
      if c.split_m:
        wgmma(acc_ref, lhs_smem.at[pl.ds(wg * c.wg_m, c.wg_m)], rhs_smem)
      else:
        wgmma(acc_ref, lhs_smem, rhs_smem.at[wg_cols] if transpose_rhs else rhs_smem.at[:, wg_cols])
      plgpu.wgmma_wait(c.delay_release)  # older steps are done: their slots go back to the loader
      return acc_ref

    def pipeline(body, compute_context):
      return plgpu.emit_pipeline_warp_specialized(
          body,
          grid=(k // c.block_k,),
          memory_registers=40,
          in_specs=[
              plgpu.BlockSpec((c.block_m, c.block_k), lambda ki: (0, ki),
                              delay_release=c.delay_release),
              plgpu.BlockSpec(rhs_spec_shape, (lambda ki: (0, ki)) if transpose_rhs
                              else (lambda ki: (ki, 0)), delay_release=c.delay_release),
          ],
          wg_axis="wg",
          num_compute_wgs=c.num_compute_wgs,
          max_concurrent_steps=c.max_concurrent_steps,
          compute_context=compute_context,
      )

    ignore = lambda *_, **__: None
    lhs_tile_gmem = lhs_gmem.at[pl.ds(0, c.block_m)]
    rhs_tile_gmem = rhs_gmem.at[0].at[pl.ds(0, cta_n)] if transpose_rhs else \
        rhs_gmem.at[0].at[:, pl.ds(0, cta_n)]

    @functools.partial(
        pl.run_scoped,
        allocs=pipeline(ignore, ignore).get_allocations(lhs_tile_gmem, rhs_tile_gmem),
        o_smem=plgpu.SMEM((c.num_compute_wgs, c.wg_m, c.block_n // c.epi_split), out_dtype),
        collective_axes="wg",
    )
    def _scope(allocs, o_smem):
      @plgpu.nd_loop((max_tiles * grid_n,), collective_axes="sm")
      def _tile(info):
        ni, group, tile_row0, start, size = tile_info(t_group, t_row0, t_start, t_size, info.index[0])
        if c.split_m:  # this warpgroup stores the segment's rows in [wg * wg_m, (wg + 1) * wg_m)
          row0, col0 = tile_row0 + wg * c.wg_m, ni * cta_n
          wg_start = jnp.clip(start - wg * c.wg_m, 0, c.wg_m)
          wg_size = jnp.clip(start + size - wg * c.wg_m, 0, c.wg_m) - wg_start
        else:
          row0, col0 = tile_row0, ni * cta_n + wg * c.block_n
          wg_start, wg_size = start, size

        def store(acc):
          _store_rows(acc, o_smem.at[wg], out_gmem, row0, wg_start, wg_size, col0, c.wg_m)

        def compute_context(eval_pipeline):
          @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((c.wg_m, c.block_n)))
          def _(acc_ref):
            eval_pipeline(acc_ref)
            store(acc_ref[...])

        @pl.when((group < g) & (size > 0))
        def _():
          gi = jnp.minimum(group, g - 1)
          rhs_cta = rhs_gmem.at[gi].at[pl.ds(ni * cta_n, cta_n)] if transpose_rhs else \
              rhs_gmem.at[gi].at[:, pl.ds(ni * cta_n, cta_n)]
          lhs_tile = lhs_gmem.at[pl.ds(pl.multiple_of(tile_row0, tiling.ALIGN), c.block_m)]
          pipeline(mma, compute_context)(lhs_tile, rhs_cta, allocations=allocs)

        @pl.when((group == g) & (size > 0) & (wg < c.num_compute_wgs))
        def _():
          store(jnp.zeros((c.wg_m, c.block_n), jnp.float32))

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  if c.num_compute_wgs == 1:
    kernel = plgpu.kernel(
        simple_body, out_type=jax.ShapeDtypeStruct((m, n), out_dtype),
        grid=(num_sms(interpret),), grid_names=("sm",), compiler_params=_PARAMS, interpret=interpret)
  else:
    kernel = plgpu.kernel(
        ws_body, out_type=jax.ShapeDtypeStruct((m, n), out_dtype),
        grid=(num_sms(interpret),), grid_names=("sm",), num_threads=c.num_compute_wgs + 1,
        thread_name="wg", compiler_params=_PARAMS, interpret=interpret)
  return kernel(tiles.group, tiles.row0, tiles.start, tiles.size, lhs_MxK, rhs)
