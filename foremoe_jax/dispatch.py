"""Expert-parallel token dispatch, written per device (runs inside `jax.shard_map` over "expert").

One source device holds N tokens with k experts each: P = N*k (token, expert) pairs, indexed i = t*k + j.
1. `route`: each pair gets a global slot g = d*S + j by the placement's deterministic split rule, and a
   position in the by-slot order (grouped by destination device, then local slot).
2. `padded_exchange` / `ragged_exchange` (one signature; `backends.DISPATCH` names them): rows travel to
   their destination devices, where they are grouped by local slot for one grouped matmul over the
   working slots, then travel back, and each token's k outputs are summed with its gate weights.
Row moves are `pallas_kernels.permute` / `combine` (Pallas kernels on GPU, XLA elsewhere) given their
inverse maps, so every backward is a gather: no scatter-add, and no XLA fusion of a k-row gather
with what follows it (on GPUs those fusions cost much of the MoE step: BENCHMARKS.md, numbers behind choices).
All index arithmetic is traced: a new placement is new values, never a new program.
"""
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

import pallas_kernels
from foremoe_jax.mesh import EXPERT_AXIS as AXIS
from foremoe_jax.placement import slot_pair_counts
from pallas_kernels import vma
from pallas_kernels.tiling import searchsorted


class Routing(NamedTuple):
  position_P: jax.Array  # int32 [P] position of each pair in the by-slot order
  count_G: jax.Array  # int32 [G] pairs this source sends to each global slot
  pair_at_P: jax.Array  # int32 [P] the pair at each by-slot position (inverse of position_P)


def route(expert_P: jax.Array, slot_expert_G: jax.Array, share_G: jax.Array, num_experts: int,
          masked: bool = False) -> Routing:
  """Assigns every pair to a replica slot of its expert; the i-th pair of an expert in pair order
  goes to the replica whose integer share interval covers i. `masked`: pairs of expert id
  `num_experts` are routed nowhere: in no slot's count, at the positions after every real pair."""
  num_pairs = expert_P.shape[0]
  pairs_per_expert_E = jnp.bincount(expert_P, length=num_experts).astype(jnp.int32)
  count_G, order_G = slot_pair_counts(slot_expert_G, share_G, pairs_per_expert_E)
  by_expert_P = jnp.argsort(expert_P, stable=True)
  # Slots in (expert, replica) order tile the expert-sorted pairs exactly.
  end_sorted_G = jnp.cumsum(count_G[order_G])
  slot_rank_P = searchsorted(end_sorted_G, jnp.arange(num_pairs))
  slot_rank_P = jnp.minimum(slot_rank_P, order_G.shape[0] - 1)
  slot_of_sorted_P = order_G[slot_rank_P]
  start_in_expert_order_G = jnp.zeros_like(count_G).at[order_G].set(end_sorted_G - count_G[order_G])
  start_in_slot_order_G = jnp.cumsum(count_G) - count_G
  position_sorted_P = (start_in_slot_order_G[slot_of_sorted_P] + jnp.arange(num_pairs)
                       - start_in_expert_order_G[slot_of_sorted_P])
  if masked:  # the expert-sorted pairs past the real ones keep their rank as position
    position_sorted_P = jnp.where(jnp.arange(num_pairs) < end_sorted_G[-1], position_sorted_P,
                                  jnp.arange(num_pairs))
  position_P = jnp.zeros_like(position_sorted_P).at[by_expert_P].set(position_sorted_P)
  pair_at_P = jnp.zeros_like(position_P).at[position_P].set(jnp.arange(num_pairs, dtype=position_P.dtype))
  return Routing(position_P.astype(jnp.int32), count_G, pair_at_P.astype(jnp.int32))


def local_slot_ids(count_from_src_DxS: jax.Array, rows_per_src: int, rows_arrived_D: jax.Array):
  """Local slot id of every received row ([D*rows_per_src]); S marks padding or dropped rows."""
  num_slots = count_from_src_DxS.shape[1]
  ends_DxS = jnp.cumsum(count_from_src_DxS, axis=1)
  rows_R = jnp.arange(rows_per_src)
  slot_DxR = jax.vmap(lambda e: searchsorted(e, rows_R))(ends_DxS)
  slot_DxR = jnp.where(rows_R[None, :] < rows_arrived_D[:, None], slot_DxR, num_slots)
  return slot_DxR.reshape(-1)


def vary_over(axes: tuple[str, ...], *arrays: jax.Array) -> tuple[jax.Array, ...]:
  """Marks the arrays as varying over all of `axes` (the token axes).

  Kernels with a custom VJP need it: each input's cotangent must have its input's type, and the
  transpose of this cast sums e.g. the weight gradient over the data axis. (Received rows of the
  ragged exchange are typed invariant, weights vary over "expert" only, tokens over all batch axes.)
  """
  return tuple(vma.vary_over(axes, a) for a in arrays)


