"""GRPO: group-normalized advantages, per-token log-probs and the clipped token-level loss.

Alignment: every `[B, T]` array lines up with the logits `[B, T, V]`. Position t holds the log-prob of
`tokens[b, t + 1]` given `tokens[b, :t + 1]` (the last column is 0), and `mask[b, t] == 1` trains that
prediction (`chunked_token_logprobs`: the same from the final hidden states and the LM head, without the
[B, T, V] logits). `task.encode_sft` builds masks with this convention; for rollouts the mask is 1 on the
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
  next_BxT = _next_tokens(tokens_BxT)
  picked_BxT = jnp.take_along_axis(logits_BxTxV, next_BxT[..., None], axis=-1)[..., 0]
  return _unpredicted_to_zero(picked_BxT - jax.nn.logsumexp(logits_BxTxV, axis=-1), segment_ids_BxT)


def chunked_token_logprobs(h_BxTxH: jax.Array, lm_head_HxV: jax.Array, tokens_BxT: jax.Array,
                           segment_ids_BxT: jax.Array | None = None, *, chunk: int) -> jax.Array:
  """`token_logprobs(h @ lm_head, tokens, segment_ids)` without the [B, T, V] logits: `chunk` columns at a
  time (float32 logits of one chunk, matmul in h's dtype as the model's head), and a backward that
  recomputes each chunk's logits and accumulates the LM head's gradient in float32. Largest buffers:
  a few [B, chunk, V] float32. T need not divide by `chunk` (the tail chunk is padded)."""
  if not isinstance(chunk, int) or chunk < 1:
    raise ValueError(f"chunked_token_logprobs: chunk must be a positive int, got {chunk!r}")
  b, t, h = h_BxTxH.shape
  if lm_head_HxV.ndim != 2 or lm_head_HxV.shape[0] != h or tokens_BxT.shape != (b, t):
    raise ValueError(f"chunked_token_logprobs: h {h_BxTxH.shape}, lm_head {lm_head_HxV.shape}, tokens "
                     f"{tokens_BxT.shape} are not [B, T, H], [H, V], [B, T]")
  c = min(chunk, t)
  pad = -t % c
  h_NxBxCxH = jnp.pad(h_BxTxH, ((0, 0), (0, pad), (0, 0))).reshape(b, -1, c, h).swapaxes(0, 1)
  next_NxBxC = jnp.pad(_next_tokens(tokens_BxT), ((0, 0), (0, pad))).reshape(b, -1, c).swapaxes(0, 1)
  logp_BxT = _chunked_logp(h_NxBxCxH, lm_head_HxV, next_NxBxC).swapaxes(0, 1).reshape(b, t + pad)[:, :t]
  return _unpredicted_to_zero(logp_BxT, segment_ids_BxT)


def _next_tokens(tokens_BxT):
  return jnp.concatenate([tokens_BxT[:, 1:], jnp.zeros_like(tokens_BxT[:, :1])], axis=1).astype(jnp.int32)


def _unpredicted_to_zero(logp_BxT, segment_ids_BxT):
  """0 in the last column and, with segments, where t+1 leaves t's segment and on padding (segment 0)."""
  logp_BxT = logp_BxT.at[:, -1].set(0.0)
  if segment_ids_BxT is None:
    return logp_BxT
  same_BxT = jnp.concatenate([segment_ids_BxT[:, 1:] == segment_ids_BxT[:, :-1],
                              jnp.zeros_like(segment_ids_BxT[:, :1], bool)], axis=1)
  return jnp.where(same_BxT & (segment_ids_BxT > 0), logp_BxT, 0.0)


def _chunk_logits(h_BxCxH, w_HxV):
  return jnp.einsum("bch,hv->bcv", h_BxCxH, w_HxV.astype(h_BxCxH.dtype), preferred_element_type=jnp.float32)


@jax.custom_vjp
def _chunked_logp(h_NxBxCxH, w_HxV, next_NxBxC):
  """[N, B, C]: log-softmax of chunk n's logits at the next token."""
  def one(args):
    h_BxCxH, next_BxC = args
    logits_BxCxV = _chunk_logits(h_BxCxH, w_HxV)
    picked_BxC = jnp.take_along_axis(logits_BxCxV, next_BxC[..., None], axis=-1)[..., 0]
    return picked_BxC - jax.nn.logsumexp(logits_BxCxV, axis=-1)
  return jax.lax.map(one, (h_NxBxCxH, next_NxBxC))


def _chunked_logp_fwd(h_NxBxCxH, w_HxV, next_NxBxC):
  return _chunked_logp(h_NxBxCxH, w_HxV, next_NxBxC), (h_NxBxCxH, w_HxV, next_NxBxC)


def _chunked_logp_bwd(res, g_NxBxC):
  """d logp / d logits = onehot(next) - softmax(logits), recomputed per chunk."""
  h_NxBxCxH, w_HxV, next_NxBxC = res
  dt = h_NxBxCxH.dtype

  def one(dw_HxV, args):
    h_BxCxH, next_BxC, g_BxC = args
    logits_BxCxV = _chunk_logits(h_BxCxH, w_HxV)
    onehot_BxCxV = jax.nn.one_hot(next_BxC, w_HxV.shape[1], dtype=jnp.float32)
    d_BxCxV = (g_BxC[..., None] * (onehot_BxCxV - jax.nn.softmax(logits_BxCxV, axis=-1))).astype(dt)
    dh_BxCxH = jnp.einsum("bcv,hv->bch", d_BxCxV, w_HxV.astype(dt), preferred_element_type=jnp.float32)
    dw_HxV = dw_HxV + jnp.einsum("bch,bcv->hv", h_BxCxH, d_BxCxV, preferred_element_type=jnp.float32)
    return dw_HxV, dh_BxCxH.astype(dt)

  dw_HxV, dh_NxBxCxH = jax.lax.scan(one, jnp.zeros_like(w_HxV, jnp.float32), (h_NxBxCxH, next_NxBxC, g_NxBxC))
  return dh_NxBxCxH, dw_HxV.astype(w_HxV.dtype), None


_chunked_logp.defvjp(_chunked_logp_fwd, _chunked_logp_bwd)


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
