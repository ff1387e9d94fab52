"""Qwen3-MoE-style decoder: embedding, L blocks of (RMSNorm -> GQA attention -> RMSNorm -> FFN), final
RMSNorm, untied LM head. The FFN is the expert-parallel `MoE` in every `moe_every`-th block, a dense
SwiGLU otherwise. Attention and dense parts are plain jnp under jit (tokens sharded over the batch axes);
only the MoE dispatch runs inside `shard_map`.

Forward for training: `model(tokens_BxT, tables, replay)` -> `ModelOutput` (logits, per-layer routes).
Long rows: `model(..., logits=False)` skips the float32 [B, T, V] logits and returns the final hidden states
(`out.hidden`), from which `rl.grpo.chunked_token_logprobs(out.hidden, model.lm_head[...], tokens, ...,
chunk=cfg.logprob_chunk)` computes the log-probs a chunk of columns at a time.
Packed rows (several sequences back to back, `rl/packing.py`): `model(tokens_BxT, tables, replay,
segment_ids=seg_BxT, positions=pos_BxT)`: attention stays within a segment, RoPE uses the per-token
positions, and the MoE layers route padding (segment 0) nowhere.
Decoding: `cache = model.init_cache(B, S)`, `model.prefill(prompt_BxP, cache)` writes positions 0..P-1,
`model.decode(tokens_Bx1, cache, positions_B)` one token per row at its own position.

`scan_layers`: the blocks' parameters are stacked on a leading layer axis (`model.layers`, one `Block`) and
run under `jax.lax.scan`, so one block body is lowered and compiled whatever the depth; per-layer tables,
replay, working slots and the KV cache are scanned inputs; `scan_unroll` blocks run per loop iteration
(lax.scan's unroll). `remat="block"` recomputes each block's
activations in the backward pass (`jax.checkpoint` of the block body).

Config: the MoE fields live once, in `ModelConfig.moe` (an `ExpertsConfig`, `--set model.moe.<field>`);
`ModelConfig.moe_config()` extends them with the model's d_model and dtypes into the layer's `MoEConfig`.
"""
import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from foremoe_jax import backends, contracts
from foremoe_jax import mesh as mesh_lib
from foremoe_jax.attention import ATTENTION, Attention, KVCache, RMSNorm, init_param
from foremoe_jax.moe import ExpertsConfig, MoE, MoEConfig, check_replay
from foremoe_jax.placement import Tables
from foremoe_jax.planner.slots import check_layout


