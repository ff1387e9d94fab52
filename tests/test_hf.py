"""Hugging Face checkpoints: tiny random Qwen3-MoE / OLMoE in exact HF naming -> load -> forward equals a
float64 numpy forward written from the HF modeling code; export -> the same tensors and, reloaded, the
same logits; shard-aware reads; bad inputs fail naming the tensor, file or key."""
import dataclasses
import functools
import json
import os
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

import hf_reference as ref
import train
from foremoe_jax import convert
from foremoe_jax.convert import hf_weights
from foremoe_jax.mesh import make_mesh
from foremoe_jax.model import ModelConfig
from foremoe_jax.moe import ExpertsConfig
from foremoe_jax.rl.task import CharTokenizer

# name -> (config.json, number of shard files); the last has a dense first layer (decoder_sparse_step=2)
ARCHS = {"qwen3_moe": (ref.QWEN3, 2), "olmoe": (ref.OLMOE, 1),
         "qwen3_moe_sparse_step_2": ({**ref.QWEN3, "decoder_sparse_step": 2}, 1)}
B, T = 8, 6
TOKENS_BxT = np.random.default_rng(0).integers(0, 40, (B, T)).astype(np.int32)


@pytest.fixture(scope="module")
def mesh():
  return make_mesh(1, 8)


def load(path, mesh, **runtime):
  cfg = convert.model_config_from_hf(convert.read_config(path), max_seq_len=16, **runtime)
  return convert.load_model(str(path), cfg, mesh)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _forward(graphdef, state, tokens_BxT):
  model = nnx.merge(graphdef, state)
  out = model(tokens_BxT, capacity=model.no_drop_capacity(*tokens_BxT.shape))
  return out.logits, out.routes


def forward(model):
  logits, routes = _forward(nnx.graphdef(model), nnx.state(model), TOKENS_BxT)
  return np.asarray(logits), np.asarray(routes)


def checkpoint(tmp_path, hf, weights=None, num_shards=1, name="src"):
  weights = ref.random_weights(hf) if weights is None else weights
  ref.write_checkpoint(tmp_path / name, hf, weights, num_shards)
  return tmp_path / name, weights


@pytest.mark.parametrize("arch", ARCHS)
def test_load_matches_reference_then_export_reload_is_identical(arch, tmp_path, mesh):
  hf, shards = ARCHS[arch]
  src, weights = checkpoint(tmp_path, hf, num_shards=shards)
  model = load(src, mesh)
  logits, routes = forward(model)
  ref_logits, ref_routes = ref.forward(hf, weights, TOKENS_BxT)
  np.testing.assert_array_equal(routes, ref_routes)
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-4, atol=1e-4 * np.abs(ref_logits).max())

  out = tmp_path / "out"
  files = convert.export_model(model, str(out), base_config=convert.read_config(src), dtype=hf["torch_dtype"],
                               max_shard_bytes=16 << 10)  # several shards + index
  assert "model.safetensors.index.json" in files and len(files) > 3
  exported = {}
  for f in files:
    if f.endswith(".safetensors"):
      exported |= load_file(out / f)
  assert sorted(exported) == sorted(weights)
  for name, value in weights.items():
    assert exported[name].dtype == value.dtype and exported[name].shape == value.shape, name
    np.testing.assert_array_equal(exported[name], value, err_msg=name)
  assert convert.read_config(out) == hf
  np.testing.assert_array_equal(forward(load(out, mesh))[0], logits)


