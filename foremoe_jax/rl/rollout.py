"""Batched sampling with the KV cache and route capture, one jitted program (no per-token host trips).

Layout: prompts are `BOS prompt PAD...` right-padded to P with per-row lengths; each is repeated
`group_size` times (copies adjacent). Row b generates at positions len_b, len_b + 1, ... until EOS or
`max_new_tokens`; the output arrays are `[B, T]` with T = P + max_new_tokens. EOS and PAD are the
tokenizer's (`eos_id`, `pad_id`; the character tokenizer's by default); each row stops at its own EOS
and the loop ends when every row has.

- `routes[b, t]`: the experts of position t as computed when it was processed (prompt tokens by the
  prefill, generated tokens by their decode step). Positions past the end hold padding's routes or
  `0..k-1`; they are masked out.
- `completion_mask[b, t] == 1` where position t predicts a generated token (EOS included), the
  convention of `rl/task.py` and `rl/grpo.py`.
- `logprobs[b, t]`: log p(tokens[b, t+1]) under the model's own distribution (temperature 1, no top-p),
  i.e. what `grpo.token_logprobs` gives on a forward pass with the routes replayed; temperature and
  top-p only shape which token is drawn. 0 outside the mask.
"""
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from foremoe_jax.mesh import batch_sharding, batch_shards
from foremoe_jax.rl.task import EOS, PAD


class Rollout(NamedTuple):
  tokens: jax.Array  # int32 [B, T] prompt + completion, right-padded with PAD
  routes: jax.Array  # int32 [B, T, L_moe, k]
  completion_mask: jax.Array  # int32 [B, T]
  logprobs: jax.Array  # float32 [B, T]
  lengths: jax.Array  # int32 [B] prompt + completion tokens
  prompt_lengths: jax.Array  # int32 [B]


def top_p_filter(logits_BxV: jax.Array, top_p) -> jax.Array:
  """Keeps the smallest set of most likely tokens whose mass reaches top_p (always the top one)."""
  sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
  probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
  mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
  keep_BxV = mass_before_BxV < top_p
  threshold_Bx1 = jnp.min(jnp.where(keep_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits_BxV >= threshold_Bx1, logits_BxV, -jnp.inf)


def sample(key, logits_BxV: jax.Array, temperature, top_p) -> tuple[jax.Array, jax.Array]:
  """-> (token_B, logprob_B under the untempered distribution). temperature == 0 is greedy."""
  logits_BxV = logits_BxV.astype(jnp.float32)
  scaled_BxV = logits_BxV / jnp.maximum(temperature, 1e-6)
  # The filter sorts the vocabulary per row, which costs more than the draw itself on CPU: skip it at 1.
  scaled_BxV = jax.lax.cond(top_p < 1.0, lambda z: top_p_filter(z, top_p), lambda z: z, scaled_BxV)
  drawn_B = jax.random.categorical(key, scaled_BxV, axis=-1)
  token_B = jnp.where(temperature > 0, drawn_B, jnp.argmax(logits_BxV, axis=-1)).astype(jnp.int32)
  logp_BxV = jax.nn.log_softmax(logits_BxV, axis=-1)
  return token_B, jnp.take_along_axis(logp_BxV, token_B[:, None], axis=-1)[:, 0]


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "eos_id", "pad_id"))
def _rollout(graphdef, state, prompts_BxP, prompt_lens_B, key, temperature, top_p, *, max_new_tokens, eos_id,
             pad_id):
  model = nnx.merge(graphdef, state)
  b, p = prompts_BxP.shape
  t = p + max_new_tokens
  rows_B = jnp.arange(b)
  cache = model.init_cache(b, t)
  out, cache = model.prefill(prompts_BxP, cache, capacity=model.no_drop_capacity(b, p))
  cap1 = model.no_drop_capacity(b, 1)
  num_moe, k = out.routes.shape[2:]
  tokens_BxT = jnp.pad(prompts_BxP, ((0, 0), (0, max_new_tokens)), constant_values=pad_id)
  filler = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), (b, max_new_tokens, num_moe, k))
  routes_BxTxLxK = jnp.concatenate([out.routes, filler], axis=1)
  key, sub = jax.random.split(key)
  next_B, next_lp_B = sample(sub, out.logits[rows_B, prompt_lens_B - 1], temperature, top_p)
  carry = dict(i=jnp.int32(0), key=key, cache=cache, tokens=tokens_BxT, routes=routes_BxTxLxK,
               logprobs=jnp.zeros((b, t), jnp.float32), mask=jnp.zeros((b, t), jnp.int32),
               done=jnp.zeros((b,), bool), next=next_B, next_lp=next_lp_B)

  def step(c):
    # Place the drawn token at pos, then process it (routes of pos, logits for pos + 1).
    pos_B = prompt_lens_B + c["i"]
    active_B = ~c["done"]
    tokens = c["tokens"].at[rows_B, pos_B].set(jnp.where(active_B, c["next"], c["tokens"][rows_B, pos_B]))
    logprobs = c["logprobs"].at[rows_B, pos_B - 1].set(jnp.where(active_B, c["next_lp"], 0.0))
    mask = c["mask"].at[rows_B, pos_B - 1].set(active_B.astype(jnp.int32))
    logits_Bx1xV, routes_Bx1xLxK, cache = model.decode(c["next"][:, None], c["cache"], pos_B, capacity=cap1)
    old_BxLxK = c["routes"][rows_B, pos_B]
    routes = c["routes"].at[rows_B, pos_B].set(jnp.where(active_B[:, None, None], routes_Bx1xLxK[:, 0], old_BxLxK))
    key, sub = jax.random.split(c["key"])
    next_B, next_lp_B = sample(sub, logits_Bx1xV[:, 0], temperature, top_p)
    return dict(i=c["i"] + 1, key=key, cache=cache, tokens=tokens, routes=routes, logprobs=logprobs, mask=mask,
                done=c["done"] | (c["next"] == eos_id), next=next_B, next_lp=next_lp_B)

  def cond(c):
    return (c["i"] < max_new_tokens) & ~jnp.all(c["done"])

  c = jax.lax.while_loop(cond, step, carry)
  lengths_B = prompt_lens_B + c["mask"].sum(axis=1)
  return Rollout(c["tokens"], c["routes"], c["mask"], c["logprobs"], lengths_B, prompt_lens_B)