REMAT = ("none", "block")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int = 18
  d_model: int = 64
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 16
  d_ff_dense: int = 128
  moe: ExpertsConfig = ExpertsConfig()  # the MoE layers' fields (foremoe_jax/moe.py); --set model.moe.<field>
  moe_every: int = 1  # block i is MoE when (i + 1) % moe_every == 0 (Qwen's decoder_sparse_step)
  qk_norm: bool = True
  qk_norm_scope: str = "head"  # "head": RMSNorm over head_dim (Qwen3); "projection": over all of q / k (OLMoE)
  norm_eps: float = 1e-6  # every RMSNorm's epsilon (HF rms_norm_eps)
  rope_theta: float = 1e6
  max_seq_len: int = 64
  dtype: str = "float32"  # activations and matmuls
  param_dtype: str = "float32"
  scan_layers: bool = False  # stack the blocks on a layer axis and run them under lax.scan (needs moe_every=1)
  scan_unroll: int = 1  # blocks per scan iteration (lax.scan's unroll): compile time for scheduling freedom
  remat: str = "none"  # "none" | "block": recompute each block's activations in the backward pass
  attention: str = "auto"  # "auto" | "dense" | "blockwise" | "cudnn" (foremoe_jax/attention.py)
  attention_block: int = 512  # query / key block of the blockwise path
  logprob_chunk: int = 512  # columns per LM-head chunk of rl.grpo.chunked_token_logprobs

  @property
  def moe_layer_ids(self) -> tuple[int, ...]:
    return tuple(i for i in range(self.num_layers) if (i + 1) % self.moe_every == 0)

  def validate(self, expert_devices: int | None = None) -> "ModelConfig":
    """Raises ValueError naming the first bad field; `expert_devices` also checks E against D."""
    positive = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "d_ff_dense",
                "moe.num_experts", "moe.top_k", "moe.d_ff_expert", "moe_every", "max_seq_len", "attention_block",
                "logprob_chunk", "scan_unroll")
    for name in positive:
      value = getattr(self.moe, name[4:]) if name.startswith("moe.") else getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"ModelConfig: num_heads={self.num_heads} must be a multiple of "
                       f"num_kv_heads={self.num_kv_heads} (GQA)")
    if self.head_dim % 2:
      raise ValueError(f"ModelConfig: head_dim={self.head_dim} must be even (RoPE rotates pairs)")
    try:  # with D unknown, only top_k against E: D = 1 divides E and gives every expert a slot
      check_layout(self.moe.num_experts, expert_devices or 1, self.moe.slots_per_device if expert_devices else None,
                   self.moe.top_k)
    except ValueError as err:
      raise ValueError(f"ModelConfig: {err}") from None
    if not self.moe_layer_ids:
      raise ValueError(f"ModelConfig: moe_every={self.moe_every} > num_layers={self.num_layers} leaves no MoE layer")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"ModelConfig.{name} must be float32, bfloat16 or float16, got {getattr(self, name)!r}")
    if self.qk_norm_scope not in ("head", "projection"):
      raise ValueError(f"ModelConfig.qk_norm_scope must be 'head' or 'projection', got {self.qk_norm_scope!r}")
    if self.norm_eps <= 0:
      raise ValueError(f"ModelConfig: norm_eps must be > 0, got {self.norm_eps}")
    if self.remat not in REMAT:
      raise ValueError(f"ModelConfig.remat must be one of {REMAT}, got {self.remat!r}")
    if self.attention not in ATTENTION:
      raise ValueError(f"ModelConfig.attention must be one of {ATTENTION}, got {self.attention!r}")
    if self.scan_layers and self.moe_every != 1:
      raise ValueError(f"ModelConfig: scan_layers needs moe_every=1 (every block MoE, one block body), got "
                       f"moe_every={self.moe_every}")
    if self.moe.capacity_factor <= 0:
      raise ValueError(f"ModelConfig: capacity_factor must be > 0, got {self.moe.capacity_factor}")
    backends.check_backends(self.moe.dispatch, self.moe.gmm_backend, self.moe.dispatch_backend, "ModelConfig.")
    return self

  def moe_config(self) -> MoEConfig:
    """The standalone layer config: `moe`'s fields plus the model's d_model and dtypes."""
    experts = {f.name: getattr(self.moe, f.name) for f in dataclasses.fields(self.moe)}
    return MoEConfig(**experts, d_model=self.d_model, dtype=jnp.dtype(self.dtype),
                     param_dtype=jnp.dtype(self.param_dtype))


class ModelOutput(NamedTuple):
  logits: jax.Array | None  # float32 [B, T, V]; None when called with logits=False
  routes: jax.Array  # int32 [B, T, L_moe, k]
  aux_loss: jax.Array  # scalar: mean over MoE layers of the switch-style load-balance loss
  counts: jax.Array  # int32 [L_moe, E]
  slot_counts: jax.Array  # int32 [L_moe, D*S]
  dropped: jax.Array  # int32 scalar, summed over MoE layers
  hidden: jax.Array  # [B, T, H] in the activation dtype: the final RMSNorm's output (the LM head's input)


class DenseFFN(nnx.Module):
  """SwiGLU: down(silu(gate) * up)."""

  def __init__(self, cfg: ModelConfig, *, mesh, rngs: nnx.Rngs):
    pd, h, f = jnp.dtype(cfg.param_dtype), cfg.d_model, cfg.d_ff_dense
    self.dtype = jnp.dtype(cfg.dtype)
    self.w_gate_up = init_param(rngs, (h, 2 * f), h, mesh, pd)
    self.w_down = init_param(rngs, (f, h), f, mesh, pd)

  def __call__(self, x_BxTxH):
    gate, up = jnp.split(x_BxTxH.astype(self.dtype) @ self.w_gate_up[...].astype(self.dtype), 2, axis=-1)
    act = (jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)).astype(self.dtype)
    return act @ self.w_down[...].astype(self.dtype)


