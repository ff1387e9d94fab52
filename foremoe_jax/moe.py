"""Expert-parallel MoE FFN (Flax NNX): softmax top-k router, replay, placement-aware dispatch, SwiGLU.

Tokens are sharded over the batch axes ("data" and "expert" where present); expert weights `[E, ...]` are
sharded over "expert" (home layout). Dispatch runs inside `jax.shard_map`; a placement (`Tables`) moves
replicas between physical slots without changing the math.

Config: `ExpertsConfig` holds the MoE-specific fields (experts, top-k, dispatch, capacity, backends) and is
what `ModelConfig.moe` nests, so `--set model.moe.num_experts=...` reaches the one definition.
`MoEConfig` adds d_model and the dtypes for a layer built on its own (tests, benchmarks);
`ModelConfig.moe_config()` fills them from the model, so no field is repeated between the two configs.
"""
import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import pallas_kernels
from foremoe_jax import backends
from foremoe_jax.dispatch import route, vary_over
from foremoe_jax.mesh import EXPERT_AXIS, batch_axes, expert_devices
from foremoe_jax.placement import Tables, home_tables
from foremoe_jax.planner.slots import check_layout
from foremoe_jax.transfer import working_slots_local


@dataclasses.dataclass(frozen=True)
class ExpertsConfig:
  """The MoE-specific fields, defined once: `ModelConfig.moe` holds one, `MoEConfig` extends it."""
  num_experts: int = 16
  top_k: int = 2
  d_ff_expert: int = 32  # each expert's SwiGLU hidden size
  slots_per_device: int | None = None  # default E / D (no redundant slots)
  dispatch: str = "auto"  # a token exchange of backends.DISPATCH, or "auto" (backends.choose_dispatch)
  capacity_factor: float = 2.0  # rows per (source, destination) over the even share (default capacity)
  norm_topk_prob: bool = True  # renormalize the top-k gates (Qwen3); False keeps the softmax values (OLMoE)
  gmm_backend: str | None = None  # pallas_kernels backend of the grouped matmuls; None picks by platform
  dispatch_backend: str | None = None  # pallas_kernels backend of permute/combine; None picks by platform


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoEConfig(ExpertsConfig):
  """A standalone layer's config: the expert fields plus what a model would otherwise supply."""
  d_model: int
  dtype: Any = jnp.float32  # expert matmul dtype
  param_dtype: Any = jnp.float32


class MoEOutput(NamedTuple):
  y: jax.Array  # [B, T, d_model]
  topk: jax.Array  # int32 [B, T, k]
  counts: jax.Array  # int32 [E] pairs routed to each logical expert (global)
  slot_counts: jax.Array  # int32 [D*S] pairs each physical slot processed
  aux_loss: jax.Array  # scalar switch-style load-balance loss
  dropped: jax.Array  # int32 scalar pairs dropped by a too-small capacity


def check_mesh(cfg: MoEConfig, mesh: jax.sharding.Mesh) -> tuple[int, int]:
  """Returns (D, S) or raises ValueError naming the problem."""
  num_devices = expert_devices(mesh)
  if num_devices is None:
    raise ValueError(f"the mesh needs an axis named {EXPERT_AXIS!r}, got {mesh.axis_names}")
  return num_devices, check_layout(cfg.num_experts, num_devices, cfg.slots_per_device, cfg.top_k)


def default_capacity(cfg: MoEConfig, local_tokens: int, num_devices: int) -> int:
  """Rows per (source, destination): the even share times the capacity factor, 8-aligned."""
  pairs = local_tokens * cfg.top_k
  cap = math.ceil(pairs / num_devices * cfg.capacity_factor / 8) * 8
  return max(8, min(cap, math.ceil(pairs / 8) * 8))


def swiglu_experts(rows_RxH, group_sizes_S, w_gate_up_SxHx2F, w_down_SxFxH, dtype, backend, axes=()):
  """SwiGLU over rows grouped by slot: down(silu(gate) * up). `axes`: the mesh axes tokens vary over."""
  gmm = functools.partial(pallas_kernels.gmm, backend=backend) if backend else pallas_kernels.gmm
  rows_RxH, w_gate_up_SxHx2F, w_down_SxFxH = vary_over(axes, rows_RxH, w_gate_up_SxHx2F, w_down_SxFxH)
  h_Rx2F = gmm(rows_RxH.astype(dtype), w_gate_up_SxHx2F.astype(dtype), group_sizes_S)
  gate_RxF, up_RxF = jnp.split(h_Rx2F, 2, axis=-1)
  act_RxF = (jax.nn.silu(gate_RxF.astype(jnp.float32)) * up_RxF.astype(jnp.float32)).astype(dtype)
  return gmm(act_RxF, w_down_SxFxH.astype(dtype), group_sizes_S)


