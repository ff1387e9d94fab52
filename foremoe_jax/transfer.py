"""Working expert slots from home-layout weights, and the transfer engine that moves them.

Home weights are `[E, ...]` sharded over "expert" (device d holds experts d*E/D ... (d+1)*E/D - 1).
The working layout is `[D*S, ...]` sharded over "expert": slot j of device d holds expert
`slot_expert[d*S + j]`. Everything is differentiable (the transpose of the all-gather is a reduce-scatter,
that of a `ppermute` the reverse `ppermute`, that of an `all_to_all` the reverse `all_to_all`). The executor
maps gradients back with explicit transposes written out so that they touch only the moved rows
(`apply_moves_transpose`; `hold_rows` and `flush_rows`, which keep a fill's gradients in a few
accumulator rows per device and send them back once): autodiff of a row copy materializes gradients of the whole
array (a scatter-add of whole experts into zeros, then a full add), which cost more than the moves.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from foremoe_jax.mesh import EXPERT_AXIS as AXIS
from foremoe_jax.placement import Tables


def working_slots_local(home_local_Ex, slot_expert_G: jax.Array, slots_per_device: int):
  """Per device (inside shard_map): this device's S working slots from the home shards of all devices."""
  me = jax.lax.axis_index(AXIS)
  mine_S = jax.lax.dynamic_slice_in_dim(slot_expert_G, me * slots_per_device, slots_per_device)
  home_all_Ex = jax.lax.all_gather(home_local_Ex, AXIS, tiled=True)
  return home_all_Ex[jnp.maximum(mine_S, 0)]


def materialize(home_weights, tables: Tables, mesh: jax.sharding.Mesh):
  """Global version: pytree of home `[E, ...]` arrays -> pytree of working `[D, S, ...]` arrays."""
  num_devices = mesh.shape[AXIS]
  slots = tables.slot_expert_G.shape[0] // num_devices

  def local(home, slot_expert_G):
    return jax.tree.map(lambda w: working_slots_local(w, slot_expert_G, slots), home)

  specs = jax.tree.map(lambda _: P(AXIS), home_weights)
  working = jax.shard_map(local, mesh=mesh, in_specs=(specs, P()), out_specs=specs)(
      home_weights, tables.slot_expert_G)
  return jax.tree.map(lambda w: w.reshape(num_devices, slots, *w.shape[1:]), working)


class MoveTables(NamedTuple):
  """Rows to move on and between devices; leading axes may be stacked ([L, ...], [M, L, ...]).

  Local copies have their own row count, so a transfer with many local copies (a base placement that
  keeps most experts home) does not pad its remote rounds. In round r >= 1 device d sends to device
  (d + r) % D; round 0 is unused. Shapes per layer:
  local_src_DxL, local_dst_DxL int32: rows each device copies within itself (-1 = nothing);
  send_DxRxK int32: the source row each device sends in each round (-1 = nothing);
  recv_DxRxK int32: the destination row each device writes with what it receives (-1 = nothing);
  active_R bool: rounds where any device sends a row (the "ppermute" exchange skips the others).
  """
  local_src_DxL: jax.Array
  local_dst_DxL: jax.Array
  send_DxRxK: jax.Array
  recv_DxRxK: jax.Array
  active_R: jax.Array


