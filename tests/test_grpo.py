"""GRPO advantages, token log-probs and the clipped loss, on hand-computed cases and micro-step sums."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from foremoe_jax.rl import grpo


def test_group_advantages_hand_computed():
  adv = grpo.group_advantages(jnp.array([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 2.0, 1.0]), 4)
  # Group 1: mean 0.5, std 0.5. Group 2: all equal -> 0. Group 3: mean 1, std sqrt(1/2).
  s = np.sqrt(0.5)
  want = [1, -1, -1, 1, 0, 0, 0, 0, -1 / s, 0, 1 / s, 0]
  np.testing.assert_allclose(adv, want, rtol=1e-5, atol=1e-6)
  assert adv.dtype == jnp.float32


def test_group_advantages_bad_shape():
  with pytest.raises(ValueError, match="divisible by group_size=4"):
    grpo.group_advantages(jnp.zeros(6), 4)


def test_token_logprobs_matches_naive_and_is_stable():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
  tokens = rng.integers(0, 7, size=(2, 5)).astype(np.int32)
  logp = grpo.token_logprobs(jnp.asarray(logits), jnp.asarray(tokens))
  log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  want = np.zeros((2, 5), np.float32)
  for b in range(2):
    for t in range(4):
      want[b, t] = log_softmax[b, t, tokens[b, t + 1]]
  np.testing.assert_allclose(logp, want, rtol=1e-5, atol=1e-6)
  # A huge offset changes nothing, and bf16 logits still give f32 log-probs.
  big = grpo.token_logprobs(jnp.asarray(logits + 1e4), jnp.asarray(tokens))
  np.testing.assert_allclose(big, want, atol=2e-3)
  assert grpo.token_logprobs(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(tokens)).dtype == jnp.float32


def _hand_case():
  # Ratios (new/old): row 0 (A=+1): 1.5 (clipped to 1.2), 0.5; row 1 (A=-1): 1.1, 0.5 (clipped to 0.8).
  ratios = np.array([[1.5, 0.5], [1.1, 0.5]])
  logp_old = jnp.array([[-1.0, -2.0], [-0.5, -3.0]])
  return logp_old + jnp.log(ratios), logp_old, jnp.array([1.0, -1.0]), ratios


def test_grpo_loss_hand_computed_all_tokens():
  logp_new, logp_old, adv, ratios = _hand_case()
  loss, m = grpo.grpo_loss(logp_new, logp_old, adv, jnp.ones((2, 2)))
  np.testing.assert_allclose(loss, (-1.2 - 0.5 + 1.1 + 0.8) / 4, rtol=1e-5)
  np.testing.assert_allclose(m["clip_frac"], 0.5, rtol=1e-6)
  np.testing.assert_allclose(m["ratio_mean"], ratios.mean(), rtol=1e-5)
  np.testing.assert_allclose(m["approx_kl"], np.mean(ratios - 1 - np.log(ratios)), rtol=1e-5)
  assert "kl_ref" not in m


def test_grpo_loss_hand_computed_mask_and_gradient():
  logp_new, logp_old, adv, _ = _hand_case()
  mask = jnp.array([[1, 1], [1, 0]])
  # Garbage on the masked-out token must not leak (exp(200) would be inf).
  logp_new = logp_new.at[1, 1].set(-100.0)
  logp_ref = jnp.zeros((2, 2)).at[1, 1].set(100.0)
  loss_fn = functools.partial(grpo.grpo_loss, logp_old_BxT=logp_old, advantages_B=adv, mask_BxT=mask)
  loss, _ = loss_fn(logp_new)
  np.testing.assert_allclose(loss, (-1.2 - 0.5 + 1.1) / 3, rtol=1e-5)
  grad = jax.grad(lambda x: loss_fn(x, kl_coef=0.0, logp_ref_BxT=logp_ref)[0])(logp_new)
  # d/dlogp of -ratio*A is -ratio*A; the clipped token and the masked one get no gradient.
  np.testing.assert_allclose(grad, [[0.0, -0.5 / 3], [1.1 / 3, 0.0]], rtol=1e-5, atol=1e-7)


def test_grpo_loss_kl_term():
  logp_new, logp_old, adv, _ = _hand_case()
  d = np.log(2.0)  # logp_ref - logp_new on every token: k3 = 2 - log 2 - 1.
  base, _ = grpo.grpo_loss(logp_new, logp_old, adv, jnp.ones((2, 2)))
  loss, m = grpo.grpo_loss(logp_new, logp_old, adv, jnp.ones((2, 2)), kl_coef=0.1, logp_ref_BxT=logp_new + d)
  np.testing.assert_allclose(m["kl_ref"], 1 - d, rtol=1e-5)
  np.testing.assert_allclose(loss, base + 0.1 * (1 - d), rtol=1e-5)
  with pytest.raises(ValueError, match="needs logp_ref"):
    grpo.grpo_loss(logp_new, logp_old, adv, jnp.ones((2, 2)), kl_coef=0.1)


def test_micro_step_losses_and_grads_sum_to_full_batch():
  rng = np.random.default_rng(1)
  B, T, V, M = 8, 6, 11, 3
  logits = jnp.asarray(rng.normal(size=(B, T, V)), jnp.float32)
  tokens = jnp.asarray(rng.integers(0, V, size=(B, T)), jnp.int32)
  mask = jnp.asarray(rng.random((B, T)) < 0.6, jnp.int32).at[:, -1].set(0)
  logp_old = grpo.token_logprobs(logits, tokens) + jnp.asarray(rng.normal(scale=0.3, size=(B, T)), jnp.float32)
  logp_ref = logp_old - 0.1
  adv = grpo.group_advantages(jnp.asarray(rng.integers(0, 2, size=B), jnp.float32), 4)
  micro_B = jnp.asarray([0, 2, 1, 1, 0, 2, 2, 1])  # Uneven, non-contiguous micro-steps (as packing makes).

  @jax.jit
  @functools.partial(jax.value_and_grad, has_aux=True)
  def loss_fn(logits, mask, total):
    return grpo.grpo_loss(grpo.token_logprobs(logits, tokens), logp_old, adv, mask, clip_eps=0.2,
                          kl_coef=0.05, logp_ref_BxT=logp_ref, num_tokens_total=total)

  total = mask.sum()
  (full, full_m), full_g = loss_fn(logits, mask, total)
  steps = [loss_fn(logits, mask * (micro_B == m)[:, None], total) for m in range(M)]
  np.testing.assert_allclose(sum(loss for (loss, _), _ in steps), full, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(sum(g for _, g in steps), full_g, rtol=1e-5, atol=1e-7)
  for k in full_m:
    np.testing.assert_allclose(sum(m[k] for (_, m), _ in steps), full_m[k], rtol=1e-5, atol=1e-7)
  # Unlike the token-level sum, a mean per micro-step would not add up.
  local = [loss_fn(logits, mask * (micro_B == m)[:, None], (mask * (micro_B == m)[:, None]).sum())[0][0]
           for m in range(M)]
  assert not np.isclose(sum(local), full)
