"""RMSNorm, rotary embeddings and GQA attention over a position-indexed KV cache (plain jnp, outside shard_map).

Cache slot j holds the key/value of position j, for every row. Queries at position p see the keys at
positions <= p, so the same mask serves the full forward (keys = the sequence itself), a prefill into the
cache and one-token decode steps at per-row positions (right-padded prompts of different lengths).
Packed rows (several sequences back to back, no cache) pass `segment_ids`: a query sees the earlier
columns of its own segment only, and RoPE rotates by the per-token positions (restarting per sequence).
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


class KVCache(NamedTuple):
  """One layer's cache."""
  k: jax.Array  # [B, S_max, num_kv_heads, head_dim]
  v: jax.Array  # [B, S_max, num_kv_heads, head_dim]


def init_param(rngs: nnx.Rngs, shape, fan_in: float, mesh, dtype, spec=P()) -> nnx.Param:
  """N(0, 1/fan_in). A concrete key seeds a host RNG: eager `jax.random` would compile one XLA program
  per parameter shape (each a compile, slow on CPU); under tracing (`nnx.eval_shape`) it stays in JAX."""
  key = rngs.params()
  if isinstance(key, jax.core.Tracer):
    w = jax.random.normal(key, shape, dtype)
  else:
    w = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel()).standard_normal(shape).astype(dtype)
  return nnx.Param(jax.device_put(w / np.sqrt(fan_in).astype(dtype), NamedSharding(mesh, spec)))


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, *, mesh, param_dtype, eps: float = 1e-6):
    self.eps = eps
    self.scale = nnx.Param(jax.device_put(np.ones((dim,), param_dtype), NamedSharding(mesh, P())))

  def __call__(self, x_xD: jax.Array) -> jax.Array:
    x32 = x_xD.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(x_xD.dtype)


def rope(x_BxTxNxD: jax.Array, positions_BxT: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding, half-split layout (Llama/Qwen `rotate_half`), computed in float32."""
  half = x_BxTxNxD.shape[-1] // 2
  inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle_BxTx1xF = (positions_BxT.astype(jnp.float32)[..., None] * inv_freq)[:, :, None, :]
  cos, sin = jnp.cos(angle_BxTx1xF), jnp.sin(angle_BxTx1xF)
  x1, x2 = jnp.split(x_BxTxNxD.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_BxTxNxD.dtype)


def write_cache(cache_BxSxKxD: jax.Array, new_BxTxKxD: jax.Array, start_B: jax.Array) -> jax.Array:
  """Writes each row's T new entries at its own start position."""
  def one(c, u, s):
    return jax.lax.dynamic_update_slice_in_dim(c, u.astype(c.dtype), s, axis=0)
  return jax.vmap(one)(cache_BxSxKxD, new_BxTxKxD, start_B)


def gqa_attention(q_BxTxNxD, k_BxSxKxD, v_BxSxKxD, q_pos_BxT, segment_ids_BxT=None) -> jax.Array:
  """Causal by position: query at position p sees key slots 0..p. Softmax in float32.

  `segment_ids_BxT` (keys = the queries' own row, S = T): query column t sees key columns s <= t of its
  own segment instead (padding, segment 0, sees padding: finite rows, outputs nobody reads)."""
  groups = q_BxTxNxD.shape[2] // k_BxSxKxD.shape[2]
  k_BxSxNxD = jnp.repeat(k_BxSxKxD, groups, axis=2)
  v_BxSxNxD = jnp.repeat(v_BxSxKxD, groups, axis=2)
  scale = q_BxTxNxD.shape[-1] ** -0.5
  s_BxNxTxS = jnp.einsum("btnd,bsnd->bnts", q_BxTxNxD, k_BxSxNxD, preferred_element_type=jnp.float32) * scale
  if segment_ids_BxT is None:
    visible_BxTxS = jnp.arange(k_BxSxKxD.shape[1])[None, None, :] <= q_pos_BxT[:, :, None]
  else:
    cols = jnp.arange(k_BxSxKxD.shape[1])
    visible_BxTxS = ((cols[None, None, :] <= cols[None, :, None])
                     & (segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]))
  s_BxNxTxS = jnp.where(visible_BxTxS[:, None], s_BxNxTxS, -1e30)
  p_BxNxTxS = jax.nn.softmax(s_BxNxTxS, axis=-1).astype(v_BxSxNxD.dtype)
  return jnp.einsum("bnts,bsnd->btnd", p_BxNxTxS, v_BxSxNxD)


class Attention(nnx.Module):
  """GQA self-attention with RoPE and optional q/k RMSNorm: per head (Qwen3) or over the whole projected
  q / k before the head split (OLMoE), by `cfg.qk_norm_scope`."""

  def __init__(self, cfg, *, mesh, rngs: nnx.Rngs):
    h, n, kv, d = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    pd = jnp.dtype(cfg.param_dtype)
    self.dtype, self.rope_theta, self.qk_norm_scope = jnp.dtype(cfg.dtype), cfg.rope_theta, cfg.qk_norm_scope
    self.wq = init_param(rngs, (h, n, d), h, mesh, pd)
    self.wk = init_param(rngs, (h, kv, d), h, mesh, pd)
    self.wv = init_param(rngs, (h, kv, d), h, mesh, pd)
    self.wo = init_param(rngs, (n, d, h), n * d, mesh, pd)
    q_dim, k_dim = (d, d) if cfg.qk_norm_scope == "head" else (n * d, kv * d)
    eps = cfg.norm_eps
    self.q_norm = RMSNorm(q_dim, mesh=mesh, param_dtype=pd, eps=eps) if cfg.qk_norm else None
    self.k_norm = RMSNorm(k_dim, mesh=mesh, param_dtype=pd, eps=eps) if cfg.qk_norm else None

  def __call__(self, x_BxTxH, positions_BxT, cache: KVCache | None = None, start_B=None, segment_ids_BxT=None):
    """Without a cache: attention over the sequence itself, or with `segment_ids_BxT` over each packed
    sequence of the row. With one: writes this chunk's keys at `start_B` (so positions_BxT = start_B +
    arange(T)) and attends over the whole cache."""
    if cache is not None and segment_ids_BxT is not None:
      raise ValueError("Attention: packed rows (segment_ids) run without a KV cache")
    dt = self.dtype
    x = x_BxTxH.astype(dt)
    q = jnp.einsum("bth,hnd->btnd", x, self.wq[...].astype(dt))
    k = jnp.einsum("bth,hkd->btkd", x, self.wk[...].astype(dt))
    v = jnp.einsum("bth,hkd->btkd", x, self.wv[...].astype(dt))
    if self.q_norm is not None:
      q, k = self._qk_norm(self.q_norm, q), self._qk_norm(self.k_norm, k)
    q, k = rope(q, positions_BxT, self.rope_theta), rope(k, positions_BxT, self.rope_theta)
    if cache is not None:
      cache = KVCache(write_cache(cache.k, k, start_B), write_cache(cache.v, v, start_B))
      k, v = cache.k.astype(dt), cache.v.astype(dt)
    o_BxTxNxD = gqa_attention(q, k, v, positions_BxT, segment_ids_BxT)
    return jnp.einsum("btnd,ndh->bth", o_BxTxNxD, self.wo[...].astype(dt)), cache

  def _qk_norm(self, norm: RMSNorm, x_BxTxNxD):
    if self.qk_norm_scope == "head":
      return norm(x_BxTxNxD)
    b, t, n, d = x_BxTxNxD.shape
    return norm(x_BxTxNxD.reshape(b, t, n * d)).reshape(b, t, n, d)
