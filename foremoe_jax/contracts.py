"""What the executor needs of a model: the expert-parallel contract, and the helpers that read it.

A model the executor can run (`ExpertParallelModel`) is an `nnx.Module` that
- is called as `model(inputs, tables, replay, *, capacity=, working=)`: `tables` the per-MoE-layer
  placements (leading L axis), `replay` the captured top-k, `capacity` the padded dispatch's rows per
  (source, destination), `working` None or one tuple of working-slot arrays per MoE layer;
- lists its MoE layers (`moe_layers()`), each an `ExpertLayer`: its geometry (`cfg.num_experts`,
  `num_devices`, `slots`) and its home expert weights (`expert_weights()`: nnx Variables `[E, in, out]`
  sharded over the expert axis, or `[L, E, in, out]` for a scanned model's L stacked layers).
The executor finds expert weights through `expert_weights()`, by identity, never by attribute names.
"""
import inspect
from typing import Any, Callable, Protocol, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

LAYER_RANK = 3  # one layer's expert weight: [E, in, out]; one more leading axis: stacked layers


class ExpertLayer(Protocol):
  cfg: Any  # .num_experts
  num_devices: int  # D, the expert axis' size
  slots: int  # S, working slots per device

  def expert_weights(self) -> tuple[nnx.Variable, ...]: ...


class ExpertParallelModel(Protocol):
  def __call__(self, inputs, tables=None, replay=None, *, capacity=None, working=None) -> Any: ...

  def moe_layers(self) -> Sequence[ExpertLayer]: ...


def _fail(model, what: str):
  raise TypeError(f"{type(model).__name__} does not meet the executor's model contract "
                  f"(foremoe_jax.contracts.ExpertParallelModel): {what}")


def check_model(model) -> None:
  """Raises a TypeError naming the first piece of `ExpertParallelModel` that `model` lacks."""
  if not isinstance(model, nnx.Module):
    _fail(model, "it is not an nnx.Module")
  try:
    params = set(inspect.signature(model.__call__).parameters)
  except (TypeError, ValueError):
    params = set()
  if missing := [k for k in ("capacity", "working") if k not in params]:
    _fail(model, f"its __call__ takes no {' or '.join(f'{k}=' for k in missing)} keyword")
  if not callable(getattr(model, "moe_layers", None)):
    _fail(model, "it has no moe_layers() method")
  layers = list(model.moe_layers())
  if not layers:
    _fail(model, "moe_layers() is empty")
  variables = {id(node) for _, node in nnx.iter_graph(model) if isinstance(node, nnx.Variable)}
  for i, layer in enumerate(layers):
    for attr in ("num_devices", "slots"):
      if not isinstance(getattr(layer, attr, None), int):
        _fail(model, f"MoE layer {i} has no int `{attr}`")
    if not isinstance(getattr(getattr(layer, "cfg", None), "num_experts", None), int):
      _fail(model, f"MoE layer {i} has no cfg.num_experts")
    if not callable(getattr(layer, "expert_weights", None)):
      _fail(model, f"MoE layer {i} has no expert_weights() method")
    weights = tuple(layer.expert_weights())
    if not weights or not all(isinstance(w, nnx.Variable) for w in weights):
      _fail(model, f"MoE layer {i}'s expert_weights() must return nnx Variables, got {weights!r:.80}")
    if any(id(w) not in variables for w in weights):
      _fail(model, f"MoE layer {i}'s expert weights are not the model's own Variables")
    shapes = [tuple(w.get_value().shape) for w in weights]
    stacked = len(shapes[0]) - LAYER_RANK
    if stacked not in (0, 1) or any(len(s) != len(shapes[0]) or s[:stacked + 1] != shapes[0][:stacked + 1]
                                    for s in shapes):
      _fail(model, f"MoE layer {i}'s expert weights must all be [E, in, out] or all [L, E, in, out], got {shapes}")
    if shapes[0][stacked] != layer.cfg.num_experts:
      _fail(model, f"MoE layer {i}'s expert weights have {shapes[0][stacked]} experts, cfg.num_experts is "
            f"{layer.cfg.num_experts}")


def layers_in(layer: ExpertLayer) -> int:
  """How many MoE layers `layer` holds: 1, or L for stacked [L, E, ...] weights."""
  shape = layer.expert_weights()[0].get_value().shape
  return shape[0] if len(shape) > LAYER_RANK else 1


def layer_weights(model: ExpertParallelModel) -> list[tuple[jax.Array, ...]]:
  """The home expert weights of each MoE layer, `[E, in, out]` each: stacked layers come sliced."""
  out = []
  for layer in model.moe_layers():
    values = [w[...] for w in layer.expert_weights()]
    stacked = len(values[0].shape) > LAYER_RANK
    out += [tuple(v[l] for v in values) for l in range(values[0].shape[0])] if stacked else [tuple(values)]
  return out


def layer_abstract(model: ExpertParallelModel) -> list[tuple[jax.ShapeDtypeStruct, ...]]:
  """`layer_weights`' shapes, dtypes and shardings, read without slicing: the model may be abstract
  (ShapeDtypeStruct values), and inside a trace a scanned model's slices are tracers without a sharding."""
  out = []
  for layer in model.moe_layers():
    values = [w.get_value() for w in layer.expert_weights()]
    n = len(values[0].shape) - LAYER_RANK  # 1: stacked layers, whose slices drop the layer axis' spec
    shardings = [NamedSharding(v.sharding.mesh, P(*v.sharding.spec[1:]), memory_kind=v.sharding.memory_kind)
                 if n else v.sharding for v in values]
    out += [tuple(jax.ShapeDtypeStruct(v.shape[n:], v.dtype, sharding=s) for v, s in zip(values, shardings))
            ] * layers_in(layer)
  return out


def set_layer_weights(model: ExpertParallelModel, per_layer: Sequence[tuple[jax.Array, ...]]) -> None:
  """The inverse of `layer_weights`: sets every MoE layer's expert weights (stacking them back for a
  scanned model's layers)."""
  per_layer = list(per_layer)
  need = sum(layers_in(layer) for layer in model.moe_layers())
  if len(per_layer) != need:
    raise ValueError(f"set_layer_weights: {len(per_layer)} layers' weights for a model of {need} MoE layers")
  rest = iter(per_layer)
  for layer in model.moe_layers():
    weights, n = layer.expert_weights(), layers_in(layer)
    group = [next(rest) for _ in range(n)]
    if len(weights[0].get_value().shape) > LAYER_RANK:
      group = [tuple(map(jnp.stack, zip(*group)))]
    for w, value in zip(weights, group[0], strict=True):
      w.set_value(value)


def expert_paths(module, layers: Sequence[ExpertLayer]) -> set[tuple]:
  """Graph paths (as `nnx.iter_graph` names them) in `module` of the expert weights of `layers`."""
  ids = {id(w) for layer in layers for w in layer.expert_weights()}
  return {tuple(path) for path, node in nnx.iter_graph(module) if id(node) in ids}


def expert_weight_filter(model: ExpertParallelModel) -> Callable[[tuple, Any], bool]:
  """nnx filter of the MoE layers' home expert weights. The loss reads working slots instead, so their
  gradients come only through the base transfer's transpose: a float32 accumulator for the loss's zeros
  would double the accumulators' memory."""
  paths = expert_paths(model, model.moe_layers())
  return lambda path, _: tuple(path) in paths
