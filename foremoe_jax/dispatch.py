"""Expert-parallel token dispatch, written per device (runs inside `jax.shard_map` over "expert").

One source device holds N tokens with k experts each: P = N*k (token, expert) pairs, indexed i = t*k + j.
1. `route`: each pair gets a global slot g = d*S + j by the placement's deterministic split rule, and a
   position in the by-slot order (grouped by destination device, then local slot).
2. `padded_exchange` / `ragged_exchange`: rows travel to their destination devices, where they are
   grouped by local slot for one grouped matmul over the working slots, then travel back.
3. The caller combines each token's k outputs with its gate weights.
All index arithmetic is traced: a new placement is new values, never a new program.
"""
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from foremoe_jax.placement import slot_pair_counts
from pallas_kernels import vma

AXIS = "expert"


class Routing(NamedTuple):
  position_P: jax.Array  # int32 [P] position of each pair in the by-slot order
  count_G: jax.Array  # int32 [G] pairs this source sends to each global slot
  pair_at_P: jax.Array  # int32 [P] the pair at each by-slot position (inverse of position_P)


def route(expert_P: jax.Array, slot_expert_G: jax.Array, share_G: jax.Array, num_experts: int) -> Routing:
  """Assigns every pair to a replica slot of its expert; the i-th pair of an expert in pair order
  goes to the replica whose integer share interval covers i."""
  num_pairs = expert_P.shape[0]
  pairs_per_expert_E = jnp.bincount(expert_P, length=num_experts).astype(jnp.int32)
  count_G, order_G = slot_pair_counts(slot_expert_G, share_G, pairs_per_expert_E)
  by_expert_P = jnp.argsort(expert_P, stable=True)
  # Slots in (expert, replica) order tile the expert-sorted pairs exactly.
  end_sorted_G = jnp.cumsum(count_G[order_G])
  slot_rank_P = jnp.searchsorted(end_sorted_G, jnp.arange(num_pairs), side="right")
  slot_rank_P = jnp.minimum(slot_rank_P, order_G.shape[0] - 1)
  slot_of_sorted_P = order_G[slot_rank_P]
  start_in_expert_order_G = jnp.zeros_like(count_G).at[order_G].set(end_sorted_G - count_G[order_G])
  start_in_slot_order_G = jnp.cumsum(count_G) - count_G
  position_sorted_P = (start_in_slot_order_G[slot_of_sorted_P] + jnp.arange(num_pairs)
                       - start_in_expert_order_G[slot_of_sorted_P])
  position_P = jnp.zeros_like(position_sorted_P).at[by_expert_P].set(position_sorted_P)
  pair_at_P = jnp.zeros_like(position_P).at[position_P].set(jnp.arange(num_pairs, dtype=position_P.dtype))
  return Routing(position_P.astype(jnp.int32), count_G, pair_at_P.astype(jnp.int32))


def local_slot_ids(count_from_src_DxS: jax.Array, rows_per_src: int, rows_arrived_D: jax.Array):
  """Local slot id of every received row ([D*rows_per_src]); S marks padding or dropped rows."""
  num_slots = count_from_src_DxS.shape[1]
  ends_DxS = jnp.cumsum(count_from_src_DxS, axis=1)
  rows_R = jnp.arange(rows_per_src)
  slot_DxR = jax.vmap(lambda e: jnp.searchsorted(e, rows_R, side="right"))(ends_DxS)
  slot_DxR = jnp.where(rows_R[None, :] < rows_arrived_D[:, None], slot_DxR, num_slots)
  return slot_DxR.reshape(-1)


def vary_over(axes: tuple[str, ...], *arrays: jax.Array) -> tuple[jax.Array, ...]:
  """Marks the arrays as varying over all of `axes` (the token axes).

  Kernels with a custom VJP need it: each input's cotangent must have its input's type, and the
  transpose of this cast sums e.g. the weight gradient over the data axis. (Received rows of the
  ragged exchange are typed invariant, weights vary over "expert" only, tokens over all batch axes.)
  """
  return tuple(vma.vary_over(axes, a) for a in arrays)


