"""GPU tests of the cuDNN attention path against the dense float32 reference and the blockwise path (values and
gradients, bf16, GQA, T a block multiple and not), and of a bf16 model on each path (skipped off GPU)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType

from foremoe_jax.attention import blockwise_attention, cudnn_attention, gqa_attention
from foremoe_jax.model import Model, ModelConfig
from foremoe_jax.moe import ExpertsConfig

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")]


def rel_err(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return np.abs(got - want).max() / np.abs(want).max()


def dense_f32(q, k, v):
  q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  return gqa_attention(q, k, v, jnp.broadcast_to(jnp.arange(q.shape[1]), q.shape[:2]))


def value_and_grads(fn, q, k, v, w):
  return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * w),
                                    argnums=(0, 1, 2)))(q, k, v)


@pytest.mark.parametrize("t", [1024, 1000])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(32, 4, 128), (8, 8, 64)])
def test_cudnn_and_blockwise_equal_dense_in_bf16(t, heads, kv_heads, head_dim):
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (2, t, heads, head_dim), jnp.bfloat16)
  k, v = (jax.random.normal(key, (2, t, kv_heads, head_dim), jnp.bfloat16) for key in keys[1:3])
  w = jax.random.normal(keys[3], q.shape, jnp.float32)
  _, want_g = value_and_grads(dense_f32, q, k, v, w)
  for name, fn in (("cudnn", cudnn_attention), ("blockwise", lambda q, k, v: blockwise_attention(q, k, v, block=256))):
    np.testing.assert_allclose(np.asarray(fn(q, k, v), np.float32), dense_f32(q, k, v), atol=3e-2, err_msg=name)
    _, got_g = value_and_grads(fn, q, k, v, w)  # the summed value cancels: compare the gradients elementwise
    for x, g, r in zip("qkv", got_g, want_g):
      assert rel_err(g, r) <= 3e-2, (name, x)


def test_cudnn_refuses_packed_rows():
  q = jnp.zeros((1, 128, 4, 64), jnp.bfloat16)
  k = jnp.zeros((1, 128, 2, 64), jnp.bfloat16)
  with pytest.raises(ValueError, match="packed rows"):
    cudnn_attention(q, k, k, jnp.ones((1, 128), jnp.int32))


def test_bf16_model_forward_and_gradients_agree_across_paths():
  cfg = ModelConfig(vocab_size=64, d_model=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64,
                    moe=ExpertsConfig(num_experts=4, top_k=2, d_ff_expert=64, dispatch="padded"),
                    max_seq_len=512, dtype="bfloat16", remat="block")
  mesh = jax.make_mesh((1, 1), ("data", "expert"), axis_types=(AxisType.Auto,) * 2, devices=jax.devices()[:1])
  x = jax.random.randint(jax.random.key(1), (2, 512), 0, cfg.vocab_size)
  results = {}
  for path in ("dense", "blockwise", "cudnn"):
    model = Model(dataclasses.replace(cfg, attention=path, attention_block=128), mesh=mesh, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)

    def loss(params, graphdef=graphdef):
      m = nnx.merge(graphdef, params)
      return jnp.mean(m(x, capacity=m.no_drop_capacity(*x.shape)).logits ** 2)
    results[path] = jax.jit(jax.value_and_grad(loss))(params)
  for path in ("blockwise", "cudnn"):
    assert rel_err(results[path][0], results["dense"][0]) <= 2e-2, path
    for g, r in zip(jax.tree.leaves(results[path][1]), jax.tree.leaves(results["dense"][1])):
      assert rel_err(g, r) <= 5e-2, path