class Block(nnx.Module):
  def __init__(self, cfg: ModelConfig, is_moe: bool, *, mesh, rngs: nnx.Rngs):
    pd = jnp.dtype(cfg.param_dtype)
    self.is_moe = is_moe
    self.attn_norm = RMSNorm(cfg.d_model, mesh=mesh, param_dtype=pd, eps=cfg.norm_eps)
    self.attn = Attention(cfg, mesh=mesh, rngs=rngs)
    self.ffn_norm = RMSNorm(cfg.d_model, mesh=mesh, param_dtype=pd, eps=cfg.norm_eps)
    self.ffn = MoE(cfg.moe_config(), mesh=mesh, rngs=rngs) if is_moe else DenseFFN(cfg, mesh=mesh, rngs=rngs)

  def __call__(self, x_BxTxH, positions_BxT, cache, start_B, moe_kw, segment_ids_BxT=None):
    """-> (x, MoEOutput or None, cache). `segment_ids_BxT`: packed rows (padding = 0 routed nowhere)."""
    a_BxTxH, cache = self.attn(self.attn_norm(x_BxTxH), positions_BxT, cache, start_B, segment_ids_BxT)
    x_BxTxH = x_BxTxH + a_BxTxH.astype(x_BxTxH.dtype)
    h_BxTxH = self.ffn_norm(x_BxTxH)
    if self.is_moe and segment_ids_BxT is not None:
      moe_kw = dict(moe_kw, token_mask=segment_ids_BxT > 0)
    moe_out = self.ffn(h_BxTxH, **moe_kw) if self.is_moe else None
    f_BxTxH = moe_out.y if self.is_moe else self.ffn(h_BxTxH)
    return x_BxTxH + f_BxTxH.astype(x_BxTxH.dtype), moe_out, cache


