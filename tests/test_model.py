"""The decoder: shapes, route capture -> replay, KV-cache decode == full forward, presets and config errors."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import configs
from foremoe_jax.mesh import make_mesh
from foremoe_jax.model import Model, ModelConfig, param_count
from foremoe_jax.moe import ExpertsConfig
from foremoe_jax.placement import home_tables, stack_tables

# Blocks 1 and 3 are MoE, 0 and 2 dense SwiGLU.
CFG = ModelConfig(vocab_size=18, d_model=32, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=8, d_ff_dense=48,
                  moe=ExpertsConfig(num_experts=16, top_k=2, d_ff_expert=16, slots_per_device=3),
                  moe_every=2, max_seq_len=16)
B, T = 8, 12


@pytest.fixture(scope="module")
def model():
  return Model(CFG, mesh=make_mesh(1, 8), rngs=nnx.Rngs(0))


@functools.partial(jax.jit, static_argnames=("graphdef", "capacity"))
def jit_forward(graphdef, state, tokens, tables, replay, capacity):
  return nnx.merge(graphdef, state)(tokens, tables, replay, capacity=capacity)


@pytest.fixture(scope="module")
def forward(model):
  """One compiled forward per (tables, replay) structure, shared with test_rollout (same shapes)."""
  graphdef, _ = nnx.split(model)
  return functools.partial(jit_forward, graphdef, capacity=model.no_drop_capacity(B, T))


def tokens(seed=0):
  return jax.random.randint(jax.random.key(seed), (B, T), 0, CFG.vocab_size)


def test_forward_shapes(model, forward):
  out = forward(nnx.state(model), tokens(), None, None)
  assert out.logits.shape == (B, T, CFG.vocab_size) and out.logits.dtype == jnp.float32
  assert out.routes.shape == (B, T, 2, CFG.moe.top_k) and out.routes.dtype == jnp.int32
  assert out.counts.shape == (2, CFG.moe.num_experts) and out.slot_counts.shape == (2, 8 * 3)
  np.testing.assert_array_equal(out.counts.sum(axis=1), B * T * CFG.moe.top_k)
  assert int(out.dropped) == 0 and np.isfinite(float(out.aux_loss))
  assert len(model.moe_layers()) == 2 and [b.is_moe for b in model.blocks] == [False, True, False, True]


def test_replayed_routes_and_home_tables_reproduce_the_forward(model, forward):
  state, x = nnx.state(model), tokens(1)
  first = forward(state, x, None, None)
  tables = stack_tables([home_tables(16, 8, 3)] * 2)
  again = forward(state, x, tables, first.routes)
  np.testing.assert_array_equal(again.routes, first.routes)
  np.testing.assert_allclose(again.logits, first.logits, rtol=1e-6, atol=1e-6)


def test_decode_with_cache_equals_full_forward(model, forward):
  """Right-padded prompts of different lengths, then one token per row per step at its own position."""
  graphdef, state = nnx.split(model)
  x = tokens(2)
  lens_B = jnp.array([3, 5, 4, 6, 3, 7, 5, 4], jnp.int32)
  prompt_BxP = jnp.where(jnp.arange(7)[None] < lens_B[:, None], x[:, :7], 0)
  steps = T - 7

  @jax.jit
  def decode_all(state, x, prompt, lens):
    m = nnx.merge(graphdef, state)
    cache = m.init_cache(B, T)
    _, cache = m.prefill(prompt, cache, capacity=m.no_drop_capacity(B, 7))

    def step(cache, i):
      pos = lens + i
      logits, routes, cache = m.decode(x[jnp.arange(B), pos][:, None], cache, pos, capacity=8)
      return cache, (logits[:, 0], routes[:, 0])
    _, (logits, routes) = jax.lax.scan(step, cache, jnp.arange(steps))
    return logits, routes  # [steps, B, ...]

  logits_SxBxV, routes_SxBxLxK = decode_all(state, x, prompt_BxP, lens_B)
  full = forward(state, x, None, None)
  pos_SxB = lens_B[None] + jnp.arange(steps)[:, None]
  np.testing.assert_allclose(logits_SxBxV, full.logits[jnp.arange(B)[None], pos_SxB], rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(routes_SxBxLxK, full.routes[jnp.arange(B)[None], pos_SxB])


def test_qwen3_preset_parameter_count_without_allocating():
  cfg = configs.get_config("qwen3_30b_a3b").validate()
  m = cfg.model
  abstract = nnx.eval_shape(lambda: Model(m, mesh=make_mesh(1, 8), rngs=nnx.Rngs(0)))
  attn = m.d_model * m.head_dim * (2 * m.num_heads + 2 * m.num_kv_heads) + 2 * m.head_dim
  moe = m.d_model * m.moe.num_experts + m.moe.num_experts * 3 * m.d_model * m.moe.d_ff_expert
  expected = 2 * m.vocab_size * m.d_model + m.num_layers * (attn + moe + 2 * m.d_model) + m.d_model
  assert param_count(abstract) == expected
  assert 30.0e9 < expected < 31.0e9


def test_presets_build_and_validate():
  for name in configs.PRESETS:
    assert configs.get_config(name).validate().name == name


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_experts=12), "not divisible by the expert axis size"),
    (dict(num_heads=6, num_kv_heads=4), "multiple of num_kv_heads"),
    (dict(head_dim=7), "even"),
    (dict(moe_every=5), "no MoE layer"),
    (dict(dtype="int8"), "dtype"),
    (dict(d_model=0), "d_model"),
    (dict(top_k=17), r"top_k=17 must be in \[1, num_experts=16\]"),
    (dict(dispatch="fast"), r"ModelConfig.dispatch='fast': known token exchanges are \('auto', 'padded', 'ragged'\)"),
    (dict(gmm_backend="triton"), r"ModelConfig.gmm_backend='triton': known backends of gmm/tgmm are "
                                 r"\('mosaic_gpu', 'xla', 'interpret'\)"),
    (dict(dispatch_backend="cuda"), r"ModelConfig.dispatch_backend='cuda': known backends of permute/combine"),
])
def test_bad_model_config_is_refused(kwargs, message):
  moe = {k: kwargs.pop(k) for k in list(kwargs) if k in {f.name for f in dataclasses.fields(ExpertsConfig)}}
  with pytest.raises(ValueError, match=message):
    dataclasses.replace(CFG, moe=dataclasses.replace(CFG.moe, **moe), **kwargs).validate(8)


def test_bad_preset_and_overrides_are_refused():
  with pytest.raises(ValueError, match="unknown preset 'nope'.*cpu_tiny"):
    configs.get_config("nope")
  cfg = configs.get_config("cpu_tiny")
  with pytest.raises(ValueError, match="unknown key 'd_modle'.*d_model"):
    configs.apply_overrides(cfg, ["model.d_modle=8"])
  with pytest.raises(ValueError, match="expected a int"):
    configs.apply_overrides(cfg, ["sft.steps=many"])
  with pytest.raises(ValueError, match="key=value"):
    configs.apply_overrides(cfg, ["sft.steps"])
  over = configs.apply_overrides(cfg, ["sft.steps=7", "model.moe.slots_per_device=none", "model.qk_norm=false"])
  assert (over.sft.steps, over.model.moe.slots_per_device, over.model.qk_norm) == (7, None, False)
  with pytest.raises(ValueError, match="not divisible"):
    configs.apply_overrides(cfg, ["model.moe.num_experts=12"]).validate()
  with pytest.raises(ValueError, match="--set model.moe: 'moe' is a group; set one of its fields"):
    configs.apply_overrides(cfg, ["model.moe=8"])
  with pytest.raises(ValueError, match="unknown key 'nmu_experts' in ExpertsConfig; did you mean 'num_experts'"):
    configs.apply_overrides(cfg, ["model.moe.nmu_experts=8"])


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(ExpertsConfig)])
def test_flat_moe_keys_name_their_nested_key(field):
  """The MoE fields moved from ModelConfig into ModelConfig.moe: an old key says where its field went."""
  with pytest.raises(ValueError, match=rf"--set model\.{field}: unknown key '{field}' in ModelConfig; "
                                       rf"did you mean 'model\.moe\.{field}'\?"):
    configs.apply_overrides(configs.get_config("cpu_tiny"), [f"model.{field}=1"])


def test_kernel_backends_pass_from_overrides_to_the_moe_layers():
  cfg = configs.apply_overrides(configs.get_config("cpu_tiny"),
                                ["model.moe.gmm_backend=interpret", "model.moe.dispatch_backend=xla"]).validate()
  moe_cfg = cfg.model.moe_config()
  assert (moe_cfg.gmm_backend, moe_cfg.dispatch_backend) == ("interpret", "xla")
  assert configs.apply_overrides(cfg, ["model.moe.gmm_backend=none"]).model.moe_config().gmm_backend is None
