"""Long-row paths against their references: blockwise attention == dense attention (values, gradients, full
causal rows, packed segments, GQA, any block size; in the full model, unrolled and scanned), chunked LM-head
log-probs == the full log-softmax, and the compiled programs' temp memory of both is far below the dense ones'."""
import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType

from foremoe_jax.attention import (AUTO_BLOCKWISE_MIN_LEN, attend, attention_path, blockwise_attention,
                                   cudnn_attention, gqa_attention)
from foremoe_jax.model import Model, ModelConfig
from foremoe_jax.moe import ExpertsConfig
from foremoe_jax.rl.grpo import chunked_token_logprobs, token_logprobs


def rel_err(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)


def qkv(b, t, n, kv, d, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  return (jax.random.normal(ks[0], (b, t, n, d)), jax.random.normal(ks[1], (b, t, kv, d)),
          jax.random.normal(ks[2], (b, t, kv, d)), jax.random.normal(ks[3], (b, t, n, d)))


def dense_ref(q, k, v, segment_ids):
  positions = jnp.broadcast_to(jnp.arange(q.shape[1]), q.shape[:2])
  return gqa_attention(q, k, v, positions, segment_ids)


def value_and_grads(fn, q, k, v, w):
  return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v) * w), argnums=(0, 1, 2)))(q, k, v)


# Row 0: segments of 5, 6 and 3 tokens (the second crosses blocks of 4 and 8), then 2 of padding (segment 0);
# row 1: one sequence; row 2: a one-token segment between two others.
SEGMENTS = np.array([[1] * 5 + [2] * 6 + [3] * 3 + [0] * 2, [1] * 16, [1] * 7 + [2] + [3] * 8], np.int32)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("heads, kv_heads", [(4, 2), (4, 1), (2, 2)])
@pytest.mark.parametrize("block", [4, 5, 16, 64])
def test_blockwise_equals_dense(packed, heads, kv_heads, block):
  """Blocks that divide T = 16 (4, 16), that do not (5: padded), larger than T (64: one block)."""
  q, k, v, w = qkv(3, 16, heads, kv_heads, 8)
  seg = jnp.asarray(SEGMENTS) if packed else None
  got, got_g = value_and_grads(functools.partial(blockwise_attention, segment_ids_BxT=seg, block=block), q, k, v, w)
  want, want_g = value_and_grads(lambda q, k, v: dense_ref(q, k, v, seg), q, k, v, w)
  np.testing.assert_allclose(
      blockwise_attention(q, k, v, seg, block=block), dense_ref(q, k, v, seg), rtol=1e-5, atol=1e-5)
  assert rel_err(got, want) <= 1e-5
  for name, g, r in zip("qkv", got_g, want_g):
    assert rel_err(g, r) <= 1e-5, name
    assert np.abs(np.asarray(r)).max() > 0


def test_blockwise_respects_segments_and_causality():
  """Changing the keys of a later column or of another segment leaves a query's output unchanged."""
  q, k, v, _ = qkv(1, 16, 2, 1, 8)
  seg = jnp.asarray(SEGMENTS[:1])
  out = blockwise_attention(q, k, v, seg, block=4)
  k2, v2 = k.at[:, 5:].add(3.0), v.at[:, 5:].add(3.0)  # segment 2 on: segment 1 (columns 0-4) unaffected
  out2 = blockwise_attention(q, k2, v2, seg, block=4)
  np.testing.assert_array_equal(out2[:, :5], out[:, :5])
  assert np.abs(np.asarray(out2[:, 5:] - out[:, 5:])).max() > 1e-3


@pytest.mark.parametrize("bad, match", [
    (dict(block=0), "block must be a positive int"),
    (dict(k=jnp.zeros((3, 16, 3, 8))), "N a multiple of K"),
    (dict(v=jnp.zeros((3, 15, 2, 8))), "not \\[B, T, N, D\\]")])
def test_blockwise_refuses_bad_input(bad, match):
  q, k, v, _ = qkv(3, 16, 4, 2, 8)
  args = dict(q=q, k=k, v=v, block=4) | bad
  with pytest.raises(ValueError, match=match):
    blockwise_attention(args["q"], args["k"], args["v"], block=args["block"])