class Model(nnx.Module):
  """`model(tokens_BxT, tables=None, replay=None, *, capacity=None, working=None) -> ModelOutput`.

  `tables`: a `Tables` with a leading L_moe axis (one placement per MoE layer); `replay`: int32
  [B, T, L_moe, k]; `working`: None or one entry per MoE layer for that layer's `working=`.
  Unrolled (default): `model.blocks`, one `Block` per layer. `scan_layers`: `model.layers`, one `Block`
  whose parameters have a leading [L] axis (expert weights [L, E, ...] sharded P(None, "expert")).
  """

  def __init__(self, cfg: ModelConfig, *, mesh: jax.sharding.Mesh, rngs: nnx.Rngs):
    cfg.validate(mesh_lib.expert_devices(mesh))
    self.cfg, self.mesh = cfg, mesh
    pd = jnp.dtype(cfg.param_dtype)
    self.embed = init_param(rngs, (cfg.vocab_size, cfg.d_model), 1.0, mesh, pd)
    moe_ids = set(cfg.moe_layer_ids)
    blocks = [Block(cfg, i in moe_ids, mesh=mesh, rngs=rngs) for i in range(cfg.num_layers)]
    if cfg.scan_layers:
      self.layers = stack_blocks(blocks, mesh)
    else:
      self.blocks = nnx.List(blocks)
    self.final_norm = RMSNorm(cfg.d_model, mesh=mesh, param_dtype=pd, eps=cfg.norm_eps)
    self.lm_head = init_param(rngs, (cfg.d_model, cfg.vocab_size), cfg.d_model, mesh, pd)

  def moe_layers(self) -> list[MoE]:
    """The MoE modules; a scanned model has one, whose expert weights are stacked [L_moe, E, ...]."""
    if self.cfg.scan_layers:
      return [self.layers.ffn]
    return [b.ffn for b in self.blocks if b.is_moe]

  def no_drop_capacity(self, batch: int, seq_len: int) -> int:
    """Padded dispatch capacity that can hold every (token, expert) pair of a device: exact results
    whatever the routing (rollout uses it so that prefill, decode and replay agree)."""
    local = batch // mesh_lib.batch_shards(self.mesh) * seq_len * self.cfg.moe.top_k
    return max(8, math.ceil(local / 8) * 8)

  def __call__(self, tokens_BxT, tables: Tables | None = None, replay=None, *, capacity=None,
               working=None, segment_ids=None, positions=None, logits: bool = True) -> ModelOutput:
    """`segment_ids` / `positions` int [B, T], both or neither: packed rows (0 = padding, 1.. = the row's
    sequences; positions restart at 0 per sequence). None: one sequence per row at positions 0..T-1.
    `logits=False`: `out.logits` is None (no [B, T, V] buffer); use `out.hidden` with the LM head."""
    b, t = tokens_BxT.shape
    if (segment_ids is None) != (positions is None):
      raise ValueError("Model: pass segment_ids and positions together (packed rows) or neither")
    if segment_ids is None:
      positions_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    else:
      if tuple(segment_ids.shape) != (b, t) or tuple(positions.shape) != (b, t):
        raise ValueError(f"segment_ids and positions must be [B, T] = {(b, t)}, got {tuple(segment_ids.shape)} "
                         f"and {tuple(positions.shape)}")
      positions_BxT = positions.astype(jnp.int32)
    out, _ = self._run(tokens_BxT, positions_BxT, None, None, tables, replay, capacity, working, segment_ids,
                       logits=logits)
    return out

  def init_cache(self, batch: int, max_len: int) -> list[KVCache] | KVCache:
    """Zeroed KV caches sharded over the batch axes: one per block, or (scan_layers) one `KVCache` whose
    leaves have a leading [L] axis."""
    cfg = self.cfg
    if max_len > cfg.max_seq_len:
      raise ValueError(f"cache length {max_len} > max_seq_len={cfg.max_seq_len}")
    shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    spec = (*mesh_lib.batch_spec(self.mesh), None, None, None)
    if cfg.scan_layers:
      sharding = NamedSharding(self.mesh, P(None, *spec))
      return KVCache(*(jax.device_put(jnp.zeros((cfg.num_layers, *shape), jnp.dtype(cfg.dtype)), sharding)
                       for _ in range(2)))
    sharding = NamedSharding(self.mesh, P(*spec))
    def zeros():
      return jax.device_put(jnp.zeros(shape, jnp.dtype(cfg.dtype)), sharding)
    return [KVCache(zeros(), zeros()) for _ in range(cfg.num_layers)]

  def prefill(self, tokens_BxP, cache, *, tables=None, capacity=None) -> tuple[ModelOutput, list[KVCache]]:
    """Processes a (right-padded) prompt block at positions 0..P-1 and writes it into the cache."""
    b, p = tokens_BxP.shape
    positions_BxP = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    return self._run(tokens_BxP, positions_BxP, cache, jnp.zeros((b,), jnp.int32), tables, None, capacity, None)

  def decode(self, tokens_Bx1, cache, positions_B, *, tables=None, capacity=None):
    """One token per row at its own position -> (logits_Bx1xV, routes_Bx1xLxk, cache)."""
    positions_B = positions_B.astype(jnp.int32)
    out, cache = self._run(tokens_Bx1, positions_B[:, None], cache, positions_B, tables, None, capacity, None)
    return out.logits, out.routes, cache

  def _run(self, tokens_BxT, positions_BxT, cache, start_B, tables, replay, capacity, working, segment_ids_BxT=None,
           logits=True):
    cfg = self.cfg
    num_moe = len(cfg.moe_layer_ids)
    if replay is not None and replay.shape != (*tokens_BxT.shape, num_moe, cfg.moe.top_k):
      raise ValueError(f"replay must be [B, T, L_moe, k] = {(*tokens_BxT.shape, num_moe, cfg.moe.top_k)}, "
                       f"got {tuple(replay.shape)}")
    if working is not None and len(working) != num_moe:
      raise ValueError(f"working must have one entry per MoE layer ({num_moe}), got {len(working)}")
    x_BxTxH = self.embed[...][tokens_BxT].astype(jnp.dtype(cfg.dtype))
    x_BxTxH = jax.lax.with_sharding_constraint(x_BxTxH, NamedSharding(self.mesh, mesh_lib.batch_spec(self.mesh)))
    if cfg.scan_layers:
      x_BxTxH, moe_out, new_cache = self._scan(x_BxTxH, positions_BxT, cache, start_B, tables, replay, capacity,
                                               working, segment_ids_BxT)
      routes = jnp.moveaxis(moe_out.topk, 0, 2)
      aux_loss, counts, slot_counts = jnp.mean(moe_out.aux_loss), moe_out.counts, moe_out.slot_counts
      dropped = jnp.sum(moe_out.dropped)
    else:
      x_BxTxH, moe_outs, new_cache = self._unrolled(x_BxTxH, positions_BxT, cache, start_B, tables, replay,
                                                    capacity, working, segment_ids_BxT)
      routes = jnp.stack([o.topk for o in moe_outs], axis=2)
      aux_loss = jnp.mean(jnp.stack([o.aux_loss for o in moe_outs]))
      counts = jnp.stack([o.counts for o in moe_outs])
      slot_counts = jnp.stack([o.slot_counts for o in moe_outs])
      dropped = sum(o.dropped for o in moe_outs)
    h_BxTxH = self.final_norm(x_BxTxH)
    logits_BxTxV = None
    if logits:
      logits_BxTxV = jnp.einsum("bth,hv->btv", h_BxTxH, self.lm_head[...].astype(h_BxTxH.dtype),
                                preferred_element_type=jnp.float32)
    out = ModelOutput(logits=logits_BxTxV, routes=routes.astype(jnp.int32), aux_loss=aux_loss, counts=counts,
                      slot_counts=slot_counts, dropped=dropped, hidden=h_BxTxH)
    return out, (new_cache if cache is not None else None)

  def _unrolled(self, x_BxTxH, positions_BxT, cache, start_B, tables, replay, capacity, working, segment_ids_BxT):
    """-> (x, MoE outputs of the MoE blocks, per-block caches)."""
    moe_outs, new_cache, m = [], [], 0
    for i, block in enumerate(self.blocks):
      moe_in = None
      if block.is_moe:
        moe_in = dict(tables=None if tables is None else layer_tables(tables, m),
                      replay=None if replay is None else replay[:, :, m],
                      working=None if working is None else working[m])
        m += 1
      graphdef, state = nnx.split(block)
      x_BxTxH, moe_out, layer_cache = apply_block(graphdef, state, x_BxTxH, positions_BxT,
                                                  None if cache is None else cache[i], start_B, moe_in,
                                                  segment_ids_BxT, capacity=capacity, remat=self.cfg.remat)
      new_cache.append(layer_cache)
      if moe_out is not None:
        moe_outs.append(moe_out)
    return x_BxTxH, moe_outs, new_cache

  def _scan(self, x_BxTxH, positions_BxT, cache, start_B, tables, replay, capacity, working, segment_ids_BxT):
    """-> (x, MoEOutput with a leading [L] axis on every field but y (None), stacked cache)."""
    if replay is not None and not isinstance(replay, jax.core.Tracer):  # values, as the unrolled MoE checks
      b, t, l, k = replay.shape
      check_replay(replay.reshape(b, t * l, k), (b, t * l, k), self.cfg.moe.num_experts)
    graphdef, state = nnx.split(self.layers)
    xs = dict(state=state, cache=cache, moe_in=dict(
        tables=tables, replay=None if replay is None else jnp.moveaxis(replay, 2, 0),
        working=None if working is None else jax.tree.map(lambda *w: jnp.stack(w), *working)))

    def body(x_BxTxH, layer):
      x_BxTxH, moe_out, layer_cache = apply_block(graphdef, layer["state"], x_BxTxH, positions_BxT, layer["cache"],
                                                  start_B, layer["moe_in"], segment_ids_BxT, capacity=capacity,
                                                  remat=self.cfg.remat, prevent_cse=False)
      return x_BxTxH, (moe_out._replace(y=None), layer_cache)

    x_BxTxH, (moe_out, new_cache) = jax.lax.scan(body, x_BxTxH, xs, unroll=self.cfg.scan_unroll)
    return x_BxTxH, moe_out, new_cache


