"""Device meshes with axes ("data", "expert") and the batch sharding every part of the model shares."""
import math

import jax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"
EXPERT_AXIS = "expert"  # expert parallelism: expert weights [E, ...] and the token exchange live on it
AXES = (DATA_AXIS, EXPERT_AXIS)


def make_mesh(data: int, expert: int) -> jax.sharding.Mesh:
  """A (data, expert) mesh with Auto axes (XLA propagates shardings through the plain-jnp parts)."""
  if data < 1 or expert < 1:
    raise ValueError(f"mesh axes must be >= 1, got data={data}, expert={expert}")
  available = jax.device_count()
  if data * expert != available:  # mesh sizes are global: every process contributes its local devices
    raise ValueError(f"mesh data={data} x expert={expert} = {data * expert} devices, but JAX sees {available} = "
                     f"{jax.process_count()} processes x {jax.local_device_count()} local devices "
                     f"({jax.devices()[0].platform}); on CPU give each process {data * expert} / processes devices "
                     "(XLA_FLAGS=--xla_force_host_platform_device_count, or FOREMOE_CPU_DEVICES for train.py)")
  return jax.make_mesh((data, expert), AXES, axis_types=(AxisType.Auto,) * 2)


def batch_axes(mesh: jax.sharding.Mesh) -> tuple[str, ...]:
  """The mesh axes tokens are split over: both of ours, in the mesh's order."""
  return tuple(a for a in mesh.axis_names if a in AXES)


def batch_spec(mesh: jax.sharding.Mesh) -> P:
  """Leading (batch) axis sharded over every batch axis of the mesh."""
  return P(batch_axes(mesh))


def expert_devices(mesh: jax.sharding.Mesh) -> int | None:
  """D, the size of the expert axis; None for a mesh without one."""
  return mesh.shape[EXPERT_AXIS] if EXPERT_AXIS in mesh.axis_names else None


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, batch_spec(mesh))


def batch_shards(mesh: jax.sharding.Mesh) -> int:
  """Devices the batch is split over: a global batch must be a multiple of this."""
  return math.prod(mesh.shape[a] for a in batch_axes(mesh))
