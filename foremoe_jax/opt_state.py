"""Optimizer state laid out like the parameters it tracks.

`jax.jit(tx.init)(params)` leaves the choice of output sharding to XLA, which places the moments (zeros
that do not depend on the parameters' values) replicated: every device would then hold every expert's
Adam moments, (D - 1) / D of them for experts it never updates. Here every subtree of the state shaped
like the parameters (optax's `mu`, `nu`, ...) takes the parameters' shardings; the rest (step counts,
scalars) is replicated.
"""
import jax
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def state_shardings(abstract_state, params, mesh):
  """Shardings for `abstract_state` (a pytree of the optimizer state): params-shaped subtrees as params."""
  params_def = jax.tree.structure(params)
  param_shardings = jax.tree.map(lambda p: p.sharding, params)
  replicated = NamedSharding(mesh, P())

  def like_params(node) -> bool:
    return jax.tree.structure(node) == params_def
  return jax.tree.map(lambda node: param_shardings if like_params(node) else replicated, abstract_state,
                      is_leaf=like_params)


def init_sharded(tx: optax.GradientTransformation, params, mesh):
  """tx.init(params), each moment sharded as its parameter, in one program."""
  abstract = jax.eval_shape(tx.init, params)
  return jax.jit(tx.init, out_shardings=state_shardings(abstract, params, mesh))(params)
