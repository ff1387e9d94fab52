"""Small helpers shared by the benchmarks (add here; other benchmarks import them).

`expert_mesh(d)`: a (data=1, expert=d) mesh over the first d devices (several EP sizes in one process).
`abstract_model(cfg, mesh)`: the model with shapes and dtypes only (`nnx.eval_shape`; it drops the shardings
the model's `device_put`s give); `with_shardings(tree, like)` puts back those of a same-structure tree.
`memory_stats(compiled)`: `compiled.memory_analysis()` as a dict of bytes (per device for a sharded program).
`shard_bytes(tree)`: bytes one device holds of a tree of arrays / ShapeDtypeStructs with shardings.
"""
from __future__ import annotations

import math

MEMORY_FIELDS = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
                 "generated_code_size_in_bytes")


def expert_mesh(expert: int):
  """Auto axes, as `foremoe_jax.mesh.make_mesh`, but over the first `expert` devices of a larger box."""
  import jax
  from jax.sharding import AxisType

  from foremoe_jax.mesh import AXES
  if expert > jax.device_count():
    raise ValueError(f"EP {expert} needs {expert} devices, JAX sees {jax.device_count()} "
                     "(on CPU: XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  return jax.make_mesh((1, expert), AXES, axis_types=(AxisType.Auto,) * 2, devices=jax.devices()[:expert])


def abstract_model(cfg, mesh):
  from flax import nnx

  from foremoe_jax.model import Model
  return nnx.eval_shape(lambda: Model(cfg, mesh=mesh, rngs=nnx.Rngs(0)))


def with_shardings(tree, like):
  """ShapeDtypeStructs of `tree`'s shapes and dtypes with the shardings of `like`'s leaves (same structure)."""
  import jax
  return jax.tree.map(lambda a, b: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=b.sharding), tree, like)


def memory_stats(compiled) -> dict[str, int]:
  stats = compiled.memory_analysis()
  if stats is None:
    raise RuntimeError("this backend's compiled program has no memory analysis")
  return {name.removesuffix("_size_in_bytes"): int(getattr(stats, name)) for name in MEMORY_FIELDS}


def shard_bytes(tree, shardings=None) -> int:
  """Bytes of one device's shard of every leaf (the largest shard where shards differ in size);
  `shardings`: a matching tree of shardings to use instead of the leaves' own."""
  import jax
  import numpy as np
  leaves = jax.tree.leaves(tree)
  found = [a.sharding for a in leaves] if shardings is None else jax.tree.leaves(shardings)
  if len(found) != len(leaves):
    raise ValueError(f"{len(leaves)} leaves but {len(found)} shardings")
  return sum(math.prod(s.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize for a, s in zip(leaves, found))
