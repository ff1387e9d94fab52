"""Tiny random checkpoints in exact Hugging Face naming, and a float64 numpy forward written from the HF
modeling code of Qwen3-MoE and OLMoE (the test oracle for `foremoe_jax.convert`)."""
import json
import os

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

QWEN3 = dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], vocab_size=40, hidden_size=32,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=48,
             moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
             decoder_sparse_step=1, mlp_only_layers=[], hidden_act="silu", rms_norm_eps=1e-6, rope_theta=1e6,
             rope_scaling=None, attention_bias=False, attention_dropout=0.0, use_sliding_window=False,
             sliding_window=None, tie_word_embeddings=False, max_position_embeddings=64, bos_token_id=1,
             eos_token_id=2, torch_dtype="bfloat16")
OLMOE = dict(model_type="olmoe", architectures=["OlmoeForCausalLM"], vocab_size=40, hidden_size=32,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=16, num_experts=8,
             num_experts_per_tok=2, norm_topk_prob=False, hidden_act="silu", rms_norm_eps=1e-5, rope_theta=1e4,
             rope_scaling=None, attention_bias=False, attention_dropout=0.0, clip_qkv=None,
             tie_word_embeddings=False, max_position_embeddings=64, pad_token_id=1, eos_token_id=2,
             torch_dtype="float32")


def dims(hf):
  n, kv = hf["num_attention_heads"], hf["num_key_value_heads"]
  return n, kv, hf.get("head_dim") or hf["hidden_size"] // n


def is_moe(hf, i):
  return (i + 1) % hf.get("decoder_sparse_step", 1) == 0


def random_weights(hf, seed=0) -> dict[str, np.ndarray]:
  """Every tensor of the architecture, HF names and `[out, in]` shapes; norm weights near 1."""
  rng = np.random.default_rng(seed)
  h, v, e = hf["hidden_size"], hf["vocab_size"], hf["num_experts"]
  n, kv, d = dims(hf)
  olmoe = hf["model_type"] == "olmoe"
  f_exp = hf["intermediate_size"] if olmoe else hf["moe_intermediate_size"]

  def lin(out, inp):
    return rng.standard_normal((out, inp)) / np.sqrt(inp)

  def norm(size):
    return 1.0 + 0.2 * rng.standard_normal(size)
  w = {"model.embed_tokens.weight": rng.standard_normal((v, h))}
  for i in range(hf["num_hidden_layers"]):
    p = f"model.layers.{i}."
    w |= {p + "input_layernorm.weight": norm(h), p + "post_attention_layernorm.weight": norm(h),
          p + "self_attn.q_proj.weight": lin(n * d, h), p + "self_attn.k_proj.weight": lin(kv * d, h),
          p + "self_attn.v_proj.weight": lin(kv * d, h), p + "self_attn.o_proj.weight": lin(h, n * d),
          p + "self_attn.q_norm.weight": norm(n * d if olmoe else d),
          p + "self_attn.k_norm.weight": norm(kv * d if olmoe else d)}
    if is_moe(hf, i):
      w[p + "mlp.gate.weight"] = lin(e, h)
      for x in range(e):
        q = f"{p}mlp.experts.{x}."
        w |= {q + "gate_proj.weight": lin(f_exp, h), q + "up_proj.weight": lin(f_exp, h),
              q + "down_proj.weight": lin(h, f_exp)}
    else:
      f = hf["intermediate_size"]
      w |= {p + "mlp.gate_proj.weight": lin(f, h), p + "mlp.up_proj.weight": lin(f, h),
            p + "mlp.down_proj.weight": lin(h, f)}
  w |= {"model.norm.weight": norm(h), "lm_head.weight": lin(v, h)}
  dtype = ml_dtypes.bfloat16 if hf.get("torch_dtype") == "bfloat16" else np.float32
  return {k: a.astype(dtype) for k, a in w.items()}


def write_checkpoint(path, hf, weights, num_shards=1) -> None:
  """`config.json` + safetensors; with several shards also `model.safetensors.index.json`."""
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf, f)
  if num_shards == 1:
    save_file(weights, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    return
  names = list(weights)
  weight_map = {}
  for s, chunk in enumerate(np.array_split(np.arange(len(names)), num_shards)):
    file = f"model-{s + 1:05d}-of-{num_shards:05d}.safetensors"
    save_file({names[j]: weights[names[j]] for j in chunk}, os.path.join(path, file), metadata={"format": "pt"})
    weight_map |= {names[j]: file for j in chunk}
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)


