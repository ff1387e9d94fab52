"""Host-assisted expert transfers: replica rows fetched from a pinned-host copy of the home weights.

The second transfer path of the design (DESIGN.md): every device keeps the home expert weights
`[E, ...]` replicated in host memory (`memory_kind="pinned_host"`), and fills a working slot with
expert e by reading row e over its own host link (PCIe), leaving NVLink to the token all-to-all. The
rows and slots are traced (`HostTables`), so a new placement recompiles nothing.

Mechanism (the first that gathers traced rows from host memory inside jit, on jax 0.10.2 CPU and
0.11.2 GPU): one `dynamic_slice` of the host array per fetched row, then `jax.device_put` of that row to
device memory ("slice"); or the K rows gathered on the host under `compute_on("device_host")`, then one
copy ("gather"). A gather of a host array with device indices, and a whole-array copy to device then a
gather, are not it (the first does not lower, the second moves all E experts).

Gradients: a fetched replica's gradient goes to the home weights' gradient, not to the host copy: the
backward sends the fetched rows' gradients home by `transfer.apply_moves_transpose` (only those rows),
the same as the link path's fill transpose. On CPU host and device memory are the same RAM: the path
computes the right values but is no real host path; `host_copy` logs that, and `HostCopy.real` says so.
"""
from __future__ import annotations

import functools
import inspect
import logging
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from foremoe_jax.mesh import EXPERT_AXIS
from foremoe_jax.transfer import MoveTables, apply_moves_transpose, move_tables

log = logging.getLogger("foremoe_jax")

HOST_KIND = "pinned_host"
MECHANISMS = ("slice", "gather")


class HostCopy(NamedTuple):
  """weights: pytree of replicated `[E, ...]` arrays in `kind` memory; real: whether fetches cross a host
  link (False on CPU, where host memory is device memory, or where the platform has no host kind)."""
  weights: object
  kind: str
  real: bool


class HostTables(NamedTuple):
  """Per device, the rows to fetch (leading axes may be stacked: [L, ...], [M, L, ...]):
  expert_DxK int32: the home expert each fetch reads (-1 = nothing); slot_DxK int32: the working slot
  it writes (-1 = nothing); grad: the same moves as home -> slot `MoveTables`, for the gradient's return."""
  expert_DxK: jax.Array
  slot_DxK: jax.Array
  grad: MoveTables


def host_memory_kind(mesh: jax.sharding.Mesh) -> str | None:
  """HOST_KIND if every device of the mesh has that memory, else None."""
  ok = all(HOST_KIND in [m.kind for m in d.addressable_memories()] for d in mesh.devices.flat)
  return HOST_KIND if ok else None


def host_copy(home, mesh: jax.sharding.Mesh) -> HostCopy:
  """Pytree of home `[E, ...]` arrays -> a replicated pinned-host copy of them (the host path's source).

  Costs E x (one expert) of host memory per device and layer. Without a host memory kind the copy stays
  in device memory (values still right): that is logged and `real` is False."""
  kind = host_memory_kind(mesh)
  platform = mesh.devices.flat[0].platform
  if kind is None:
    log.warning("host transfer path: %s devices have no %r memory; the host copy stays in device memory "
                "(right values, no host link)", platform, HOST_KIND)
    kind = "device"
  real = kind == HOST_KIND and platform != "cpu"
  if not real and kind == HOST_KIND:
    log.warning("host transfer path on %s: %r memory is device memory there; values are right but no "
                "fetch crosses a host link", platform, HOST_KIND)
  sharding = NamedSharding(mesh, P(), memory_kind=kind)
  return HostCopy(jax.device_put(home, sharding), kind, real)


