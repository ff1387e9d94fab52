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

from foremoe_jax import distributed
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


def _check(model, b: int, p: int, prompt_lens, max_new_tokens: int, temperature, top_p) -> None:
  if prompt_lens.size and (prompt_lens.min() < 1 or prompt_lens.max() > p):
    raise ValueError(f"prompt_lens must be [N] = [{prompt_lens.size}] with values in [1, {p}]")
  if b % batch_shards(model.mesh):
    raise ValueError(f"rollout batch N * group_size = {b} is not divisible by the {batch_shards(model.mesh)} "
                     "devices of the batch axes")
  if p + max_new_tokens > model.cfg.max_seq_len:
    raise ValueError(f"prompt length {p} + max_new_tokens {max_new_tokens} > max_seq_len={model.cfg.max_seq_len}")
  if not 0.0 < top_p <= 1.0 or temperature < 0:
    raise ValueError(f"need 0 < top_p <= 1 and temperature >= 0, got top_p={top_p}, temperature={temperature}")


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
  if prompt_lens_N.shape != (n,):
    raise ValueError(f"prompt_lens must be [N] = [{n}] with values in [1, {p}]")
  _check(model, n * group_size, p, prompt_lens_N, max_new_tokens, temperature, top_p)
  sharding = batch_sharding(model.mesh)
  prompts_BxP = jax.device_put(np.repeat(prompts_NxP, group_size, axis=0), sharding)
  lens_B = jax.device_put(np.repeat(prompt_lens_N, group_size), sharding)
  graphdef, state = nnx.split(model)
  return _rollout(graphdef, state, prompts_BxP, lens_B, key, jnp.float32(temperature), jnp.float32(top_p),
                  max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id)


def process_rows(sharding, num_rows: int) -> dict[int, range]:
  """process -> the global batch rows its devices hold under `sharding` (the batch sharding of a
  `[num_rows, ...]` array): one contiguous block per process, which host-local data relies on."""
  held = {}
  for device, index in sharding.devices_indices_map((num_rows,)).items():
    held.setdefault(device.process_index, set()).update(range(*index[0].indices(num_rows)))
  blocks = {}
  for process, rows in sorted(held.items()):
    lo, hi = min(rows), max(rows) + 1
    if len(rows) != hi - lo:
      runs = [r for r in range(lo, hi + 1) if (r in rows) != (r - 1 in rows)]
      raise ValueError(f"process {process} holds batch rows {list(zip(runs[::2], runs[1::2]))} (as [start, stop)) "
                       f"of {num_rows}, not one contiguous block: host-local rollouts need each process's devices "
                       "to be one contiguous run of the mesh's batch axes (jax.make_mesh orders them so)")
    blocks[process] = range(lo, hi)
  return blocks


def local_rows(mesh, num_rows: int) -> range:
  """This process's contiguous block of the global batch rows (`process_rows` under the batch sharding)."""
  return process_rows(batch_sharding(mesh), num_rows)[jax.process_index()]


def local_prompts(sample_rows, rows: range, group_size: int) -> list:
  """The (prompt, answer) of each batch row in `rows` (row b is a copy of prompt b // group_size): only the
  prompts of these rows are drawn, by `sample_rows(prompt_indices)` (`task.sample_rows`: per-row
  generators, so a prompt is the same whichever process draws it; a group split between two processes
  draws its prompt on both)."""
  first = rows.start // group_size
  pairs = sample_rows(range(first, (rows.stop - 1) // group_size + 1))
  return [pairs[b // group_size - first] for b in rows]


@functools.cache
def _resharder(sharding):
  """One jitted identity per target sharding: a new lambda per call would compile again every step."""
  return jax.jit(lambda a: a, out_shardings=sharding)


def _local_part(x: jax.Array, sharding) -> np.ndarray:
  """The rows of a batch-sharded global array this process holds, in order, as numpy."""
  if not x.sharding.is_equivalent_to(sharding, x.ndim):
    x = _resharder(sharding)(x)
  shards = {s.index[0].indices(x.shape[0])[0]: s.data for s in x.addressable_shards}
  return np.concatenate([np.asarray(shards[start]) for start in sorted(shards)])


def local_rollout(model, prompts_BxP, prompt_lens_B, key, *, num_rows: int, max_new_tokens: int,
                  temperature: float = 1.0, top_p: float = 1.0, eos_id: int = EOS, pad_id: int = PAD) -> Rollout:
  """`rollout` of a batch whose rows are built where they run: this process passes only its own rows
  (`local_rows(model.mesh, num_rows)`, one per sample: prompts already repeated per group) and gets only
  those back, as numpy. The program is the global one, so a row's tokens do not depend on how many
  processes share the batch. Prompts are padded to the widest of any process's (one tiny all-gather)."""
  rows = local_rows(model.mesh, num_rows)
  prompts_BxP, prompt_lens_B = np.asarray(prompts_BxP, np.int32), np.asarray(prompt_lens_B, np.int32)
  if prompts_BxP.shape[0] != len(rows) or prompt_lens_B.shape != (len(rows),):
    raise ValueError(f"local_rollout: this process (index {jax.process_index()}) holds batch rows [{rows.start}, "
                     f"{rows.stop}) of {num_rows}, so it needs {len(rows)} prompt rows and lengths; got "
                     f"{prompts_BxP.shape} and {prompt_lens_B.shape}")
  width = distributed.max_over_processes(prompts_BxP.shape[1])
  prompts_BxP = np.pad(prompts_BxP, ((0, 0), (0, width - prompts_BxP.shape[1])), constant_values=pad_id)
  _check(model, num_rows, width, prompt_lens_B, max_new_tokens, temperature, top_p)
  sharding = batch_sharding(model.mesh)
  prompts = jax.make_array_from_process_local_data(sharding, prompts_BxP, (num_rows, width))
  lens = jax.make_array_from_process_local_data(sharding, prompt_lens_B, (num_rows,))
  graphdef, state = nnx.split(model)
  out = _rollout(graphdef, state, prompts, lens, key, jnp.float32(temperature), jnp.float32(top_p),
                 max_new_tokens=max_new_tokens, eos_id=int(eos_id), pad_id=int(pad_id))
  return Rollout(*(_local_part(x, sharding) for x in out))


def response_rows(tokens_BxT, lengths_B, prompt_lengths_B, *, eos_id: int, max_new_tokens: int):
  """Per row: generated tokens (EOS included) and whether it was clipped at `max_new_tokens` without an EOS."""
  tokens_BxT, lengths_B = np.asarray(tokens_BxT), np.asarray(lengths_B)
  new_B = lengths_B - np.asarray(prompt_lengths_B)
  last_B = tokens_BxT[np.arange(len(lengths_B)), np.maximum(lengths_B - 1, 0)]
  return new_B, (new_B >= max_new_tokens) & (last_B != eos_id)


def length_stats(tokens_BxT, lengths_B, prompt_lengths_B, *, eos_id: int, max_new_tokens: int) -> dict:
  """Response lengths (generated tokens, EOS included): mean, max, and the share of rows clipped at
  `max_new_tokens` without an EOS (host arrays)."""
  return summarize_lengths(*response_rows(tokens_BxT, lengths_B, prompt_lengths_B, eos_id=eos_id,
                                          max_new_tokens=max_new_tokens))


def summarize_lengths(new_B, clipped_B) -> dict:
  return {"mean": float(np.mean(new_B)), "max": int(np.max(new_B)), "clipped_share": float(np.mean(clipped_B))}