def move_tables(moves, num_devices: int, capacity: int, local_capacity: int | None = None) -> MoveTables:
  """Host: (src_device, src_row, dst_device, dst_row) rows -> numpy MoveTables with K = capacity rows per
  remote round and L = local_capacity local copies per device (default: as many as needed, at least 1)."""
  remote = [m for m in moves if m[0] != m[2]]
  local = [m for m in moves if m[0] == m[2]]
  per_device = np.bincount([m[0] for m in local], minlength=num_devices)
  local_capacity = local_capacity or max(1, int(per_device.max(initial=0)))
  if per_device.max(initial=0) > local_capacity:
    raise ValueError(f"more than local_capacity={local_capacity} local copies on one device")
  local_src = np.full((num_devices, local_capacity), -1, np.int32)
  local_dst = np.full((num_devices, local_capacity), -1, np.int32)
  used_local = np.zeros(num_devices, np.int64)
  for dev, src_row, _, dst_row in local:
    local_src[dev, used_local[dev]], local_dst[dev, used_local[dev]] = src_row, dst_row
    used_local[dev] += 1
  send = np.full((num_devices, num_devices, capacity), -1, np.int32)
  recv = np.full((num_devices, num_devices, capacity), -1, np.int32)
  used = np.zeros((num_devices, num_devices), np.int64)
  for src_dev, src_row, dst_dev, dst_row in remote:
    r = (dst_dev - src_dev) % num_devices
    k = used[src_dev, r]
    if k >= capacity:
      raise ValueError(f"more than capacity={capacity} rows move from device {src_dev} to {dst_dev}")
    send[src_dev, r, k], recv[dst_dev, r, k] = src_row, dst_row
    used[src_dev, r] += 1
  return MoveTables(local_src, local_dst, send, recv, (send >= 0).any(axis=(0, 2)))


def moves_needed(moves, num_devices: int) -> int:
  """The largest number of rows any (source, other destination) pair moves."""
  pairs = np.zeros((num_devices, num_devices), np.int64)
  for src_dev, _, dst_dev, _ in moves:
    if src_dev != dst_dev:
      pairs[src_dev, dst_dev] += 1
  return int(pairs.max(initial=0))


def local_copies_needed(moves, num_devices: int) -> int:
  """The largest number of rows one device copies within itself."""
  return int(np.bincount([m[0] for m in moves if m[0] == m[2]], minlength=num_devices).max(initial=0))


