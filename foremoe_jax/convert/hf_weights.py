"""Hugging Face safetensors <-> our Flax NNX `Model` parameters (Qwen3-MoE and OLMoE share the names).

Loading is lazy and shard-aware: every parameter is built with `jax.make_array_from_callback`, so a
device's callback reads only the HF tensors of its slice; expert weights are sharded over "expert" in the
home layout, so a process reads only the experts its devices own. HF `Linear` weights are `[out, in]`,
ours `[in, out]`; per-expert `gate_proj` / `up_proj` are fused into `w_gate_up [E, H, 2F]` (gate first).
"""
import json
import math
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from foremoe_jax.atomic import atomic_path, write_json
from foremoe_jax.convert.hf_config import hf_config
from foremoe_jax.mesh import EXPERT_AXIS
from foremoe_jax.model import Model, ModelConfig

INDEX = "model.safetensors.index.json"
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints saved; recomputed here


class Spec(NamedTuple):
  """One of our parameters and the HF tensors it is made of."""
  path: tuple  # nnx state path, e.g. ("blocks", 0, "attn", "wq")
  names: tuple[str, ...]  # HF tensor names; "{e}" stands for the expert index
  kind: str  # "copy" | "linear" ([out, in] -> [in, out]) | "gate_up" (gate, up -> [in, 2 * out])
  shape: tuple[int, ...]  # ours (per expert when experts > 0)
  hf_shape: tuple[int, ...]  # of each HF tensor
  experts: int = 0  # E: stacked over experts and sharded over "expert"; 0: replicated

  def hf_names(self, e: int | None = None) -> list[str]:
    return [n.format(e=e) for n in self.names]


def _linear(path, name, shape, hf_shape, experts=0) -> Spec:
  return Spec(path, (name,), "linear", shape, hf_shape, experts)


def _copy(path, name, shape) -> Spec:
  return Spec(path, (name,), "copy", shape, shape)


def tensor_specs(cfg: ModelConfig) -> list[Spec]:
  """Every parameter of `Model(cfg)` in HF checkpoint order."""
  h, n, kv, d, v = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size
  e = cfg.moe.num_experts
  q_dim, k_dim = (d, d) if cfg.qk_norm_scope == "head" else (n * d, kv * d)
  specs = [_copy(("embed",), "model.embed_tokens.weight", (v, h))]
  for i in range(cfg.num_layers):
    pre, blk = f"model.layers.{i}.", ("blocks", i)
    specs += [_copy(blk + ("attn_norm", "scale"), pre + "input_layernorm.weight", (h,)),
              _linear(blk + ("attn", "wq"), pre + "self_attn.q_proj.weight", (h, n, d), (n * d, h)),
              _linear(blk + ("attn", "wk"), pre + "self_attn.k_proj.weight", (h, kv, d), (kv * d, h)),
              _linear(blk + ("attn", "wv"), pre + "self_attn.v_proj.weight", (h, kv, d), (kv * d, h)),
              _linear(blk + ("attn", "wo"), pre + "self_attn.o_proj.weight", (n, d, h), (h, n * d))]
    if cfg.qk_norm:
      specs += [_copy(blk + ("attn", "q_norm", "scale"), pre + "self_attn.q_norm.weight", (q_dim,)),
                _copy(blk + ("attn", "k_norm", "scale"), pre + "self_attn.k_norm.weight", (k_dim,))]
    specs.append(_copy(blk + ("ffn_norm", "scale"), pre + "post_attention_layernorm.weight", (h,)))
    if i in cfg.moe_layer_ids:
      f, mlp = cfg.moe.d_ff_expert, pre + "mlp.experts.{e}."
      specs += [_linear(blk + ("ffn", "router"), pre + "mlp.gate.weight", (h, e), (e, h)),
                Spec(blk + ("ffn", "w_gate_up"), (mlp + "gate_proj.weight", mlp + "up_proj.weight"), "gate_up",
                     (h, 2 * f), (f, h), e),
                _linear(blk + ("ffn", "w_down"), mlp + "down_proj.weight", (f, h), (h, f), e)]
    else:
      f, mlp = cfg.d_ff_dense, pre + "mlp."
      specs += [Spec(blk + ("ffn", "w_gate_up"), (mlp + "gate_proj.weight", mlp + "up_proj.weight"), "gate_up",
                     (h, 2 * f), (f, h)),
                _linear(blk + ("ffn", "w_down"), mlp + "down_proj.weight", (f, h), (h, f))]
  specs += [_copy(("final_norm", "scale"), "model.norm.weight", (h,)),
            _linear(("lm_head",), "lm_head.weight", (h, v), (v, h))]
  return specs


