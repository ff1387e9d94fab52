"""Hugging Face `config.json` (Qwen3-MoE, OLMoE) <-> `ModelConfig`.

Only the architecture comes from the checkpoint (`ARCH_FIELDS`); run-time choices (slots, dispatch,
capacity, dtypes, cache length) stay ours. Anything the model cannot reproduce is refused by key name.
"""
import dataclasses
import json
import os

from foremoe_jax.model import ModelConfig
from foremoe_jax.moe import ExpertsConfig

SUPPORTED = ("qwen3_moe", "olmoe")
ARCHITECTURES = {"qwen3_moe": "Qwen3MoeForCausalLM", "olmoe": "OlmoeForCausalLM"}
# ModelConfig fields (dotted below `model.`) the checkpoint decides; an explicit `--set model.<field>` must
# agree with them. Values are the config.json keys they come from (for messages).
ARCH_FIELDS = {"vocab_size": "vocab_size", "d_model": "hidden_size", "num_layers": "num_hidden_layers",
               "num_heads": "num_attention_heads", "num_kv_heads": "num_key_value_heads", "head_dim": "head_dim",
               "d_ff_dense": "intermediate_size", "moe.num_experts": "num_experts", "moe.top_k": "num_experts_per_tok",
               "moe.d_ff_expert": "moe_intermediate_size (olmoe: intermediate_size)",
               "moe_every": "decoder_sparse_step", "qk_norm": "model_type", "qk_norm_scope": "model_type",
               "moe.norm_topk_prob": "norm_topk_prob", "norm_eps": "rms_norm_eps", "rope_theta": "rope_theta"}
# Keys whose presence (truthy) means an architecture feature we do not have.
_UNSUPPORTED_IF_SET = {
    "shared_expert_intermediate_size": "shared experts", "n_shared_experts": "shared experts",
    "num_shared_experts": "shared experts", "use_sliding_window": "sliding-window attention",
    "attention_bias": "attention biases", "mlp_bias": "MLP biases", "clip_qkv": "q/k/v clipping",
    "tie_word_embeddings": "tied embeddings (the model has an untied LM head)",
    "rope_scaling": "RoPE scaling (only plain RoPE)", "attention_dropout": "attention dropout",
    "mlp_only_layers": "dense layers at listed positions (only every decoder_sparse_step-th layer is MoE)",
}


def read_config(hf_dir: str) -> dict:
  path = os.path.join(hf_dir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no config.json in {hf_dir!r} (expected a Hugging Face model directory)")
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _require(hf: dict, key: str):
  if key not in hf:
    raise ValueError(f"config.json: missing key {key!r} (model_type={hf.get('model_type')!r})")
  return hf[key]


def _rope_theta(hf: dict) -> float:
  """`rope_theta`, or transformers>=5's `rope_parameters` (default RoPE only)."""
  params = hf.get("rope_parameters")
  if params:
    if params.get("rope_type", "default") != "default":
      raise ValueError(f"config.json: rope_parameters.rope_type={params['rope_type']!r} is not supported "
                       f"(only plain RoPE)")
    return float(params["rope_theta"])
  return float(_require(hf, "rope_theta"))


def _field(cfg: ModelConfig, name: str):
  """`name` as in ARCH_FIELDS: "d_model" or "moe.top_k"."""
  return getattr(cfg.moe, name[4:]) if name.startswith("moe.") else getattr(cfg, name)


def model_config_from_hf(hf: dict, **runtime) -> ModelConfig:
  """`config.json` dict -> ModelConfig (`runtime`: non-architecture fields, e.g. dtype, or `moe` whose
  run-time fields, e.g. slots_per_device, are kept)."""
  model_type = hf.get("model_type")
  if model_type not in SUPPORTED:
    raise ValueError(f"config.json: model_type={model_type!r} is not supported (supported: {', '.join(SUPPORTED)})")
  for key, what in _UNSUPPORTED_IF_SET.items():
    if hf.get(key):
      raise ValueError(f"config.json: {key}={hf[key]!r} is not supported: {what}")
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"config.json: hidden_act={hf['hidden_act']!r} is not supported (only 'silu' SwiGLU experts)")
  if not hf.get("num_experts"):
    raise ValueError(f"config.json: num_experts={hf.get('num_experts')!r}: not a mixture-of-experts model")
  heads = _require(hf, "num_attention_heads")
  hidden = _require(hf, "hidden_size")
  olmoe = model_type == "olmoe"
  expert_ff = _require(hf, "intermediate_size" if olmoe else "moe_intermediate_size")
  arch = dict(
      vocab_size=_require(hf, "vocab_size"), d_model=hidden, num_layers=_require(hf, "num_hidden_layers"),
      num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim") or hidden // heads, d_ff_dense=hf.get("intermediate_size", expert_ff),
      moe_every=1 if olmoe else hf.get("decoder_sparse_step", 1), qk_norm=True,
      qk_norm_scope="projection" if olmoe else "head", norm_eps=float(_require(hf, "rms_norm_eps")),
      rope_theta=_rope_theta(hf))
  moe = dataclasses.replace(runtime.pop("moe", ExpertsConfig()), num_experts=hf["num_experts"],
                            top_k=_require(hf, "num_experts_per_tok"), d_ff_expert=expert_ff,
                            norm_topk_prob=bool(hf.get("norm_topk_prob", False)))
  return ModelConfig(**{**runtime, **arch, "moe": moe})