def home_to_base_moves(base_DxS: np.ndarray, num_experts: int):
  """Moves that build a base placement from the padded home layout (`pad_home`: expert e at device
  e // (E/D), row e % (E/D)): only slots whose expert is not already there. A slot the base empties keeps
  its home expert: it gets no tokens, so its stale weights are never read and its gradient is zero."""
  per_device = num_experts // base_DxS.shape[0]
  return [(e // per_device, e % per_device, d, j) for (d, j), e in np.ndenumerate(base_DxS)
          if e >= 0 and (e // per_device, e % per_device) != (d, j)]


def fill_moves(slot_expert_DxS: np.ndarray, base_DxS: np.ndarray, current_DxS: np.ndarray | None = None):
  """Moves that turn the working slots `current` (default: the base) into one micro-step's placement.

  Every slot whose expert differs from `current` is copied from the base, which holds every expert:
  from the same slot when the base has the expert there, else from a base slot on the same device,
  else from the nearest device in ring order (the shortest ppermute round).
  """
  current_DxS = base_DxS if current_DxS is None else current_DxS
  moves = []
  for (d, j), e in np.ndenumerate(slot_expert_DxS):
    if e < 0 or e == current_DxS[d, j]:
      continue  # an emptied slot gets no tokens: its stale weights are never read
    if base_DxS[d, j] == e:
      moves.append((d, j, d, j))
      continue
    holders = np.argwhere(base_DxS == e)
    local = holders[holders[:, 0] == d]
    src_dev, src_row = local[0] if len(local) else holders[np.argmin((d - holders[:, 0]) % len(base_DxS))]
    moves.append((int(src_dev), int(src_row), d, j))
  return moves


def _read_rows(src_RxX, read_K):
  """src[read[k]], zero rows where read[k] < 0."""
  rows = src_RxX[jnp.maximum(read_K, 0)]
  return jnp.where((read_K >= 0).reshape(-1, *[1] * (rows.ndim - 1)), rows, jnp.zeros((), rows.dtype))


def _add_rows(dst_RxX, write_K, rows):
  """dst[write[k]] += rows[k] where write[k] >= 0 (a few rows: the scatter touches only them)."""
  target = jnp.where(write_K >= 0, write_K, dst_RxX.shape[0])
  return dst_RxX.at[target].add(rows.astype(dst_RxX.dtype), mode="drop")


def _write_rows(dst_RdxX, write_K, rows):
  """dst[write[k]] = rows[k] where write[k] >= 0."""
  target = jnp.where(write_K >= 0, write_K, dst_RdxX.shape[0])
  return dst_RdxX.at[target].set(rows.astype(dst_RdxX.dtype), mode="drop")


# How remote rows travel: "ppermute" = one ppermute per round d -> d+r, idle rounds skipped by lax.cond
# (on GPU a cond reads its predicate on the host: a sync); "ppermute_all" = every round, no cond;
# "all_to_all" = one all_to_all of K rows per destination, no cond (one collective instead of D - 1).
EXCHANGES = ("ppermute", "ppermute_all", "all_to_all")


def _by_peer(send_RxK, recv_RxK):
  """Round-indexed tables -> (rows sent to each destination device, rows written per source device)."""
  num_devices = send_RxK.shape[0]
  me, peers = jax.lax.axis_index(AXIS), jnp.arange(num_devices)
  return send_RxK[(peers - me) % num_devices], recv_RxK[(me - peers) % num_devices]


def _a2a(rows_DKxX, num_devices):
  rows = rows_DKxX.reshape(num_devices, -1, *rows_DKxX.shape[1:])
  return jax.lax.all_to_all(rows, AXIS, 0, 0, tiled=True).reshape(rows_DKxX.shape)


def move_rows_local(src_RsxX, dst_RdxX, local_src_L, local_dst_L, send_RxK, recv_RxK, active_R,
                    exchange="all_to_all"):
  """Per device (inside shard_map): copies rows of `src` into `dst`: local copies, then the remote rows
  (`exchange`, see EXCHANGES; the active flags are replicated, so all devices agree on skipped rounds).
  The transpose of each `ppermute` is the reverse `ppermute`, so gradients of `dst` flow back to `src`.
  """
  num_devices = send_RxK.shape[0]
  dst_RdxX = _write_rows(dst_RdxX, local_dst_L, _read_rows(src_RsxX, local_src_L))
  if exchange == "all_to_all":
    to_dst_DxK, from_src_DxK = _by_peer(send_RxK, recv_RxK)
    got = _a2a(_read_rows(src_RsxX, to_dst_DxK.reshape(-1)), num_devices)
    return _write_rows(dst_RdxX, from_src_DxK.reshape(-1), got)
  for r in range(1, num_devices):
    def move(dst, r=r):
      rows = _read_rows(src_RsxX, send_RxK[r])
      rows = jax.lax.ppermute(rows, AXIS, [(d, (d + r) % num_devices) for d in range(num_devices)])
      return _write_rows(dst, recv_RxK[r], rows)
    dst_RdxX = jax.lax.cond(active_R[r], move, lambda dst: dst, dst_RdxX) if exchange == "ppermute" else \
        move(dst_RdxX)
  return dst_RdxX


def move_rows_transpose_local(d_dst_RdxX, d_src_RsxX, local_src_L, local_dst_L, send_RxK, recv_RxK, active_R,
                              exchange="all_to_all"):
  """Per device: the transpose of `move_rows_local` (which read every row from the original `src`).

  d_dst: gradient of the moved-into array. Returns d_src + the written rows' gradients routed back to
  the rows they were read from. With d_src None they are added to d_dst with the written rows zeroed:
  the case `src` is `dst` (a fill). Only moved rows are touched.
  """
  num_devices = send_RxK.shape[0]
  if exchange == "all_to_all":  # the same rows in one block per peer
    send_RxK, recv_RxK = (t.reshape(1, -1) for t in _by_peer(send_RxK, recv_RxK))
  local_rows = _read_rows(d_dst_RdxX, local_dst_L)
  remote_rows = [_read_rows(d_dst_RdxX, recv) for recv in recv_RxK]
  into = d_src_RsxX
  if into is None:  # src is dst: the overwritten rows' own values were not used
    into = _write_rows(d_dst_RdxX, local_dst_L, jnp.zeros_like(local_rows))
    for recv, rows in zip(recv_RxK, remote_rows):
      into = _write_rows(into, recv, jnp.zeros_like(rows))
  into = _add_rows(into, local_src_L, local_rows)
  if exchange == "all_to_all":  # block j came from device j: send its gradient back, add where read
    return _add_rows(into, send_RxK[0], _a2a(remote_rows[0], num_devices))
  for r in range(1, num_devices):
    def back(into, r=r):  # rows received from d - r go back to it, in the order it sent them
      rows = jax.lax.ppermute(remote_rows[r], AXIS, [(d, (d - r) % num_devices) for d in range(num_devices)])
      return _add_rows(into, send_RxK[r], rows)
    into = jax.lax.cond(active_R[r], back, lambda into: into, into) if exchange == "ppermute" else back(into)
  return into


def check_exchange(exchange: str) -> None:
  if exchange not in EXCHANGES:
    raise ValueError(f"exchange={exchange!r} is not one of {EXCHANGES}")


def apply_moves_transpose(d_dst, d_src, moves: MoveTables, mesh: jax.sharding.Mesh, exchange: str = "all_to_all"):
  """Global transpose of `apply_moves`: pytrees of `[D*rows, ...]` gradients. With `d_src` given
  (e.g. zeros of the source's shape) returns the source's gradient; with None, `src` and `dst` are one
  array (a fill) and the result is that array's gradient."""
  check_exchange(exchange)
  out = d_dst if d_src is None else d_src
  dst_leaves, out_def = jax.tree.leaves(d_dst), jax.tree.structure(out)
  src_leaves = [None] * len(dst_leaves) if d_src is None else jax.tree.leaves(d_src)

  def local(dst_leaves, src_leaves, local_src, local_dst, send, recv, active):
    return [move_rows_transpose_local(g, s, local_src[0], local_dst[0], send[0], recv[0], active, exchange)
            for g, s in zip(dst_leaves, src_leaves)]

  in_specs = ([P(AXIS)] * len(dst_leaves), [None if s is None else P(AXIS) for s in src_leaves],
              P(AXIS), P(AXIS), P(AXIS), P(AXIS), P())
  leaves = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=[P(AXIS)] * len(dst_leaves))(
      dst_leaves, src_leaves, *moves)
  return jax.tree.unflatten(out_def, leaves)


def _zero_rows(dst_RxX, write_K):
  return _write_rows(dst_RxX, write_K, jnp.zeros((write_K.shape[0], *dst_RxX.shape[1:]), dst_RxX.dtype))


def _written_rows(local_dst_L, recv_RxK):
  """The rows a move table writes on this device: its local copies' and the ones it receives."""
  return jnp.concatenate([local_dst_L, recv_RxK.reshape(-1)])


class HoldTables(NamedTuple):
  """Working-slot rows whose gradients wait in the held accumulator, and the held row each waits in, per
  device (-1 = nothing); leading axes may be stacked ([L, ...]). K = the held rows per device (H): at most
  H tenures are alive on one device at once. slot_DxK, held_DxK int32."""
  slot_DxK: jax.Array
  held_DxK: jax.Array


def hold_tables(holds, num_devices: int, held_rows: int) -> HoldTables:
  """Host: (device, slot row, held row) triples -> numpy HoldTables of K = held_rows per device."""
  slot = np.full((num_devices, held_rows), -1, np.int32)
  held = np.full((num_devices, held_rows), -1, np.int32)
  used = np.zeros(num_devices, np.int64)
  for dev, slot_row, held_row in holds:
    if used[dev] >= held_rows or not 0 <= held_row < held_rows:
      raise ValueError(f"device {dev} holds more than held_rows={held_rows} rows")
    slot[dev, used[dev]], held[dev, used[dev]] = slot_row, held_row
    used[dev] += 1
  return HoldTables(slot, held)


def hold_rows(grad, held, holds: HoldTables, mesh: jax.sharding.Mesh):
  """Global, no communication: the working-slot rows `holds` names leave `grad` (`[D*S, ...]`) and are
  added to their rows of `held` (`[D*H, ...]`, H rows per device). Pytrees; returns (grad with those
  rows zeroed, held plus them)."""
  def local(grad, held, slot, held_row):
    out = [(_zero_rows(g, slot[0]), _add_rows(h, held_row[0], _read_rows(g, slot[0])))
           for g, h in zip(jax.tree.leaves(grad), jax.tree.leaves(held))]
    return (jax.tree.unflatten(jax.tree.structure(grad), [g for g, _ in out]),
            jax.tree.unflatten(jax.tree.structure(held), [h for _, h in out]))

  specs = (jax.tree.map(lambda _: P(AXIS), grad), jax.tree.map(lambda _: P(AXIS), held))
  return jax.shard_map(local, mesh=mesh, in_specs=(*specs, P(AXIS), P(AXIS)), out_specs=specs)(
      grad, held, holds.slot_DxK, holds.held_DxK)


def flush_rows(held, d_src, moves: MoveTables, mesh: jax.sharding.Mesh, exchange: str = "all_to_all"):
  """Global: `moves` names, as its written rows, rows of `held` (their tenures' sums, `[D*H, ...]`); they
  go back to the rows they were read from and are added to `d_src` (`apply_moves_transpose` with a
  source), and are zeroed in `held`; several rows read from one source row sum there. Returns
  (d_src, held)."""
  check_exchange(exchange)

  def local(held, d_src, local_src, local_dst, send, recv, active):
    rows = _written_rows(local_dst[0], recv[0])
    back = jax.tree.map(lambda h, s: move_rows_transpose_local(h, s, local_src[0], local_dst[0], send[0], recv[0],
                                                               active, exchange), held, d_src)
    return back, jax.tree.map(lambda h: _zero_rows(h, rows), held)

  specs = (jax.tree.map(lambda _: P(AXIS), d_src), jax.tree.map(lambda _: P(AXIS), held))
  in_specs = (specs[1], specs[0], P(AXIS), P(AXIS), P(AXIS), P(AXIS), P())
  return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=specs)(held, d_src, *moves)


def pad_home(home, mesh: jax.sharding.Mesh, slots: int):
  """Global: pytree of home `[E, ...]` arrays -> `[D*S, ...]`: each device's E/D home rows, then zero rows.
  A base that keeps an expert in its home row then costs one contiguous copy, not a gather and scatter
  of every row (scatters of whole experts are slow on GPU: BENCHMARKS.md)."""
  def local(h):
    return jnp.concatenate([h, jnp.zeros((slots - h.shape[0], *h.shape[1:]), h.dtype)])
  return jax.shard_map(lambda t: jax.tree.map(local, t), mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS))(home)