def rollout(model, prompts_NxP, prompt_lens_N, key, *, max_new_tokens: int, group_size: int = 1,
            temperature: float = 1.0, top_p: float = 1.0, eos_id: int = EOS, pad_id: int = PAD) -> Rollout:
  """Samples `group_size` completions per prompt (copies adjacent): B = N * group_size rows.

  `prompts_NxP`: int32 `BOS prompt` right-padded with PAD (see `task.encode_prompts`); `prompt_lens_N`
  includes BOS. Temperature and top-p are traced: changing them does not recompile.
  """
  eos_id, pad_id = int(eos_id), int(pad_id)
  prompts_NxP = np.asarray(prompts_NxP, np.int32)
  prompt_lens_N = np.asarray(prompt_lens_N, np.int32)
  n, p = prompts_NxP.shape
  b = n * group_size
  if prompt_lens_N.shape != (n,) or prompt_lens_N.min() < 1 or prompt_lens_N.max() > p:
    raise ValueError(f"prompt_lens must be [N] = [{n}] with values in [1, {p}]")
  if b % batch_shards(model.mesh):
    raise ValueError(f"rollout batch N * group_size = {b} is not divisible by the {batch_shards(model.mesh)} "
                     "devices of the batch axes")
  if p + max_new_tokens > model.cfg.max_seq_len:
    raise ValueError(f"prompt length {p} + max_new_tokens {max_new_tokens} > max_seq_len={model.cfg.max_seq_len}")
  if not 0.0 < top_p <= 1.0 or temperature < 0:
    raise ValueError(f"need 0 < top_p <= 1 and temperature >= 0, got top_p={top_p}, temperature={temperature}")
  sharding = batch_sharding(model.mesh)
  prompts_BxP = jax.device_put(np.repeat(prompts_NxP, group_size, axis=0), sharding)
  lens_B = jax.device_put(np.repeat(prompt_lens_N, group_size), sharding)
  graphdef, state = nnx.split(model)
  return _rollout(graphdef, state, prompts_BxP, lens_B, key, jnp.float32(temperature), jnp.float32(top_p),
                  max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id)


def length_stats(tokens_BxT, lengths_B, prompt_lengths_B, *, eos_id: int, max_new_tokens: int) -> dict:
  """Response lengths (generated tokens, EOS included): mean, max, and the share of rows clipped at
  `max_new_tokens` without an EOS (host arrays)."""
  tokens_BxT, lengths_B = np.asarray(tokens_BxT), np.asarray(lengths_B)
  new_B = lengths_B - np.asarray(prompt_lengths_B)
  last_B = tokens_BxT[np.arange(len(lengths_B)), np.maximum(lengths_B - 1, 0)]
  clipped_B = (new_B >= max_new_tokens) & (last_B != eos_id)
  return {"mean": float(new_B.mean()), "max": int(new_B.max()), "clipped_share": float(clipped_B.mean())}