def merge_with_overrides(hf: dict, current: ModelConfig, explicit: set[str], expert_devices: int) -> ModelConfig:
  """The checkpoint's architecture + our run-time fields from `current` (preset with `--set` applied).

  `explicit`: ModelConfig fields set with `--set model.<field>` ("d_model", "moe.top_k"); an architecture field
  set to a value
  that contradicts the checkpoint is refused. Slots not set explicitly keep `current`'s redundant slots
  per device over the checkpoint's E/D.
  """
  runtime = {f.name: getattr(current, f.name) for f in dataclasses.fields(ModelConfig) if f.name not in ARCH_FIELDS}
  cfg = model_config_from_hf(hf, **runtime)
  for name in sorted(explicit & set(ARCH_FIELDS)):
    if _field(current, name) != _field(cfg, name):
      raise ValueError(f"--set model.{name}={_field(current, name)!r} contradicts the checkpoint's config.json "
                       f"({ARCH_FIELDS[name]} gives {name.removeprefix('moe.')}={_field(cfg, name)!r}); "
                       f"drop the override")
  slots = current.moe.slots_per_device
  if "moe.slots_per_device" not in explicit and slots is not None:
    redundant = max(0, slots - current.moe.num_experts // expert_devices)
    moe = dataclasses.replace(cfg.moe, slots_per_device=cfg.moe.num_experts // expert_devices + redundant)
    cfg = dataclasses.replace(cfg, moe=moe)
  return cfg


def hf_config(cfg: ModelConfig, base: dict | None = None, torch_dtype: str | None = None) -> dict:
  """ModelConfig -> `config.json` dict, on top of `base` (the source checkpoint's, keeping e.g. token ids)."""
  if not cfg.qk_norm:
    raise ValueError("export: qk_norm=False has no Hugging Face counterpart (Qwen3-MoE and OLMoE both norm q/k)")
  model_type = "olmoe" if cfg.qk_norm_scope == "projection" else "qwen3_moe"
  out = dict(base or {})
  out.update(architectures=[ARCHITECTURES[model_type]], model_type=model_type, vocab_size=cfg.vocab_size,
             hidden_size=cfg.d_model, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
             num_key_value_heads=cfg.num_kv_heads, hidden_act="silu", num_experts=cfg.moe.num_experts,
             num_experts_per_tok=cfg.moe.top_k, norm_topk_prob=cfg.moe.norm_topk_prob, rms_norm_eps=cfg.norm_eps,
             rope_theta=cfg.rope_theta, rope_scaling=None, attention_bias=False, attention_dropout=0.0,
             tie_word_embeddings=False, torch_dtype=torch_dtype or cfg.param_dtype)
  out.setdefault("max_position_embeddings", cfg.max_seq_len)
  if model_type == "olmoe":
    if cfg.head_dim * cfg.num_heads != cfg.d_model or cfg.moe_every != 1:
      raise ValueError(f"export as olmoe needs head_dim * num_heads == d_model and moe_every == 1, got "
                       f"head_dim={cfg.head_dim}, num_heads={cfg.num_heads}, d_model={cfg.d_model}, "
                       f"moe_every={cfg.moe_every}")
    out.update(intermediate_size=cfg.moe.d_ff_expert, clip_qkv=None)
  else:
    out.update(head_dim=cfg.head_dim, intermediate_size=cfg.d_ff_dense, moe_intermediate_size=cfg.moe.d_ff_expert,
               decoder_sparse_step=cfg.moe_every, mlp_only_layers=[], use_sliding_window=False, sliding_window=None)
  return out