def to_ours(spec: Spec, arrays: list[np.ndarray]) -> np.ndarray:
  if spec.kind == "copy":
    return arrays[0].reshape(spec.shape)
  if spec.kind == "linear":
    return arrays[0].T.reshape(spec.shape)
  return np.concatenate([a.T for a in arrays], axis=-1)


def to_hf(spec: Spec, ours: np.ndarray) -> list[np.ndarray]:
  if spec.kind == "copy":
    return [ours.reshape(spec.hf_shape)]
  if spec.kind == "linear":
    return [np.ascontiguousarray(ours.reshape(spec.hf_shape[::-1]).T)]
  return [np.ascontiguousarray(a.T) for a in np.split(ours, 2, axis=-1)]


class Checkpoint:
  """The safetensors files of an HF directory, opened lazily (headers first, tensors when read)."""

  def __init__(self, hf_dir: str):
    from safetensors import safe_open  # noqa: PLC0415  (a dependency only converters need)
    self._safe_open, self.dir, self._files = safe_open, hf_dir, {}
    index = os.path.join(hf_dir, INDEX)
    if os.path.isfile(index):
      with open(index, encoding="utf-8") as f:
        self.weight_map = json.load(f)["weight_map"]
      for name, file in sorted(self.weight_map.items(), key=lambda kv: kv[1]):
        if not os.path.isfile(os.path.join(hf_dir, file)):
          raise FileNotFoundError(f"{index} maps {name!r} to shard file {file!r}, which is missing from {hf_dir!r}")
    else:
      files = sorted(f for f in os.listdir(hf_dir) if f.endswith(".safetensors"))
      if not files:
        raise FileNotFoundError(f"no *.safetensors files (nor {INDEX}) in {hf_dir!r}")
      self.weight_map = {name: file for file in files for name in self._open(file).keys()}

  def _open(self, file: str):
    if file not in self._files:
      self._files[file] = self._safe_open(os.path.join(self.dir, file), framework="numpy")
    return self._files[file]

  def _file(self, name: str) -> str:
    if name not in self.weight_map:
      raise ValueError(f"tensor {name!r} is missing from the checkpoint in {self.dir!r}")
    return self.weight_map[name]

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._open(self._file(name)).get_slice(name).get_shape())

  def read(self, name: str) -> np.ndarray:
    return self._open(self._file(name)).get_tensor(name)

  def verify(self, specs: list[Spec]) -> None:
    """Every tensor the model needs exists with the expected shape, and none is left over. Headers only."""
    expected = set()
    for spec in specs:
      for e in range(spec.experts or 1):
        for name in spec.hf_names(e):
          expected.add(name)
          got = self.shape(name)
          if got != spec.hf_shape:
            raise ValueError(f"tensor {name!r} has shape {got} in the checkpoint, the config implies {spec.hf_shape}")
    extra = sorted(n for n in set(self.weight_map) - expected if not n.endswith(IGNORED_SUFFIXES))
    if extra:
      raise ValueError(f"the checkpoint has {len(extra)} tensors the model has no place for (biases, shared "
                       f"experts?), e.g. {extra[:3]}")


