"""RMSNorm, rotary embeddings and GQA attention over a position-indexed KV cache (plain jnp, outside shard_map).

Cache slot j holds the key/value of position j, for every row. Queries at position p see the keys at
positions <= p, so the same mask serves the full forward (keys = the sequence itself), a prefill into the
cache and one-token decode steps at per-row positions (right-padded prompts of different lengths).
Packed rows (several sequences back to back, no cache) pass `segment_ids`: a query sees the earlier
columns of its own segment only, and RoPE rotates by the per-token positions (restarting per sequence).

Paths (`ModelConfig.attention`, chosen per call by `attention_path`, logged once per shape): "dense"
materializes [B, N, T, S] float32 scores (`gqa_attention`; always with a KV cache: prefill and decode);
"blockwise" never holds more than [B, N, c, c] (`blockwise_attention`, c = `attention_block`, forward
and backward); "cudnn" is `jax.nn.dot_product_attention(implementation="cudnn")` (GPU, bf16/fp16, full
causal rows only: its public API has no segment mask short of a materialized [B, 1, T, T] one); "auto"
from `AUTO_BLOCKWISE_MIN_LEN` tokens on is cuDNN where it runs (GPU, half precision, unpacked) and blockwise
elsewhere, dense below.
"""
import logging
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

log = logging.getLogger(__name__)

ATTENTION = ("auto", "dense", "blockwise", "cudnn")
AUTO_BLOCKWISE_MIN_LEN = 1024  # below, dense scores are small ([4 rows, 32 heads, 1K, 1K] f32: 512 MiB)
NEG = -1e30  # masked scores: finite, so a row or block with nothing visible never computes inf - inf


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
  s_BxNxTxS = jnp.where(visible_BxTxS[:, None], s_BxNxTxS, NEG)
  p_BxNxTxS = jax.nn.softmax(s_BxNxTxS, axis=-1).astype(v_BxSxNxD.dtype)
  return jnp.einsum("bnts,bsnd->btnd", p_BxNxTxS, v_BxSxNxD)


def attention_path(kind: str, seq_len: int, cached: bool, *, packed: bool = False, dtype=None,
                   platform: str | None = None) -> str:
  """The path one call takes: dense with a KV cache (keys are the cache), else `kind`. "auto", from
  AUTO_BLOCKWISE_MIN_LEN tokens on: cuDNN on GPU for unpacked bf16/fp16 rows (tested against dense on an
  H100: tests/test_attention_gpu.py), blockwise elsewhere; dense below."""
  if kind not in ATTENTION:
    raise ValueError(f"attention must be one of {ATTENTION}, got {kind!r}")
  if cached:
    return "dense"
  if kind == "auto":
    if seq_len < AUTO_BLOCKWISE_MIN_LEN:
      return "dense"
    half = dtype is not None and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
    on_gpu = (platform or jax.default_backend()) == "gpu"
    return "cudnn" if on_gpu and half and not packed else "blockwise"
  return kind


_logged = set()


def attend(q_BxTxNxD, k_BxSxKxD, v_BxSxKxD, q_pos_BxT, segment_ids_BxT=None, *, kind: str = "dense",
           block: int = 512, cached: bool = False) -> jax.Array:
  """Attention by `attention_path`; logs each (path, shape) the first time it is traced."""
  b, t, n, d = q_BxTxNxD.shape
  path = attention_path(kind, t, cached, packed=segment_ids_BxT is not None, dtype=q_BxTxNxD.dtype)
  key = (path, kind, b, t, k_BxSxKxD.shape[1], n, d, segment_ids_BxT is not None, block)
  if key not in _logged:
    _logged.add(key)
    log.info("attention: %s path (attention=%s, B=%d, T=%d, S=%d, heads=%d, packed=%s%s)", path, kind, b, t,
             k_BxSxKxD.shape[1], n, segment_ids_BxT is not None, f", block={min(block, t)}" * (path == "blockwise"))
  if path == "dense":
    return gqa_attention(q_BxTxNxD, k_BxSxKxD, v_BxSxKxD, q_pos_BxT, segment_ids_BxT)
  if path == "blockwise":
    return blockwise_attention(q_BxTxNxD, k_BxSxKxD, v_BxSxKxD, segment_ids_BxT, block=block)
  return cudnn_attention(q_BxTxNxD, k_BxSxKxD, v_BxSxKxD, segment_ids_BxT)