def gather_rows(x_NxH: jax.Array, idx_M: jax.Array, inverse_NxK: jax.Array, backend: str | None) -> jax.Array:
  """`y[m] = x[idx[m]]` (0 where idx < 0), with `inverse[n]` every m reading row n (-1 fills): the
  backward is then a gather (K = 1) or a k-row gather-sum, never a scatter-add of [rows, hidden]
  (GPUs run those with atomics)."""
  x_NxH = vma.vary_like(x_NxH, idx_M, inverse_NxK)  # the cotangent varies like the indices
  return pallas_kernels.permute(x_NxH, idx_M, inverse_TxK=inverse_NxK, backend=backend)


def combine_rows(y_RxH: jax.Array, read_NxK: jax.Array, gate_NxK: jax.Array, out_dtype,
                 backend: str | None) -> jax.Array:
  """`out[n] = sum_j gate[n, j] * y[read[n, j]]` (f32 sum) in out_dtype; no row of y is read twice."""
  y_RxH = vma.vary_like(y_RxH, read_NxK, gate_NxK)
  gate_NxK = vma.vary_like(gate_NxK, y_RxH)
  return pallas_kernels.combine(y_RxH, read_NxK, gate_NxK, unique_rows=True, out_dtype=out_dtype,
                                backend=backend)


def inverse_map(idx_M: jax.Array, size: int) -> jax.Array:
  """int32 [size]: the m with idx[m] == n, -1 where no m reads n (idx injective, -1 = nothing)."""
  m = jnp.arange(idx_M.shape[0], dtype=jnp.int32)
  return jnp.full((size,), -1, jnp.int32).at[jnp.where(idx_M >= 0, idx_M, size)].set(m, mode="drop")


def grouped_by_slot(rows_RxH, slot_R, num_slots: int, expert_fn: Callable, backend: str | None):
  """Sorts received rows by local slot, runs `expert_fn(rows, group_sizes)`, restores the order."""
  order_R = jnp.argsort(slot_R, stable=True).astype(jnp.int32)
  inverse_R = inverse_map(order_R, order_R.shape[0])
  group_sizes_S = jnp.bincount(slot_R, length=num_slots + 1)[:num_slots].astype(jnp.int32)
  out_RxH = expert_fn(gather_rows(rows_RxH, order_R, inverse_R[:, None], backend), group_sizes_S)
  return gather_rows(out_RxH, inverse_R, order_R[:, None], backend), group_sizes_S


