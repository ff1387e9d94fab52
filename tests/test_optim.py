"""The RL optimizer keeps Adam's moments in rl.adam_dtype and matches plain AdamW where dtypes agree."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from foremoe_jax.rl.optim import rl_optimizer


def test_bf16_weights_get_float32_moments_and_float32_weights_match_adamw():
  params = {"w": jnp.linspace(-1, 1, 12, dtype=jnp.bfloat16).reshape(3, 4)}
  grads = {"w": jnp.full((3, 4), 0.5, jnp.float32)}
  tx = rl_optimizer(1e-2, "float32")
  state = tx.init(params)
  assert {x.dtype for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)} == {jnp.dtype("float32")}
  updates, _ = tx.update(grads, state, params)
  assert optax.apply_updates(params, updates)["w"].dtype == jnp.bfloat16

  p32 = jax.tree.map(lambda x: x.astype(jnp.float32), params)
  reference = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, b2=0.98, weight_decay=0.0))
  ours, _ = rl_optimizer(1e-2, "float32").update(grads, rl_optimizer(1e-2, "float32").init(p32), p32)
  theirs, _ = reference.update(grads, reference.init(p32), p32)
  np.testing.assert_allclose(ours["w"], theirs["w"], rtol=1e-6)
