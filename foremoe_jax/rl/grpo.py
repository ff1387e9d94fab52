"""GRPO: group-normalized advantages, per-token log-probs and the clipped token-level loss.

Alignment: every `[B, T]` array lines up with the logits `[B, T, V]`. Position t holds the log-prob of
`tokens[b, t + 1]` given `tokens[b, :t + 1]` (the last column is 0), and `mask[b, t] == 1` trains that
prediction. `task.encode_sft` builds masks with this convention; for rollouts the mask is 1 on the
positions that predict generated tokens (EOS included). Packed rows (several sequences per row,
`segment_ids` [B, T], 0 = padding) predict nothing across a boundary: position t is 0 where
`tokens[b, t + 1]` starts another segment (the mask is 0 there too: `microbatch` checks it).

Aggregation is token-level: the loss is the sum over masked tokens divided by `num_tokens_total`, the
number of masked tokens in the whole mini-batch. Passing the same `num_tokens_total` to every micro-step
makes the micro-step losses (and gradients) sum exactly to the loss of the full mini-batch, however the
sequences are packed. Metrics are normalized the same way, so they also sum to the mini-batch value.
"""

import jax
import jax.numpy as jnp


def group_advantages(rewards_B: jax.Array, group_size: int, eps: float = 1e-6) -> jax.Array:
  """(r - mean_group) / (std_group + eps), f32 [B]; the G samples of a prompt are contiguous.

  std is the population std (ddof=0); a group whose rewards are all equal gets advantage 0.
  """
  if rewards_B.ndim != 1 or rewards_B.shape[0] % group_size:
    raise ValueError(f"group_advantages: rewards must be [B] with B divisible by group_size={group_size}, "
                     f"got shape {rewards_B.shape}")
  r_PxG = rewards_B.astype(jnp.float32).reshape(-1, group_size)
  adv_PxG = (r_PxG - r_PxG.mean(axis=1, keepdims=True)) / (r_PxG.std(axis=1, keepdims=True) + eps)
  return adv_PxG.reshape(-1)


def token_logprobs(logits_BxTxV: jax.Array, tokens_BxT: jax.Array, segment_ids_BxT: jax.Array | None = None
                   ) -> jax.Array:
  """f32 [B, T]: log p(tokens[b, t+1] | tokens[b, :t+1]) at position t; 0 in the last column and, with
  `segment_ids_BxT`, wherever t+1 is not in t's segment (and on padding)."""
  logits_BxTxV = logits_BxTxV.astype(jnp.float32)
  next_BxT = jnp.concatenate([tokens_BxT[:, 1:], jnp.zeros_like(tokens_BxT[:, :1])], axis=1)
  picked_BxT = jnp.take_along_axis(logits_BxTxV, next_BxT[..., None].astype(jnp.int32), axis=-1)[..., 0]
  logp_BxT = picked_BxT - jax.nn.logsumexp(logits_BxTxV, axis=-1)
  logp_BxT = logp_BxT.at[:, -1].set(0.0)
  if segment_ids_BxT is None:
    return logp_BxT
  same_BxT = jnp.concatenate([segment_ids_BxT[:, 1:] == segment_ids_BxT[:, :-1],
                              jnp.zeros_like(segment_ids_BxT[:, :1], bool)], axis=1)
  return jnp.where(same_BxT & (segment_ids_BxT > 0), logp_BxT, 0.0)


def grpo_loss(logp_new_BxT: jax.Array, logp_old_BxT: jax.Array, advantages_B: jax.Array, mask_BxT: jax.Array,
              clip_eps: float = 0.2, kl_coef: float = 0.0, logp_ref_BxT: jax.Array | None = None,
              num_tokens_total: jax.Array | int | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """PPO-clipped policy loss with optional k3 KL to a reference policy -> (scalar loss, metrics).

  `advantages_B`: one per row [B], or per token [B, T] (packed rows hold several sequences).
  per token: -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) + kl_coef * k3(ref, new), with
  ratio = exp(logp_new - logp_old) and k3(ref, new) = exp(ref - new) - (ref - new) - 1 (>= 0, unbiased
  for KL(new || ref) under samples of the policy). `num_tokens_total=None` uses this call's mask sum.
  Metrics: `clip_frac` (tokens where the clipped branch is taken), `approx_kl` (k3 of new vs old),
  `ratio_mean`, and with a reference `kl_ref`.
  """
  if logp_ref_BxT is None and isinstance(kl_coef, (int, float)) and kl_coef:
    raise ValueError("grpo_loss: kl_coef > 0 needs logp_ref_BxT")
  sg = jax.lax.stop_gradient
  valid_BxT = mask_BxT.astype(bool)
  mask_BxT = mask_BxT.astype(jnp.float32)
  denom = jnp.sum(mask_BxT) if num_tokens_total is None else jnp.asarray(num_tokens_total, jnp.float32)
  denom = jnp.maximum(denom, 1.0)

  def token_sum(x_BxT):
    return jnp.sum(x_BxT * mask_BxT) / denom

  adv = sg(advantages_B.astype(jnp.float32))
  adv_BxT = adv if adv.ndim == 2 else adv[:, None]  # per token, or per row broadcast over T
  # Zeroed outside the mask before exp, so padding can't make inf * 0 = NaN in values or gradients.
  log_ratio_BxT = jnp.where(valid_BxT, logp_new_BxT.astype(jnp.float32)
                            - sg(logp_old_BxT.astype(jnp.float32)), 0.0)
  ratio_BxT = jnp.exp(log_ratio_BxT)
  unclipped_BxT = -ratio_BxT * adv_BxT
  clipped_BxT = -jnp.clip(ratio_BxT, 1.0 - clip_eps, 1.0 + clip_eps) * adv_BxT
  per_token_BxT = jnp.maximum(unclipped_BxT, clipped_BxT)
  metrics = {
      "clip_frac": token_sum(sg((clipped_BxT > unclipped_BxT).astype(jnp.float32))),
      "approx_kl": token_sum(sg(ratio_BxT - 1.0 - log_ratio_BxT)),
      "ratio_mean": token_sum(sg(ratio_BxT)),
  }
  if logp_ref_BxT is not None:
    ref_minus_new_BxT = jnp.where(valid_BxT, sg(logp_ref_BxT.astype(jnp.float32)) - logp_new_BxT.astype(jnp.float32),
                                  0.0)
    kl_BxT = jnp.exp(ref_minus_new_BxT) - ref_minus_new_BxT - 1.0
    per_token_BxT = per_token_BxT + kl_coef * kl_BxT
    metrics["kl_ref"] = token_sum(sg(kl_BxT))
  return token_sum(per_token_BxT), metrics
