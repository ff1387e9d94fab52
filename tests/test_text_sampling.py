"""Sampling over a real-size vocabulary: top-p = 1 skips the sorting filter and draws from the whole
distribution; top-p < 1 still filters."""
import jax
import jax.numpy as jnp
import numpy as np

from foremoe_jax.rl.rollout import sample, top_p_filter


def test_top_p_one_draws_from_all_logits_and_below_one_filters():
  logits_BxV = jax.random.normal(jax.random.key(0), (4, 151669)) * 3.0
  key = jax.random.key(1)
  token_B, logp_B = jax.jit(sample)(key, logits_BxV, 0.7, 1.0)
  np.testing.assert_array_equal(token_B, jax.random.categorical(key, logits_BxV / 0.7, axis=-1))
  want_B = jnp.take_along_axis(jax.nn.log_softmax(logits_BxV, -1), token_B[:, None], -1)[:, 0]
  np.testing.assert_allclose(logp_B, want_B, rtol=1e-6)
  small_BxV = jnp.array([[3.0, 2.0, 0.0, -1.0]] * 64)
  keys = jax.random.split(jax.random.key(2), 64)
  drawn = jax.vmap(lambda k, x: sample(k, x[None], 1.0, 0.6)[0][0])(keys, small_BxV)
  kept = np.isfinite(np.asarray(top_p_filter(small_BxV[:1], 0.6)))[0]
  assert kept.tolist() == [True, False, False, False] and set(np.asarray(drawn).tolist()) == {0}