def padded_exchange(x_NxH, gate_NxK, routing: Routing, num_slots: int, capacity: int, expert_fn: Callable,
                    backend: str | None = None, masked: bool = False):
  """Fixed-capacity `all_to_all`: at most `capacity` rows per (source, destination); rows beyond it
  are dropped and counted. `masked`: `routing` routes some pairs nowhere (`route`); they get no row.
  Returns (y_NxH gate-weighted sums, group_sizes_S, dropped pairs)."""
  num_devices = routing.count_G.shape[0] // num_slots
  (num_tokens, hidden), top_k = x_NxH.shape, gate_NxK.shape[1]
  num_pairs = routing.pair_at_P.shape[0]
  send_D = routing.count_G.reshape(num_devices, num_slots).sum(axis=1)
  start_D = jnp.cumsum(send_D) - send_D
  rows_C = jnp.arange(capacity)
  valid_DxC = rows_C[None, :] < jnp.minimum(send_D, capacity)[:, None]
  position_DxC = jnp.clip(start_D[:, None] + rows_C[None, :], 0, num_pairs - 1)
  pair_DC = jnp.where(valid_DxC, routing.pair_at_P[position_DxC], -1).reshape(-1)
  # Each pair's row in the send buffer (destination block, then position in it); -1 = dropped.
  dst_P = jnp.minimum(searchsorted(jnp.cumsum(send_D), routing.position_P), num_devices - 1)
  row_P = routing.position_P - start_D[dst_P]
  # A pair routed nowhere sits past the last block: beyond what its clamped destination sends.
  sent_P = row_P < (jnp.minimum(send_D[dst_P], capacity) if masked else capacity)
  slot_in_buffer_NxK = jnp.where(sent_P, dst_P * capacity + row_P, -1).astype(jnp.int32).reshape(
      num_tokens, top_k)  # pair i = t*k + j
  token_DC = jnp.where(pair_DC >= 0, pair_DC // top_k, -1)
  send_DCxH = gather_rows(x_NxH, token_DC, slot_in_buffer_NxK, backend)
  recv_DxCxH = jax.lax.all_to_all(send_DCxH.reshape(num_devices, capacity, hidden), AXIS, 0, 0, tiled=True)
  count_to_dst_DxS = routing.count_G.reshape(num_devices, num_slots)
  count_from_src_DxS = jax.lax.all_to_all(count_to_dst_DxS, AXIS, 0, 0, tiled=True)
  arrived_D = jnp.minimum(count_from_src_DxS.sum(axis=1), capacity)
  slot_R = local_slot_ids(count_from_src_DxS, capacity, arrived_D)
  out_RxH, group_sizes_S = grouped_by_slot(recv_DxCxH.reshape(-1, hidden), slot_R, num_slots, expert_fn,
                                           backend)
  back_DxCxH = jax.lax.all_to_all(out_RxH.reshape(num_devices, capacity, hidden), AXIS, 0, 0, tiled=True)
  y_NxH = combine_rows(back_DxCxH.reshape(-1, hidden), slot_in_buffer_NxK, gate_NxK, x_NxH.dtype, backend)
  dropped = (send_D - jnp.minimum(send_D, capacity)).sum()
  return y_NxH, group_sizes_S, dropped


def ragged_exchange(x_NxH, gate_NxK, routing: Routing, num_slots: int, capacity: int, expert_fn: Callable,
                    backend: str | None = None, masked: bool = False):
  """`ragged_all_to_all` (GPU/TPU): rows travel unpadded. Each receiver holds at most D * `capacity` rows
  (every source sending it `capacity`), and senders clip deterministically (from the all-gathered size
  matrix) so none overflows: a pair count above `capacity` drops rows only when the receiver's total does.
  `masked` (the shared signature's flag) changes nothing here: pairs routed nowhere sit past every
  destination's block, so the clip already sends them nowhere. Returns what `padded_exchange` returns."""
  num_devices = routing.count_G.shape[0] // num_slots
  recv_capacity = capacity * num_devices
  (num_tokens, hidden), top_k = x_NxH.shape, gate_NxK.shape[1]
  me = jax.lax.axis_index(AXIS)
  count_to_dst_DxS = routing.count_G.reshape(num_devices, num_slots)
  sizes_SrcxDst = jax.lax.all_gather(count_to_dst_DxS.sum(axis=1), AXIS)
  before_SrcxDst = jnp.cumsum(sizes_SrcxDst, axis=0) - sizes_SrcxDst
  kept_SrcxDst = jnp.clip(recv_capacity - before_SrcxDst, 0, sizes_SrcxDst)
  send_D = kept_SrcxDst[me]
  start_SrcxDst = jnp.cumsum(sizes_SrcxDst, axis=1) - sizes_SrcxDst
  start_D = start_SrcxDst[me]
  out_offsets_D = before_SrcxDst[me].astype(jnp.int32)
  recv_sizes_D = kept_SrcxDst[:, me]
  recv_offsets_D = before_SrcxDst[:, me].astype(jnp.int32)
  x_sorted_PxH = gather_rows(x_NxH, routing.pair_at_P // top_k, routing.position_P.reshape(num_tokens, top_k),
                             backend)
  recv_RxH = jnp.zeros((recv_capacity, hidden), x_NxH.dtype)
  recv_RxH = jax.lax.ragged_all_to_all(x_sorted_PxH, recv_RxH, start_D.astype(jnp.int32),
                                       send_D.astype(jnp.int32), out_offsets_D, recv_sizes_D.astype(jnp.int32),
                                       axis_name=AXIS)
  count_from_src_DxS = jax.lax.all_to_all(count_to_dst_DxS, AXIS, 0, 0, tiled=True)
  # Slot of received row r: find its source block, then its slot inside that block.
  rows_R = jnp.arange(recv_capacity)
  src_R = jnp.clip(searchsorted(recv_offsets_D + recv_sizes_D, rows_R), 0, num_devices - 1)
  within_R = rows_R - recv_offsets_D[src_R]
  ends_DxS = jnp.cumsum(count_from_src_DxS, axis=1)
  slot_R = jax.vmap(searchsorted)(ends_DxS[src_R], within_R)
  slot_R = jnp.where(within_R < recv_sizes_D[src_R], slot_R, num_slots)
  out_RxH, group_sizes_S = grouped_by_slot(recv_RxH, slot_R, num_slots, expert_fn, backend)
  back_PxH = jnp.zeros_like(x_sorted_PxH)
  back_PxH = jax.lax.ragged_all_to_all(out_RxH, back_PxH, recv_offsets_D, recv_sizes_D.astype(jnp.int32),
                                       start_SrcxDst[:, me].astype(jnp.int32), send_D.astype(jnp.int32),
                                       axis_name=AXIS)
  dst_P = jnp.minimum(searchsorted(jnp.cumsum(sizes_SrcxDst[me]), routing.position_P), num_devices - 1)
  kept_P = routing.position_P - start_D[dst_P] < send_D[dst_P]
  read_NxK = jnp.where(kept_P, routing.position_P, -1).reshape(num_tokens, top_k)
  y_NxH = combine_rows(back_PxH, read_NxK, gate_NxK, x_NxH.dtype, backend)
  dropped = (sizes_SrcxDst[me] - send_D).sum()
  return y_NxH, group_sizes_S, dropped