def test_each_expert_is_read_once_into_its_home_device_and_cast(tmp_path, mesh, monkeypatch):
  src, weights = checkpoint(tmp_path, ref.QWEN3)
  reads = []
  original = hf_weights.Checkpoint.read
  monkeypatch.setattr(hf_weights.Checkpoint, "read", lambda self, name: reads.append(name) or original(self, name))
  model = load(src, mesh, param_dtype="bfloat16")
  expert_reads = [n for n in reads if ".experts." in n]
  assert len(expert_reads) == len(set(expert_reads)) == 2 * 8 * 3
  w_gate_up = model.blocks[1].ffn.w_gate_up[...]
  assert w_gate_up.dtype == np.dtype("bfloat16") and w_gate_up.sharding.spec == jax.sharding.PartitionSpec("expert")
  for shard in w_gate_up.addressable_shards:  # E/D = 1 expert per device, gate then up, transposed
    e = shard.index[0].start
    p = f"model.layers.1.mlp.experts.{e}."
    want = np.concatenate([weights[p + "gate_proj.weight"].T, weights[p + "up_proj.weight"].T], axis=-1)
    np.testing.assert_array_equal(np.asarray(shard.data[0]), want.astype("bfloat16"))


def test_real_configs_map_to_the_published_parameter_counts():
  """Qwen3-30B-A3B (30.5B) and OLMoE-1B-7B (6.9B) config.json values; the tensor map covers every parameter
  (load_model checks it against the model's shapes)."""
  qwen3 = {**ref.QWEN3, "vocab_size": 151936, "hidden_size": 2048, "num_hidden_layers": 48, "num_attention_heads": 32,
           "num_key_value_heads": 4, "head_dim": 128, "intermediate_size": 6144, "moe_intermediate_size": 768,
           "num_experts": 128, "num_experts_per_tok": 8}
  olmoe = {**ref.OLMOE, "vocab_size": 50304, "hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 16,
           "num_key_value_heads": 16, "intermediate_size": 1024, "num_experts": 64, "num_experts_per_tok": 8}
  for hf, lo, hi in ((qwen3, 30.5e9, 30.6e9), (olmoe, 6.9e9, 6.95e9)):
    specs = convert.tensor_specs(convert.model_config_from_hf(hf))
    assert lo < sum(np.prod(s.hf_shape) * len(s.names) * max(s.experts, 1) for s in specs) < hi
  assert convert.model_config_from_hf(olmoe).head_dim == 128


def test_train_cli_init_from_and_export_to(tmp_path):
  """--init-from loads (SFT and RL skipped here), --export-to writes the same checkpoint back; a --set that
  contradicts config.json is refused before any work."""
  src, weights = checkpoint(tmp_path, ref.OLMOE, num_shards=2)
  (src / "tokenizer.json").write_text("{}")  # carried over verbatim
  out = tmp_path / "out"
  common = ["--init-from", str(src), "--sft-steps", "0", "--rl-steps", "0", "--run-dir", str(tmp_path / "run"),
            "--set", "sft.eval_prompts=8"]
  with pytest.raises(ValueError, match=r"model\.moe\.num_experts=16 contradicts.*num_experts gives num_experts=8"):
    train.main(common + ["--set", "model.moe.num_experts=16"])
  train.main(common + ["--set", "model.moe.slots_per_device=2", "--export-to", str(out)])
  exported = load_file(out / "model.safetensors")
  assert sorted(exported) == sorted(weights)
  for name, value in weights.items():
    np.testing.assert_array_equal(exported[name], value, err_msg=name)
  assert convert.read_config(out) == ref.OLMOE and (out / "tokenizer.json").read_text() == "{}"


def test_missing_shard_file_is_named(tmp_path):
  src, _ = checkpoint(tmp_path, ref.QWEN3, num_shards=2)
  os.remove(src / "model-00002-of-00002.safetensors")
  with pytest.raises(FileNotFoundError, match="shard file 'model-00002-of-00002.safetensors'.*missing"):
    convert.Checkpoint(str(src))