def test_path_choice_and_its_log(caplog):
  assert attention_path("auto", AUTO_BLOCKWISE_MIN_LEN - 1, cached=False) == "dense"
  assert attention_path("auto", AUTO_BLOCKWISE_MIN_LEN, cached=False) == "blockwise"
  long = AUTO_BLOCKWISE_MIN_LEN
  assert attention_path("auto", long, False, dtype=jnp.bfloat16, platform="gpu") == "cudnn"
  assert attention_path("auto", long, False, packed=True, dtype=jnp.bfloat16, platform="gpu") == "blockwise"
  assert attention_path("auto", long, False, dtype=jnp.float32, platform="gpu") == "blockwise"
  assert attention_path("auto", long, False, dtype=jnp.bfloat16, platform="cpu") == "blockwise"
  assert attention_path("blockwise", 8, cached=True) == "dense"  # prefill / decode over the KV cache
  assert attention_path("cudnn", 8, cached=False) == "cudnn"
  with pytest.raises(ValueError, match="attention must be one of"):
    attention_path("flash", 8, cached=False)
  q, k, v, _ = qkv(1, 12, 2, 1, 8)
  with caplog.at_level(logging.INFO, logger="foremoe_jax.attention"):
    attend(q, k, v, None, kind="blockwise", block=5)
  assert "attention: blockwise path" in caplog.text and "block=5" in caplog.text


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="tests the refusal off GPU; tests/test_attention_gpu.py")
def test_cudnn_refuses_where_it_does_not_apply():
  q, k, v, _ = qkv(1, 8, 2, 1, 8)
  with pytest.raises(ValueError, match="needs a GPU"):
    cudnn_attention(q, k, v)
  with pytest.raises(ValueError, match="packed rows"):
    cudnn_attention(q, k, v, jnp.ones((1, 8), jnp.int32))


@pytest.mark.parametrize("change, match", [(dict(attention="flash"), "attention must be one of"),
                                           (dict(attention_block=0), "attention_block"),
                                           (dict(logprob_chunk=-1), "logprob_chunk")])
def test_bad_config_is_refused(change, match):
  with pytest.raises(ValueError, match=match):
    dataclasses.replace(ModelConfig(), **change).validate()


# --- inside the model ------------------------------------------------------------------------------------
E, D, L, B, T = 8, 2, 2, 2, 12
CFG = ModelConfig(vocab_size=18, d_model=32, num_layers=L, num_heads=4, num_kv_heads=2, head_dim=8, d_ff_dense=48,
                  moe=ExpertsConfig(num_experts=E, top_k=2, d_ff_expert=16),
                  max_seq_len=16, attention="dense", remat="block",
                  logprob_chunk=5)
PACKED_SEG = np.array([[1] * 5 + [2] * 6 + [0], [1] * 3 + [2] * 9], np.int32)  # segment 2 crosses blocks of 4


@pytest.fixture(scope="module")
def mesh():
  return jax.make_mesh((1, D), ("data", "expert"), axis_types=(AxisType.Auto,) * 2, devices=jax.devices()[:D])


def as_config(model, mesh, **change):
  """The same weights under another (static) config."""
  cfg = dataclasses.replace(model.cfg, **change)
  return nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: Model(cfg, mesh=mesh, rngs=nnx.Rngs(0)))), nnx.state(model))


@functools.partial(jax.jit, static_argnames=("graphdef",))
def model_loss_and_grads(graphdef, params, x, replay, seg, pos):
  def loss(params):
    model = nnx.merge(graphdef, params)
    out = model(x, None, replay, capacity=64, segment_ids=seg, positions=pos, logits=False)
    logp = chunked_token_logprobs(out.hidden, model.lm_head[...], x, seg, chunk=model.cfg.logprob_chunk)
    return -jnp.sum(logp * jnp.cos(jnp.arange(logp.size)).reshape(logp.shape)), out
  return jax.value_and_grad(loss, has_aux=True)(params)


@pytest.mark.parametrize("scan_layers", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_blockwise_model_equals_dense_model(mesh, scan_layers, packed):
  """Forward and gradients of the whole model with routes replayed, remat="block"."""
  dense = Model(dataclasses.replace(CFG, scan_layers=scan_layers), mesh=mesh, rngs=nnx.Rngs(0))
  x = jax.random.randint(jax.random.key(1), (B, T), 0, CFG.vocab_size)
  seg = jnp.asarray(PACKED_SEG) if packed else None
  pos = jnp.asarray(np.concatenate([np.arange(5), np.arange(6), [0]])[None].repeat(B, 0)) if packed else None
  replay = jax.jit(lambda m: m(x, segment_ids=seg, positions=pos).routes)(dense)
  results = []
  for model in (dense, as_config(dense, mesh, attention="blockwise", attention_block=4)):
    (loss, out), grads = model_loss_and_grads(nnx.graphdef(model), nnx.state(model), x, replay, seg, pos)
    np.testing.assert_array_equal(out.routes, replay)
    results.append((loss, out.hidden, grads))
  (loss_d, h_d, g_d), (loss_b, h_b, g_b) = results
  assert rel_err(h_b, h_d) <= 1e-5 and rel_err(loss_b, loss_d) <= 1e-5
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(g_b), jax.tree.leaves(g_d)):
    assert rel_err(g, w) <= 1e-5, jax.tree_util.keystr(path)