def _make_array(ckpt: Checkpoint, spec: Spec, mesh, dtype) -> jax.Array:
  """The parameter as a global array; each device's callback reads only the experts of its slice."""
  shape = (spec.experts, *spec.shape) if spec.experts else spec.shape
  read = {}  # devices holding the same slice (replicas, the data axis) share one read

  def callback(index):
    key = tuple(s.indices(n) for s, n in zip(index, shape))
    if key not in read:
      if spec.experts:
        experts = range(*index[0].indices(spec.experts))
        value = np.stack([to_ours(spec, [ckpt.read(n) for n in spec.hf_names(e)]) for e in experts])
        value = value[(slice(None), *index[1:])]
      else:
        value = to_ours(spec, [ckpt.read(n) for n in spec.names])[index]
      read[key] = value.astype(dtype)
    return read[key]
  return jax.make_array_from_callback(shape, NamedSharding(mesh, P(EXPERT_AXIS) if spec.experts else P()), callback)


def refuse_scanned(cfg: ModelConfig) -> None:
  """The HF mapping is per layer (`blocks[i]`); a scanned model's layers are stacked (`layers`, [L, ...])."""
  if cfg.scan_layers:
    raise ValueError("convert: ModelConfig.scan_layers=True is not supported by the HF load/export (it maps "
                     "unrolled blocks[i]); use scan_layers=False for conversion")


def load_model(hf_dir: str, cfg: ModelConfig, mesh: jax.sharding.Mesh) -> Model:
  """A `Model(cfg)` holding the checkpoint's weights, cast to `cfg.param_dtype`; nothing random is allocated.
  Shapes are checked against `cfg` (headers only) before any tensor is read."""
  refuse_scanned(cfg)
  specs = tensor_specs(cfg)
  ckpt = Checkpoint(hf_dir)
  ckpt.verify(specs)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Model(cfg, mesh=mesh, rngs=nnx.Rngs(0))))
  params = dict(nnx.to_flat_state(state))
  ours = {path: tuple(v.shape) for path, v in params.items()}
  mapped = {s.path: (s.experts, *s.shape) if s.experts else s.shape for s in specs}
  if ours != mapped:  # a model change this converter does not know about
    diff = sorted(set(ours.items()) ^ set(mapped.items()))
    raise ValueError(f"convert: model parameters and HF mapping differ: {diff}")
  dtype = jnp.dtype(cfg.param_dtype)
  for spec in specs:
    params[spec.path].set_value(_make_array(ckpt, spec, mesh, dtype))
  return nnx.merge(graphdef, state)


def _to_host(x: jax.Array) -> np.ndarray:
  if x.is_fully_addressable:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def export_model(model: Model, out_dir: str, *, base_config: dict | None = None, dtype: str | None = None,
                 max_shard_bytes: int = 5 * 2**30) -> list[str]:
  """Writes `config.json` and safetensors shards (with `model.safetensors.index.json` when more than one)
  in HF naming. One parameter on the host at a time; process 0 writes. Returns the files written."""
  from safetensors.numpy import save_file  # noqa: PLC0415
  cfg = model.cfg
  refuse_scanned(cfg)
  dtype = jnp.dtype(dtype or cfg.param_dtype)
  config = hf_config(cfg, base_config, dtype.name)
  specs = tensor_specs(cfg)
  shards, size = [[]], 0
  for spec in specs:
    nbytes = math.prod(spec.shape) * max(spec.experts, 1) * dtype.itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(spec)
    size += nbytes
  params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  writer = jax.process_index() == 0
  if writer:
    os.makedirs(out_dir, exist_ok=True)
  files, weight_map = [], {}
  for i, group in enumerate(shards):
    file = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    tensors = {}
    for spec in group:
      value = _to_host(params[spec.path][...]).astype(dtype)
      for e in range(spec.experts or 1):
        tensors.update(zip(spec.hf_names(e), to_hf(spec, value[e] if spec.experts else value)))
    weight_map.update(dict.fromkeys(tensors, file))
    if writer:
      with atomic_path(os.path.join(out_dir, file)) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    files.append(file)
  if writer:
    if len(shards) > 1:
      total = sum(math.prod(s.shape) * max(s.experts, 1) for s in specs) * dtype.itemsize
      write_json(os.path.join(out_dir, INDEX), {"metadata": {"total_size": total}, "weight_map": weight_map},
                 indent=2)
      files.append(INDEX)
    write_json(os.path.join(out_dir, "config.json"), config, indent=2)
  return files + ["config.json"]