def _take(x_NxH: jax.Array, idx_M: jax.Array) -> jax.Array:
  rows_MxH = x_NxH[jnp.maximum(idx_M, 0)]
  return jnp.where((idx_M >= 0)[:, None], rows_MxH, jnp.zeros((), x_NxH.dtype))


def gather_rows(x_NxH: jax.Array, idx_M: jax.Array, inverse_N: jax.Array) -> jax.Array:
  """`y[m] = x[idx[m]]` (0 where idx < 0) for an `idx` that reads each row of x at most once, with
  `inverse[n]` the m reading row n (-1 if none). The backward is then a gather too: GPUs run a
  scatter-add of [rows, hidden] with atomics, a gather without."""
  axes = vma.varying_axes(x_NxH) | vma.varying_axes(idx_M) | vma.varying_axes(inverse_N)
  (x_NxH,) = vary_over(tuple(axes), x_NxH)  # the cotangent varies like the indices
  return _gather_rows(x_NxH, idx_M, inverse_N)


@jax.custom_vjp
def _gather_rows(x_NxH, idx_M, inverse_N):
  return _take(x_NxH, idx_M)


def _gather_rows_fwd(x_NxH, idx_M, inverse_N):
  return _take(x_NxH, idx_M), inverse_N


def _gather_rows_bwd(inverse_N, dy_MxH):
  return _take(dy_MxH, inverse_N), None, None


_gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


def inverse_map(idx_M: jax.Array, size: int) -> jax.Array:
  """int32 [size]: the m with idx[m] == n, -1 where no m reads n (idx injective, -1 = nothing)."""
  m = jnp.arange(idx_M.shape[0], dtype=jnp.int32)
  return jnp.full((size,), -1, jnp.int32).at[jnp.where(idx_M >= 0, idx_M, size)].set(m, mode="drop")


def grouped_by_slot(rows_RxH, slot_R, num_slots: int, expert_fn: Callable):
  """Sorts received rows by local slot, runs `expert_fn(rows, group_sizes)`, restores the order."""
  order_R = jnp.argsort(slot_R, stable=True).astype(jnp.int32)
  inverse_R = inverse_map(order_R, order_R.shape[0])
  group_sizes_S = jnp.bincount(slot_R, length=num_slots + 1)[:num_slots].astype(jnp.int32)
  out_RxH = expert_fn(gather_rows(rows_RxH, order_R, inverse_R), group_sizes_S)
  return gather_rows(out_RxH, inverse_R, order_R), group_sizes_S


def padded_exchange(x_NxH, routing: Routing, top_k: int, num_slots: int, capacity: int,
                    expert_fn: Callable):
  """Fixed-capacity `all_to_all`: at most `capacity` rows per (source, destination); rows beyond it
  are dropped and counted. Returns (out_PxH in pair order, group_sizes_S, dropped pairs)."""
  num_devices = routing.count_G.shape[0] // num_slots
  hidden = x_NxH.shape[1]
  num_pairs = routing.pair_at_P.shape[0]
  send_D = routing.count_G.reshape(num_devices, num_slots).sum(axis=1)
  start_D = jnp.cumsum(send_D) - send_D
  rows_C = jnp.arange(capacity)
  valid_DxC = rows_C[None, :] < jnp.minimum(send_D, capacity)[:, None]
  position_DxC = jnp.clip(start_D[:, None] + rows_C[None, :], 0, num_pairs - 1)
  pair_DC = jnp.where(valid_DxC, routing.pair_at_P[position_DxC], -1).reshape(-1)
  # Each pair's row in the send buffer (destination block, then position in it); -1 = dropped.
  dst_P = jnp.minimum(jnp.searchsorted(jnp.cumsum(send_D), routing.position_P, side="right"), num_devices - 1)
  row_P = routing.position_P - start_D[dst_P]
  slot_in_buffer_P = jnp.where(row_P < capacity, dst_P * capacity + row_P, -1).astype(jnp.int32)
  x_PxH = jnp.repeat(x_NxH, top_k, axis=0)  # pair i = t*k + j; its transpose sums over k
  send_DCxH = gather_rows(x_PxH, pair_DC, slot_in_buffer_P)
  recv_DxCxH = jax.lax.all_to_all(send_DCxH.reshape(num_devices, capacity, hidden), AXIS, 0, 0, tiled=True)
  count_to_dst_DxS = routing.count_G.reshape(num_devices, num_slots)
  count_from_src_DxS = jax.lax.all_to_all(count_to_dst_DxS, AXIS, 0, 0, tiled=True)
  arrived_D = jnp.minimum(count_from_src_DxS.sum(axis=1), capacity)
  slot_R = local_slot_ids(count_from_src_DxS, capacity, arrived_D)
  out_RxH, group_sizes_S = grouped_by_slot(recv_DxCxH.reshape(-1, hidden), slot_R, num_slots, expert_fn)
  back_DxCxH = jax.lax.all_to_all(out_RxH.reshape(num_devices, capacity, hidden), AXIS, 0, 0, tiled=True)
  out_PxH = gather_rows(back_DxCxH.reshape(-1, hidden), slot_in_buffer_P, pair_DC)
  dropped = (send_D - jnp.minimum(send_D, capacity)).sum()
  return out_PxH, group_sizes_S, dropped