def apply_block(graphdef, state, x_BxTxH, positions_BxT, cache, start_B, moe_in, segment_ids_BxT=None, *, capacity,
                remat, prevent_cse=True):
  """One block as a pure function of its state: `remat="block"` wraps it in `jax.checkpoint` (under a scan
  `prevent_cse=False`, as the scan already keeps the recomputation apart). -> (x, MoEOutput or None, cache)."""
  def body(state, x_BxTxH, positions_BxT, cache, start_B, moe_in, segment_ids_BxT):
    moe_kw = {} if moe_in is None else dict(moe_in, capacity=capacity)
    return nnx.merge(graphdef, state)(x_BxTxH, positions_BxT, cache, start_B, moe_kw, segment_ids_BxT)
  if remat == "block":
    body = jax.checkpoint(body, prevent_cse=prevent_cse)
  return body(state, x_BxTxH, positions_BxT, cache, start_B, moe_in, segment_ids_BxT)


def stack_blocks(blocks: list[Block], mesh) -> Block:
  """One `Block` holding the blocks' parameters stacked on a leading layer axis: the scanned layout of the
  same weights. Expert weights stay sharded over "expert" (P(None, "expert")), the rest replicated."""
  if len({b.is_moe for b in blocks}) != 1:
    raise ValueError("stack_blocks needs blocks of one kind (all MoE or all dense)")

  experts = contracts.expert_paths(blocks[0], [blocks[0].ffn]) if blocks[0].is_moe else set()

  def stack(path, *leaves):
    names = (getattr(k, "key", getattr(k, "idx", None)) for k in path)  # the Variable's own `.value` key: None
    expert = tuple(n for n in names if n is not None) in experts
    return jax.device_put(jnp.stack(leaves), NamedSharding(mesh, P(None, mesh_lib.EXPERT_AXIS) if expert else P()))
  states = [nnx.state(b) for b in blocks]
  return nnx.merge(nnx.graphdef(blocks[0]), jax.tree_util.tree_map_with_path(stack, *states))


def layer_tables(tables: Tables, i: int) -> Tables:
  """MoE layer i's placement from tables stacked over layers ([L_moe, ...] leaves)."""
  return jax.tree.map(lambda a: a[i], tables)


def param_count(model_or_state) -> int:
  """Number of parameters (works on `nnx.eval_shape` results: nothing is allocated)."""
  state = nnx.state(model_or_state, nnx.Param)
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(state)))