def test_logits_false_gives_the_heads_input(mesh):
  model = Model(CFG, mesh=mesh, rngs=nnx.Rngs(0))
  x = jax.random.randint(jax.random.key(2), (B, T), 0, CFG.vocab_size)
  full, bare = jax.jit(lambda m: (m(x), m(x, logits=False)))(model)
  assert bare.logits is None
  np.testing.assert_allclose(bare.hidden, full.hidden, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(chunked_token_logprobs(bare.hidden, model.lm_head[...], x, chunk=5),
                             token_logprobs(full.logits, x), rtol=1e-5, atol=1e-5)


# --- chunked log-probs -----------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [1, 4, 11, 32])
@pytest.mark.parametrize("packed", [False, True])
def test_chunked_logprobs_equal_full_log_softmax(chunk, packed):
  rng = np.random.default_rng(chunk)
  b, t, h, v = 2, 11, 8, 13
  hid, w = jnp.asarray(rng.normal(size=(b, t, h)), jnp.float32), jnp.asarray(rng.normal(size=(h, v)), jnp.float32)
  tokens = jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32)
  seg = jnp.asarray([[1] * 4 + [2] * 5 + [0] * 2, [1] * 11]) if packed else None
  g = jnp.asarray(rng.normal(size=(b, t)), jnp.float32)

  def full(hid, w):
    return jnp.sum(token_logprobs(jnp.einsum("bth,hv->btv", hid, w), tokens, seg) * g)
  got, got_g = jax.value_and_grad(lambda a, c: jnp.sum(chunked_token_logprobs(a, c, tokens, seg, chunk=chunk) * g),
                                  argnums=(0, 1))(hid, w)
  want, want_g = jax.value_and_grad(full, argnums=(0, 1))(hid, w)
  np.testing.assert_allclose(chunked_token_logprobs(hid, w, tokens, seg, chunk=chunk),
                             token_logprobs(jnp.einsum("bth,hv->btv", hid, w), tokens, seg), rtol=1e-5, atol=1e-5)
  assert rel_err(got, want) <= 1e-5
  for g_got, g_want in zip(got_g, want_g):
    assert rel_err(g_got, g_want) <= 1e-5


def test_chunked_logprobs_bf16_and_bad_input():
  hid, w = jnp.ones((1, 4, 8), jnp.bfloat16), jnp.ones((8, 5), jnp.bfloat16)
  tokens = jnp.zeros((1, 4), jnp.int32)
  assert chunked_token_logprobs(hid, w, tokens, chunk=3).dtype == jnp.float32
  grads = jax.grad(lambda a, c: jnp.sum(chunked_token_logprobs(a, c, tokens, chunk=3)), argnums=(0, 1))(hid, w)
  assert [x.dtype for x in grads] == [jnp.bfloat16, jnp.bfloat16]
  with pytest.raises(ValueError, match="chunk must be a positive int"):
    chunked_token_logprobs(hid, w, tokens, chunk=0)
  with pytest.raises(ValueError, match="are not"):
    chunked_token_logprobs(hid, w.T, tokens, chunk=2)


# --- compiled memory -------------------------------------------------------------------------------------
def temp_bytes(fn, *args) -> int:
  compiled = jax.jit(jax.grad(fn, argnums=tuple(range(len(args) - 1)))).lower(*args).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_blockwise_and_chunked_programs_hold_far_less_temp_memory():
  """T = 2048, 4 heads: dense attention's scores are [1, 4, 2048, 2048] float32 (64 MiB a buffer), the
  blockwise ones [1, 4, 256, 256] (1 MiB); full logits [2, 2048, 4096] float32 (64 MiB), chunks of 256 8 MiB."""
  t = 2048
  q, k, v, _ = (jax.ShapeDtypeStruct(s, jnp.float32) for s in ((1, t, 4, 16), (1, t, 2, 16), (1, t, 2, 16), ()))
  seg = jax.ShapeDtypeStruct((1, t), jnp.int32)
  dense = temp_bytes(lambda q, k, v, s: jnp.sum(dense_ref(q, k, v, s)), q, k, v, seg)
  blockwise = temp_bytes(lambda q, k, v, s: jnp.sum(blockwise_attention(q, k, v, s, block=256)), q, k, v, seg)
  assert dense > 64 * 2 ** 20 and dense > 10 * blockwise, (dense, blockwise)

  hid, w = jax.ShapeDtypeStruct((2, t, 32), jnp.float32), jax.ShapeDtypeStruct((32, 4096), jnp.float32)
  tokens = jax.ShapeDtypeStruct((2, t), jnp.int32)
  full = temp_bytes(lambda a, c, x: jnp.sum(token_logprobs(a @ c, x)), hid, w, tokens)
  chunked = temp_bytes(lambda a, c, x: jnp.sum(chunked_token_logprobs(a, c, x, chunk=256)), hid, w, tokens)
  assert full > 64 * 2 ** 20 and full > 4 * chunked, (full, chunked)