def host_tables(targets, num_devices: int, num_experts: int, capacity: int | None = None) -> HostTables:
  """Host: (device, slot, expert) fetches -> numpy HostTables with K = capacity rows per device (default:
  as many as the busiest device needs, at least 1). Slots are rows of the device's working array."""
  targets = [tuple(int(v) for v in t) for t in targets]
  per_device = np.bincount([t[0] for t in targets], minlength=num_devices)
  need = int(per_device.max(initial=0))
  capacity = capacity or max(1, need)
  if need > capacity:
    raise ValueError(f"a device fetches {need} rows, more than capacity={capacity}")
  if any(not 0 <= e < num_experts or not 0 <= d < num_devices or j < 0 for d, j, e in targets):
    raise ValueError(f"a fetch names a device outside [0, {num_devices}), an expert outside "
                     f"[0, {num_experts}) or a negative slot: {targets}")
  expert = np.full((num_devices, capacity), -1, np.int32)
  slot = np.full((num_devices, capacity), -1, np.int32)
  used = np.zeros(num_devices, np.int64)
  for d, j, e in targets:
    expert[d, used[d]], slot[d, used[d]] = e, j
    used[d] += 1
  per = num_experts // num_devices
  home_moves = [(e // per, e % per, d, j) for d, j, e in targets]
  grad = move_tables(home_moves, num_devices, capacity, local_capacity=capacity)  # fixed shapes: no retrace
  return HostTables(expert, slot, grad)


def _to_device(x):
  """Inside jit: the array in device memory (a host-to-device copy of just this array)."""
  return jax.device_put(x, jax.memory.Space.Device)


def fetch_rows_local(host_ExX, expert_K, mechanism: str = "slice"):
  """Per device: the K rows host[expert[k]] in device memory (zero where expert[k] < 0)."""
  safe_K = jnp.maximum(expert_K, 0)
  if mechanism == "slice":
    rows = jnp.concatenate([_to_device(jax.lax.dynamic_slice_in_dim(host_ExX, safe_K[k], 1))
                            for k in range(expert_K.shape[0])])
  elif mechanism == "gather":
    rows = _to_device(_host_gather(host_ExX, jax.device_put(safe_K, jax.memory.Space.Host)))
  else:
    raise ValueError(f"mechanism={mechanism!r} is not one of {MECHANISMS}")
  keep = (expert_K >= 0).reshape(-1, *[1] * (rows.ndim - 1))
  return jnp.where(keep, rows, jnp.zeros((), rows.dtype))


def _host_gather(host_ExX, expert_K):
  """host[expert] computed on the host, the result left in host memory. compute_on is a context manager
  up to jax 0.10 and a function transform (with the outputs' memory spaces) from 0.11."""
  from jax.experimental.compute_on import compute_on
  if "out_memory_spaces" in inspect.signature(compute_on).parameters:
    return compute_on(lambda h, i: h[i], compute_type="device_host",
                      out_memory_spaces=jax.memory.Space.Host)(host_ExX, expert_K)
  with compute_on("device_host"):
    return host_ExX[expert_K]


def _write(dst_SxX, slot_K, rows):
  target = jnp.where(slot_K >= 0, slot_K, dst_SxX.shape[0])
  return dst_SxX.at[target].set(rows.astype(dst_SxX.dtype), mode="drop")


def fetch_local(host_ExX, dst_SxX, expert_K, slot_K, mechanism: str = "slice"):
  """Per device (inside shard_map): dst with slot[k] overwritten by host[expert[k]]."""
  return _write(dst_SxX, slot_K, fetch_rows_local(host_ExX, expert_K, mechanism))


def _forward(host, dst, tables: HostTables, mesh, mechanism):
  def local(host, dst, expert, slot):
    return jax.tree.map(lambda h, t: fetch_local(h, t, expert[0], slot[0], mechanism), host, dst)
  specs = jax.tree.map(lambda _: P(EXPERT_AXIS), dst)
  in_specs = (jax.tree.map(lambda _: P(), host), specs, P(EXPERT_AXIS), P(EXPERT_AXIS))
  return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=specs)(host, dst, tables.expert_DxK,
                                                                             tables.slot_DxK)


def _zero_written(d_dst, tables: HostTables, mesh):
  def local(d_dst, slot):
    return jax.tree.map(lambda g: _write(g, slot[0], jnp.zeros((slot.shape[1], *g.shape[1:]), g.dtype)), d_dst)
  specs = jax.tree.map(lambda _: P(EXPERT_AXIS), d_dst)
  return jax.shard_map(local, mesh=mesh, in_specs=(specs, P(EXPERT_AXIS)), out_specs=specs)(d_dst, tables.slot_DxK)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def host_fetch(host, home, dst, tables: HostTables, mesh: jax.sharding.Mesh, mechanism: str = "slice"):
  """Global, inside jit: working `[D*S, ...]` arrays `dst` (sharded over "expert") with the tables' slots filled from
  the host copy `host` (`HostCopy.weights`). `home` is the device home `[E, ...]` pytree the host copy
  mirrors: the fetched rows' gradients go to it (the host copy gets none; `dst`'s overwritten rows none)."""
  del home
  return _forward(host, dst, tables, mesh, mechanism)


def _host_fetch_fwd(host, home, dst, tables, mesh, mechanism):
  return _forward(host, dst, tables, mesh, mechanism), (home, tables)


def _host_fetch_bwd(mesh, mechanism, residual, d_out):
  del mechanism
  home, tables = residual
  d_home = apply_moves_transpose(d_out, jax.tree.map(jnp.zeros_like, home), tables.grad, mesh)
  no_tables = jax.tree.map(lambda t: np.zeros(t.shape, jax.dtypes.float0), tables)
  return None, d_home, _zero_written(d_out, tables, mesh), no_tables


host_fetch.defvjp(_host_fetch_fwd, _host_fetch_bwd)