def unpad_home(padded, mesh: jax.sharding.Mesh, rows_per_device: int):
  """Global inverse of `pad_home`: each device's first E/D rows."""
  return jax.shard_map(lambda t: jax.tree.map(lambda w: w[:rows_per_device], t), mesh=mesh, in_specs=P(AXIS),
                       out_specs=P(AXIS))(padded)


def home_to_base(home, moves: MoveTables, mesh: jax.sharding.Mesh, slots: int, exchange: str = "all_to_all"):
  """Global: home `[E, ...]` arrays -> base `[D*S, ...]` by `home_to_base_moves`' tables."""
  return apply_moves(home, pad_home(home, mesh, slots), moves, mesh, exchange)


def home_to_base_transpose(d_base, moves: MoveTables, mesh: jax.sharding.Mesh, rows_per_device: int,
                           exchange: str = "all_to_all"):
  """Global transpose of `home_to_base`: base gradients -> home gradients. A moved row's source is a home
  row, which is the same row of the padded array: the fill transpose of the padded array, unpadded."""
  return unpad_home(apply_moves_transpose(d_base, None, moves, mesh, exchange), mesh, rows_per_device)


def apply_moves(src, dst, moves: MoveTables, mesh: jax.sharding.Mesh, exchange: str = "all_to_all"):
  """Global: pytrees of `[D*rows, ...]` arrays sharded over "expert"; returns the new `dst`."""
  check_exchange(exchange)

  def local(src, dst, local_src, local_dst, send, recv, active):
    return jax.tree.map(lambda s, t: move_rows_local(s, t, local_src[0], local_dst[0], send[0], recv[0], active,
                                                     exchange), src, dst)

  spec = jax.tree.map(lambda _: P(AXIS), dst)
  in_specs = (spec, spec, P(AXIS), P(AXIS), P(AXIS), P(AXIS), P())
  return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=spec)(src, dst, *moves)