class MoE(nnx.Module):
  """`out = moe(x_BxTxH, tables=None, replay=None)`; see `MoEOutput`."""

  def __init__(self, cfg: MoEConfig, *, mesh: jax.sharding.Mesh, rngs: nnx.Rngs):
    self.cfg = cfg
    self.mesh = mesh
    backends.check_backends(cfg.dispatch, cfg.gmm_backend, cfg.dispatch_backend, "MoEConfig.")
    self.num_devices, self.slots = check_mesh(cfg, mesh)
    e, h, f = cfg.num_experts, cfg.d_model, cfg.d_ff_expert
    home = NamedSharding(mesh, P(EXPERT_AXIS))

    def init(shape, fan_in, sharding):
      w = jax.random.normal(rngs.params(), shape, jnp.float32) / np.sqrt(fan_in)  # f32 scale, then cast
      w = w.astype(cfg.param_dtype)
      return jax.device_put(w, sharding)

    self.router = nnx.Param(init((h, e), h, NamedSharding(mesh, P())))
    self.w_gate_up = nnx.Param(init((e, h, 2 * f), h, home))
    self.w_down = nnx.Param(init((e, f, h), f, home))

  def expert_weights(self) -> tuple[nnx.Param, nnx.Param]:
    """The home expert weights (w_gate_up [E, H, 2F], w_down [E, F, H]; a scanned model's stacked
    [L, E, ...]), in the order the transfer and `working=` take them (`contracts.ExpertLayer`)."""
    return self.w_gate_up, self.w_down

  def __call__(self, x_BxTxH: jax.Array, tables: Tables | None = None, replay: jax.Array | None = None,
               *, capacity: int | None = None, working=None, token_mask: jax.Array | None = None) -> MoEOutput:
    """`capacity`: rows per (source, destination), static (each exchange of `backends.DISPATCH` says how it
    uses it); `working`: precomputed (w_gate_up [D*S, H, 2F], w_down [D*S, F, H]) slots from the transfer
    engine, else built here; `token_mask` bool [B, T]: False tokens (packed rows' padding) are routed
    nowhere: output 0, in no count, no dispatch row, no aux-loss term."""
    cfg, mesh = self.cfg, self.mesh
    b, t, h = x_BxTxH.shape
    if h != cfg.d_model:
      raise ValueError(f"x has hidden size {h}, expected d_model={cfg.d_model}")
    axes = batch_axes(mesh)
    shards = math.prod(mesh.shape[a] for a in axes)
    if b % shards:
      raise ValueError(f"batch {b} is not divisible by the {shards} devices of the batch axes {axes}")
    if replay is not None:
      check_replay(replay, (b, t, cfg.top_k), cfg.num_experts)
    if token_mask is not None and tuple(token_mask.shape) != (b, t):
      raise ValueError(f"token_mask must have shape {(b, t)} ([B, T]), got {tuple(token_mask.shape)}")
    if tables is None:
      tables = home_tables(cfg.num_experts, self.num_devices, self.slots)
    if tables.slot_expert_G.shape != (self.num_devices * self.slots,):
      raise ValueError(f"tables are for {tables.slot_expert_G.shape[0]} slots, this layer has "
                       f"D*S = {self.num_devices * self.slots}")
    mode = backends.choose_dispatch(cfg.dispatch)
    local_tokens = b // shards * t
    if capacity is None:
      capacity = default_capacity(cfg, local_tokens, self.num_devices)
    if working is None:
      working = (None, None)
    fn = functools.partial(self._local, mode=mode, capacity=capacity, axes=axes,
                           total_tokens=b * t, replayed=replay is not None, masked=token_mask is not None)
    bspec = P(axes)
    wspec = P(EXPERT_AXIS)
    out = jax.shard_map(
        fn, mesh=mesh,
        in_specs=(bspec, P(), wspec, wspec, P(), P(), bspec, wspec, wspec, bspec),
        out_specs=MoEOutput(bspec, bspec, P(), P(), P(), P()),
    )(x_BxTxH, self.router[...], self.w_gate_up[...], self.w_down[...], tables.slot_expert_G,
      tables.slot_share_DxG, replay, *working, token_mask)
    return out

  def _local(self, x_bxTxH, router_HxE, w_gate_up_home, w_down_home, slot_expert_G, share_DxG, replay,
             w_gate_up_work, w_down_work, token_mask, *, mode, capacity, axes, total_tokens, replayed, masked):
    cfg = self.cfg
    b, t, h = x_bxTxH.shape
    k, e = cfg.top_k, cfg.num_experts
    x_NxH = x_bxTxH.reshape(b * t, h)
    logits_NxE = x_NxH.astype(jnp.float32) @ router_HxE.astype(jnp.float32)
    probs_NxE = jax.nn.softmax(logits_NxE, axis=-1)
    if replayed:
      topk_NxK = replay.reshape(b * t, k).astype(jnp.int32)
    else:
      topk_NxK = jax.lax.top_k(probs_NxE, k)[1].astype(jnp.int32)
    gate_NxK = jnp.take_along_axis(probs_NxE, topk_NxK, axis=1)
    if cfg.norm_topk_prob:
      gate_NxK = gate_NxK / gate_NxK.sum(axis=1, keepdims=True)

    if w_gate_up_work is None:
      w_gate_up_work = working_slots_local(w_gate_up_home, slot_expert_G, self.slots)
      w_down_work = working_slots_local(w_down_home, slot_expert_G, self.slots)
    expert_fn = functools.partial(swiglu_experts, w_gate_up_SxHx2F=w_gate_up_work, w_down_SxFxH=w_down_work,
                                  axes=axes, dtype=cfg.dtype, backend=cfg.gmm_backend)
    expert_P = topk_NxK.reshape(-1)
    if masked:  # expert id e: a pair routed nowhere (`route` puts it after every real pair)
      valid_N = token_mask.reshape(b * t)
      expert_P = jnp.where(jnp.repeat(valid_N, k), expert_P, e)
    me = jax.lax.axis_index(EXPERT_AXIS)
    routing = route(expert_P, slot_expert_G, share_DxG[me], e, masked=masked)
    exchange = backends.DISPATCH[mode].exchange
    y_NxH, group_sizes_S, dropped = exchange(x_NxH, gate_NxK, routing, self.slots, capacity, expert_fn,
                                             cfg.dispatch_backend, masked=masked)

    counts_E = jax.lax.psum(jnp.bincount(expert_P, length=e).astype(jnp.int32), axes)
    # A psum of one-hot blocks (all_gather's result is not marked replicated).
    slot_counts_G = jnp.zeros(self.num_devices * self.slots, jnp.int32)
    slot_counts_G = jax.lax.dynamic_update_slice(slot_counts_G, group_sizes_S, (me * self.slots,))
    slot_counts_G = jax.lax.psum(slot_counts_G, axes)
    if masked:  # the switch loss over real tokens only
      total_tokens = jnp.maximum(jax.lax.psum(valid_N.sum(), axes), 1)
      probs_NxE = jnp.where(valid_N[:, None], probs_NxE, 0.0)
    mean_prob_E = jax.lax.psum(probs_NxE.sum(axis=0), axes) / total_tokens
    aux_loss = e * jnp.sum(counts_E / (total_tokens * k) * mean_prob_E)
    return MoEOutput(y_NxH.astype(x_bxTxH.dtype).reshape(b, t, h), topk_NxK.reshape(b, t, k), counts_E,
                     slot_counts_G, aux_loss, jax.lax.psum(dropped.astype(jnp.int32), axes))


def check_replay(replay, shape: tuple[int, ...], num_experts: int) -> None:
  """Shape and dtype always; values too when the array is concrete (not traced)."""
  if tuple(replay.shape) != shape:
    raise ValueError(f"replay must have shape {shape} ([B, T, k]), got {tuple(replay.shape)}")
  if not jnp.issubdtype(replay.dtype, jnp.integer):
    raise ValueError(f"replay must hold integer expert ids, got dtype {replay.dtype}")
  if not isinstance(replay, jax.core.Tracer):
    values = np.asarray(replay)
    if values.size and (values.min() < 0 or values.max() >= num_experts):
      raise ValueError(f"replay expert ids must be in [0, {num_experts}), got [{values.min()}, {values.max()}]")
    if has_duplicate_ids(values):
      raise ValueError("replay repeats an expert within one token's top-k")


def has_duplicate_ids(topk_xK: np.ndarray) -> bool:
  s = np.sort(topk_xK.reshape(-1, topk_xK.shape[-1]), axis=-1)
  return bool(np.any(s[:, 1:] == s[:, :-1]))
