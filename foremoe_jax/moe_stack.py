"""A stack of residual MoE layers: the MoE-only model used by the executor tests and the MoE-step benchmark.

It has the model's executor interface: `__call__(x, tables, replay, *, capacity, working)` and
`moe_layers()`, with `replay` int32 [B, T, L, k] and `tables` stacked [L, ...].
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from foremoe_jax.moe import MoE, MoEConfig


class StackOutput(NamedTuple):
  y: jax.Array  # [B, T, H]
  routes: jax.Array  # int32 [B, T, L, k]
  counts: jax.Array  # int32 [L, E]
  slot_counts: jax.Array  # int32 [L, D*S]
  dropped: jax.Array  # int32 scalar


def rms_norm(x_BxTxH: jax.Array, eps: float = 1e-6) -> jax.Array:
  x = x_BxTxH.astype(jnp.float32)
  return (x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)).astype(x_BxTxH.dtype)


class MoEStack(nnx.Module):
  def __init__(self, cfg: MoEConfig, num_layers: int, *, mesh, rngs: nnx.Rngs):
    self.layers = nnx.List([MoE(cfg, mesh=mesh, rngs=rngs) for _ in range(num_layers)])

  def moe_layers(self) -> list[MoE]:
    return list(self.layers)

  def __call__(self, x_BxTxH, tables=None, replay=None, *, capacity=None, working=None) -> StackOutput:
    outs = []
    for i, layer in enumerate(self.layers):
      out = layer(rms_norm(x_BxTxH),
                  None if tables is None else jax.tree.map(lambda a: a[i], tables),
                  None if replay is None else replay[:, :, i],
                  capacity=capacity, working=None if working is None else working[i])
      x_BxTxH = x_BxTxH + out.y
      outs.append(out)
    return StackOutput(x_BxTxH, jnp.stack([o.topk for o in outs], axis=2), jnp.stack([o.counts for o in outs]),
                       jnp.stack([o.slot_counts for o in outs]), sum(o.dropped for o in outs))
