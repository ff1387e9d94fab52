"""Pytree helpers the executor and trainer share: abstract shapes, float32 accumulators, placement."""
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def abstract(tree):
  """Shape, dtype and sharding of each leaf: what a program is lowered for."""
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)


def _acc_dtype(dtype):
  return jnp.promote_types(dtype, jnp.float32) if jnp.issubdtype(dtype, jnp.floating) else dtype


def accumulators(tree):
  """Zeros like `tree`, float32 (or wider) for floating leaves: micro-step gradients of bf16 weights
  summed in bf16 would lose bits with every micro-step, and differently per placement."""
  return jax.tree.map(lambda a: jnp.zeros_like(a, dtype=_acc_dtype(a.dtype)), tree)


def accumulators_abstract(tree):
  """`abstract` of `accumulators(tree)`."""
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, _acc_dtype(a.dtype), sharding=a.sharding), tree)


def index(tree, i):
  return jax.tree.map(lambda a: a[i], tree)


def add(acc, grads):
  return jax.tree.map(lambda a, g: a + g, acc, grads)


def constrain(tree, like):
  """`tree` constrained to the shardings of `like`'s leaves (same structure)."""
  return jax.lax.with_sharding_constraint(tree, jax.tree.map(lambda a: a.sharding, like))


def copy(tree):
  """Fresh buffers with the same shardings: state to keep while the original is donated to a step."""
  return jax.tree.map(lambda a: a.copy(), tree)


def replicate_unsharded(tree, mesh):
  """Puts leaves that live on fewer devices than the mesh (e.g. optimizer step counts) on all of it,
  so a restored or freshly initialized state mixes with mesh-sharded parameters in one jit."""
  devices = set(mesh.devices.flat)

  def place(x):
    if set(x.sharding.device_set) == devices:
      return x
    return jax.device_put(x, NamedSharding(mesh, P()))
  return jax.tree.map(place, tree)