def ragged_exchange(x_NxH, routing: Routing, top_k: int, num_slots: int, recv_capacity: int,
                    expert_fn: Callable):
  """`ragged_all_to_all` (GPU/TPU): rows travel unpadded; each receiver holds at most `recv_capacity`
  rows, and senders clip deterministically (from the all-gathered size matrix) so none overflows."""
  num_devices = routing.count_G.shape[0] // num_slots
  hidden = x_NxH.shape[1]
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
  x_sorted_PxH = gather_rows(jnp.repeat(x_NxH, top_k, axis=0), routing.pair_at_P, routing.position_P)
  recv_RxH = jnp.zeros((recv_capacity, hidden), x_NxH.dtype)
  recv_RxH = jax.lax.ragged_all_to_all(x_sorted_PxH, recv_RxH, start_D.astype(jnp.int32),
                                       send_D.astype(jnp.int32), out_offsets_D, recv_sizes_D.astype(jnp.int32),
                                       axis_name=AXIS)
  count_from_src_DxS = jax.lax.all_to_all(count_to_dst_DxS, AXIS, 0, 0, tiled=True)
  # Slot of received row r: find its source block, then its slot inside that block.
  rows_R = jnp.arange(recv_capacity)
  src_R = jnp.clip(jnp.searchsorted(recv_offsets_D + recv_sizes_D, rows_R, side="right"), 0, num_devices - 1)
  within_R = rows_R - recv_offsets_D[src_R]
  ends_DxS = jnp.cumsum(count_from_src_DxS, axis=1)
  slot_R = jax.vmap(lambda e, r: jnp.searchsorted(e, r, side="right"))(ends_DxS[src_R], within_R)
  slot_R = jnp.where(within_R < recv_sizes_D[src_R], slot_R, num_slots)
  out_RxH, group_sizes_S = grouped_by_slot(recv_RxH, slot_R, num_slots, expert_fn)
  back_PxH = jnp.zeros_like(x_sorted_PxH)
  back_PxH = jax.lax.ragged_all_to_all(out_RxH, back_PxH, recv_offsets_D, recv_sizes_D.astype(jnp.int32),
                                       start_SrcxDst[:, me].astype(jnp.int32), send_D.astype(jnp.int32),
                                       axis_name=AXIS)
  dst_P = jnp.minimum(jnp.searchsorted(jnp.cumsum(sizes_SrcxDst[me]), routing.position_P, side="right"),
                      num_devices - 1)
  kept_P = routing.position_P - start_D[dst_P] < send_D[dst_P]
  read_P = jnp.where(kept_P, routing.position_P, -1)
  out_PxH = gather_rows(back_PxH, read_P, inverse_map(read_P, back_PxH.shape[0]))
  dropped = (sizes_SrcxDst[me] - send_D).sum()
  return out_PxH, group_sizes_S, dropped
