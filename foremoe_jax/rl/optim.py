"""The RL optimizer: AdamW whose moments live in `rl.adam_dtype`, whatever the weights' dtype.

optax's Adam keeps its second moment in the parameters' dtype (only the first has `mu_dtype`): with bf16
weights both moments would be bf16. Here the optimizer sees the parameters and updates cast to the state
dtype, so its moments and arithmetic are in that dtype; `optax.apply_updates` casts the update back to
each weight's dtype.
"""
import jax
import jax.numpy as jnp
import optax


def in_dtype(tx: optax.GradientTransformation, dtype) -> optax.GradientTransformation:
  """`tx` with its state and arithmetic in `dtype` (floating leaves only)."""
  dtype = jnp.dtype(dtype)

  def cast(tree):
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)

  def init(params):
    return tx.init(cast(params))

  def update(updates, state, params=None):
    return tx.update(cast(updates), state, None if params is None else cast(params))
  return optax.GradientTransformation(init, update)


def rl_optimizer(lr: float, adam_dtype: str) -> optax.GradientTransformation:
  """Global-norm clipping of the (float32) gradients, then AdamW (no weight decay) in `adam_dtype`."""
  return optax.chain(optax.clip_by_global_norm(1.0),
                     in_dtype(optax.adamw(lr, b2=0.98, weight_decay=0.0), adam_dtype))
