"""Working expert slots from home-layout weights.

Home weights are `[E, ...]` sharded over "expert" (device d holds experts d*E/D ... (d+1)*E/D - 1).
The working layout is `[D*S, ...]` sharded over "expert": slot j of device d holds expert
`slot_expert[d*S + j]`. Everything is differentiable: the transpose of the gather is a scatter-add and
the transpose of the all-gather a reduce-scatter, so replica gradients are summed into the home layout.
"""
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from foremoe_jax.dispatch import AXIS
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