# --- float64 forward, following transformers' modeling_qwen3_moe.py / modeling_olmoe.py -------------------
def rms_norm(x, w, eps):
  return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def rotate_half(x):
  half = x.shape[-1] // 2
  return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x_TxNxD, theta):
  t, _, d = x_TxNxD.shape
  inv_freq = 1.0 / theta ** (np.arange(0, d, 2) / d)
  freqs = np.arange(t)[:, None] * inv_freq[None]
  emb = np.concatenate([freqs, freqs], axis=-1)[:, None, :]
  return x_TxNxD * np.cos(emb) + rotate_half(x_TxNxD) * np.sin(emb)


def silu(x):
  return x / (1.0 + np.exp(-x))


def decoder_layer(hf, w, i, x_TxH):
  """One decoder layer of one sequence -> (x_TxH, top-k experts [T, k] or None)."""
  p, eps, olmoe = f"model.layers.{i}.", hf["rms_norm_eps"], hf["model_type"] == "olmoe"
  n, kv, d = dims(hf)
  t = x_TxH.shape[0]
  h = rms_norm(x_TxH, w[p + "input_layernorm.weight"], eps)
  q, k, v = (h @ w[p + f"self_attn.{m}_proj.weight"].T for m in "qkv")
  if olmoe:  # OLMoE norms the whole projection before the head split
    q, k = rms_norm(q, w[p + "self_attn.q_norm.weight"], eps), rms_norm(k, w[p + "self_attn.k_norm.weight"], eps)
  q, k, v = q.reshape(t, n, d), k.reshape(t, kv, d), v.reshape(t, kv, d)
  if not olmoe:  # Qwen3 norms each head
    q, k = rms_norm(q, w[p + "self_attn.q_norm.weight"], eps), rms_norm(k, w[p + "self_attn.k_norm.weight"], eps)
  q, k = apply_rope(q, hf["rope_theta"]), apply_rope(k, hf["rope_theta"])
  k, v = np.repeat(k, n // kv, axis=1), np.repeat(v, n // kv, axis=1)  # repeat_kv
  s = np.einsum("tnd,snd->nts", q, k) / np.sqrt(d)
  s = np.where(np.tril(np.ones((t, t), bool))[None], s, -np.inf)
  prob = np.exp(s - s.max(-1, keepdims=True))
  prob /= prob.sum(-1, keepdims=True)
  o = np.einsum("nts,snd->tnd", prob, v).reshape(t, n * d)
  x_TxH = x_TxH + o @ w[p + "self_attn.o_proj.weight"].T
  h = rms_norm(x_TxH, w[p + "post_attention_layernorm.weight"], eps)

  def mlp(prefix, x):
    return (silu(x @ w[prefix + "gate_proj.weight"].T) * (x @ w[prefix + "up_proj.weight"].T)) @ \
        w[prefix + "down_proj.weight"].T
  if not is_moe(hf, i):
    return x_TxH + mlp(p + "mlp.", h), None
  logits = h @ w[p + "mlp.gate.weight"].T
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  topk = np.argsort(-probs, axis=-1, kind="stable")[:, :hf["num_experts_per_tok"]]
  gates = np.take_along_axis(probs, topk, axis=-1)
  if hf["norm_topk_prob"]:
    gates /= gates.sum(-1, keepdims=True)
  y = np.zeros_like(h)
  for r in range(t):
    for g, ex in zip(gates[r], topk[r]):
      y[r] += g * mlp(f"{p}mlp.experts.{ex}.", h[r])
  return x_TxH + y, topk


def forward(hf, weights, tokens_BxT):
  """-> (logits [B, T, V], routes [B, T, L_moe, k]) in float64."""
  w = {k: np.asarray(a, np.float64) for k, a in weights.items()}
  logits, routes = [], []
  for row in tokens_BxT:
    x, chosen = w["model.embed_tokens.weight"][row], []
    for i in range(hf["num_hidden_layers"]):
      x, topk = decoder_layer(hf, w, i, x)
      if topk is not None:
        chosen.append(topk)
    logits.append(rms_norm(x, w["model.norm.weight"], hf["rms_norm_eps"]) @ w["lm_head.weight"].T)
    routes.append(np.stack(chosen, axis=1))
  return np.stack(logits), np.stack(routes)