@pytest.mark.parametrize("edit,message", [
    ("shape", r"'model.layers.1.mlp.experts.3.up_proj.weight' has shape \(17, 32\).*implies \(16, 32\)"),
    ("missing", r"'model.layers.0.self_attn.k_norm.weight' is missing"),
    ("extra", r"no place for.*model.layers.0.self_attn.q_proj.bias"),
])
def test_bad_tensors_are_named(edit, message, tmp_path, mesh):
  weights = ref.random_weights(ref.QWEN3)
  if edit == "shape":
    weights["model.layers.1.mlp.experts.3.up_proj.weight"] = np.zeros((17, 32), np.float32)
  elif edit == "missing":
    del weights["model.layers.0.self_attn.k_norm.weight"]
  else:
    weights["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)
  src, _ = checkpoint(tmp_path, ref.QWEN3, weights)
  with pytest.raises(ValueError, match=message):
    load(src, mesh)


@pytest.mark.parametrize("change,message", [
    ({"model_type": "mixtral"}, "model_type='mixtral' is not supported"),
    ({"shared_expert_intermediate_size": 64}, "shared_expert_intermediate_size=64.*shared experts"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings=True.*tied"),
    ({"use_sliding_window": True}, "use_sliding_window=True.*sliding-window"),
    ({"mlp_only_layers": [0]}, r"mlp_only_layers=\[0\]"),
    ({"rope_scaling": {"rope_type": "yarn"}}, "rope_scaling"),
    ({"num_experts": 0}, "num_experts=0"),
    ({"hidden_size": None}, "missing key 'hidden_size'"),
])
def test_unsupported_configs_are_refused_by_key(change, message):
  hf = {k: v for k, v in {**ref.QWEN3, **change}.items() if v is not None}
  with pytest.raises(ValueError, match=message):
    convert.model_config_from_hf(hf)


def test_overrides_must_agree_with_the_checkpoint():
  current = ModelConfig(moe=ExpertsConfig(num_experts=16, slots_per_device=3), d_model=64, dtype="bfloat16")
  merged = convert.merge_with_overrides(ref.OLMOE, current, {"dtype"}, 8)
  assert (merged.d_model, merged.moe.num_experts, merged.dtype, merged.norm_eps) == (32, 8, "bfloat16", 1e-5)
  assert merged.moe.slots_per_device == 8 // 8 + 1  # the preset's one redundant slot per device is kept
  agreeing = dataclasses.replace(current, d_model=32)
  assert convert.merge_with_overrides(ref.OLMOE, agreeing, {"d_model"}, 8).d_model == 32
  with pytest.raises(ValueError, match=r"--set model.d_model=64 contradicts.*d_model=32"):
    convert.merge_with_overrides(ref.OLMOE, current, {"d_model"}, 8)


def test_model_feature_switches_are_validated():
  with pytest.raises(ValueError, match="qk_norm_scope"):
    ModelConfig(qk_norm_scope="all").validate()
  with pytest.raises(ValueError, match="norm_eps"):
    ModelConfig(norm_eps=0.0).validate()
  with pytest.raises(ValueError, match="qk_norm=False has no Hugging Face counterpart"):
    convert.hf_config(ModelConfig(qk_norm=False))


def test_tokenizer_hook(tmp_path, monkeypatch):
  assert isinstance(convert.load_tokenizer(str(tmp_path)), CharTokenizer)
  tokenizers = pytest.importorskip("tokenizers")
  vocab = {"[PAD]": 0, "<s>": 1, "</s>": 2, "[UNK]": 3, "12": 4, "+": 5, "=": 6, "3": 7}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2], "pad_token_id": 0}))
  hf_tok = convert.load_tokenizer(str(tmp_path))
  assert hf_tok.vocab_size == 8
  assert hf_tok.encode("12 + 3", bos=True, eos=True) == [1, 4, 5, 7, 2]
  assert hf_tok.decode([1, 4, 5, 7, 2, 6]) == "12 + 3"
  monkeypatch.setitem(sys.modules, "tokenizers", None)
  with pytest.raises(ImportError, match="pip install tokenizers"):
    convert.load_tokenizer(str(tmp_path))