def cudnn_attention(q_BxTxNxD, k_BxTxKxD, v_BxTxKxD, segment_ids_BxT=None) -> jax.Array:
  """cuDNN flash attention, causal over the row. Raises where it does not apply (no silent fallback)."""
  if segment_ids_BxT is not None:
    raise ValueError("attention='cudnn' does not take packed rows (segment_ids): jax.nn.dot_product_attention "
                     "has no segment mask short of a materialized [B, 1, T, T] one; use 'blockwise' or 'auto'")
  if jax.default_backend() != "gpu":
    raise ValueError(f"attention='cudnn' needs a GPU, JAX's backend is {jax.default_backend()!r}")
  if q_BxTxNxD.dtype not in (jnp.bfloat16, jnp.float16):
    raise ValueError(f"attention='cudnn' needs bfloat16 or float16 activations, got {q_BxTxNxD.dtype}")
  return jax.nn.dot_product_attention(q_BxTxNxD, k_BxTxKxD, v_BxTxKxD, is_causal=True, implementation="cudnn")


# --- blockwise (flash-style) attention ------------------------------------------------------------------
# Query blocks x key blocks with an online softmax; key blocks above the causal diagonal are never visited
# (the inner loop's trip count is the query block's index + 1). The custom VJP keeps q, k, v, the output
# and the per-row logsumexp, and recomputes each block's probabilities in the backward, so no program
# holds more than [B, N, c, c] scores at a time.
def blockwise_attention(q_BxTxNxD, k_BxTxKxD, v_BxTxKxD, segment_ids_BxT=None, *, block: int) -> jax.Array:
  """Causal self-attention over the row's own columns (and, with `segment_ids_BxT`, within a segment),
  equal to `gqa_attention` without a cache. T need not divide by `block`: the tail is padded with keys
  that no real query sees (they lie after it) and padded queries are dropped."""
  b, t, n, d = q_BxTxNxD.shape
  kv = k_BxTxKxD.shape[2]
  if k_BxTxKxD.shape != (b, t, kv, d) or v_BxTxKxD.shape != k_BxTxKxD.shape or n % kv:
    raise ValueError(f"blockwise_attention: q {q_BxTxNxD.shape}, k {k_BxTxKxD.shape}, v {v_BxTxKxD.shape} are "
                     "not [B, T, N, D], [B, T, K, D] x2 with N a multiple of K")
  if not isinstance(block, int) or block < 1:
    raise ValueError(f"blockwise_attention: block must be a positive int, got {block!r}")
  c = min(block, t)
  pad = -t % c
  seg_BxT = jnp.zeros((b, t), jnp.int32) if segment_ids_BxT is None else segment_ids_BxT.astype(jnp.int32)
  if pad:
    q_BxTxNxD, k_BxTxKxD, v_BxTxKxD = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))
                                       for x in (q_BxTxNxD, k_BxTxKxD, v_BxTxKxD))
    seg_BxT = jnp.pad(seg_BxT, ((0, 0), (0, pad)))
  nb = (t + pad) // c
  qb = _blocks(q_BxTxNxD.reshape(b, t + pad, kv, n // kv, d), nb)  # [nb, B, K, G, c, D]
  kb, vb = _blocks(k_BxTxKxD, nb), _blocks(v_BxTxKxD, nb)  # [nb, B, K, c, D]
  segb = seg_BxT.reshape(b, nb, c).swapaxes(0, 1)  # [nb, B, c]
  ob = _flash(qb, kb, vb, segb)
  o = jnp.moveaxis(ob, 4, 2).swapaxes(0, 1).reshape(b, t + pad, n, d)  # [nb,B,K,G,c,D] -> [B, T, N, D]
  return o[:, :t]


def _blocks(x_BxTxHxD, nb):
  """[B, nb*c, H..., D] -> [nb, B, H..., c, D]."""
  b, t = x_BxTxHxD.shape[:2]
  x = x_BxTxHxD.reshape(b, nb, t // nb, *x_BxTxHxD.shape[2:])
  return jnp.moveaxis(x, 2, -2).swapaxes(0, 1)


def _scores(i, j, q_BxKxGxCxD, k_BxKxCxD, sq_BxC, sk_BxC):
  """Scaled float32 scores of query block i against key block j and their visibility [B, 1, 1, c, c]."""
  c = q_BxKxGxCxD.shape[-2]
  s = jnp.einsum("bkgqd,bksd->bkgqs", q_BxKxGxCxD, k_BxKxCxD, preferred_element_type=jnp.float32)
  cols = jnp.arange(c)
  causal_CxC = (j * c + cols)[None, :] <= (i * c + cols)[:, None]
  visible = (causal_CxC[None] & (sq_BxC[:, :, None] == sk_BxC[:, None, :]))[:, None, None]
  return s * q_BxKxGxCxD.shape[-1] ** -0.5, visible


def _forward(qb, kb, vb, segb):
  """-> (output blocks like qb, logsumexp [nb, B, K, G, c] float32)."""
  def query_block(args):
    i, q, sq = args

    def key_block(j, carry):
      m, l, acc = carry
      s, visible = _scores(i, j, q, kb[j], sq, segb[j])
      m_new = jnp.maximum(m, jnp.max(jnp.where(visible, s, NEG), axis=-1))
      p = jnp.where(visible, jnp.exp(s - m_new[..., None]), 0.0)
      corr = jnp.exp(m - m_new)
      pv = jnp.einsum("bkgqs,bksd->bkgqd", p.astype(vb.dtype), vb[j], preferred_element_type=jnp.float32)
      return m_new, l * corr + jnp.sum(p, axis=-1), acc * corr[..., None] + pv

    acc = jnp.zeros_like(q, jnp.float32)
    m0 = jnp.full_like(acc[..., 0], NEG)
    m, l, acc = jax.lax.fori_loop(0, i + 1, key_block, (m0, jnp.zeros_like(m0), acc))
    return (acc / l[..., None]).astype(qb.dtype), m + jnp.log(l)  # l >= 1: every query sees itself

  return jax.lax.map(query_block, (jnp.arange(qb.shape[0]), qb, segb))


@jax.custom_vjp
def _flash(qb, kb, vb, segb):
  return _forward(qb, kb, vb, segb)[0]


def _flash_fwd(qb, kb, vb, segb):
  ob, lse = _forward(qb, kb, vb, segb)
  return ob, (qb, kb, vb, segb, ob, lse)


def _flash_bwd(res, dob):
  """FlashAttention-2's backward: per query block, the probabilities are recomputed from the logsumexp;
  dK and dV accumulate in float32 over the query blocks that see them."""
  qb, kb, vb, segb, ob, lse = res
  delta = jnp.sum(dob.astype(jnp.float32) * ob.astype(jnp.float32), axis=-1)  # [nb, B, K, G, c]
  scale = qb.shape[-1] ** -0.5

  def query_block(carry, args):
    i, q, do, lse_i, delta_i, sq = args

    def key_block(j, inner):
      dq, dk, dv = inner
      s, visible = _scores(i, j, q, kb[j], sq, segb[j])
      p = jnp.where(visible, jnp.exp(s - lse_i[..., None]), 0.0)
      dp = jnp.einsum("bkgqd,bksd->bkgqs", do, vb[j], preferred_element_type=jnp.float32)
      ds = (p * (dp - delta_i[..., None]) * scale).astype(qb.dtype)
      dq = dq + jnp.einsum("bkgqs,bksd->bkgqd", ds, kb[j], preferred_element_type=jnp.float32)
      dk = dk.at[j].add(jnp.einsum("bkgqs,bkgqd->bksd", ds, q, preferred_element_type=jnp.float32))
      dv = dv.at[j].add(jnp.einsum("bkgqs,bkgqd->bksd", p.astype(do.dtype), do, preferred_element_type=jnp.float32))
      return dq, dk, dv

    dq, dk, dv = jax.lax.fori_loop(0, i + 1, key_block, (jnp.zeros_like(q, jnp.float32), *carry))
    return (dk, dv), dq.astype(qb.dtype)

  zeros = jnp.zeros_like(kb, jnp.float32)
  (dk, dv), dqb = jax.lax.scan(query_block, (zeros, zeros), (jnp.arange(qb.shape[0]), qb, dob, lse, delta, segb))
  return dqb, dk.astype(kb.dtype), dv.astype(vb.dtype), None


_flash.defvjp(_flash_fwd, _flash_bwd)


class Attention(nnx.Module):
  """GQA self-attention with RoPE and optional q/k RMSNorm: per head (Qwen3) or over the whole projected
  q / k before the head split (OLMoE), by `cfg.qk_norm_scope`."""

  def __init__(self, cfg, *, mesh, rngs: nnx.Rngs):
    h, n, kv, d = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    pd = jnp.dtype(cfg.param_dtype)
    self.dtype, self.rope_theta, self.qk_norm_scope = jnp.dtype(cfg.dtype), cfg.rope_theta, cfg.qk_norm_scope
    self.kind, self.block = cfg.attention, cfg.attention_block
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
    o_BxTxNxD = attend(q, k, v, positions_BxT, segment_ids_BxT, kind=self.kind, block=self.block,
                       cached=cache is not None)
    return jnp.einsum("btnd,ndh->bth", o_BxTxNxD, self.wo[...].astype(dt)), cache

  def _qk_norm(self, norm: RMSNorm, x_BxTxNxD):
    if self.qk_norm_scope == "head":
      return norm(x_BxTxNxD)
    b, t, n, d = x_BxTxNxD.shape
    return norm(x_BxTxNxD.reshape(b, t, n * d)).reshape(b, t, n, d)
