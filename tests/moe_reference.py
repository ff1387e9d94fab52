"""Simple references for the MoE tests: a dense einsum MoE and random valid placements."""
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType


def cpu_mesh(data: int, expert: int):
  return jax.make_mesh((data, expert), ("data", "expert"), axis_types=(AxisType.Auto,) * 2)


def dense_moe(router_HxE, w_gate_up_ExHx2F, w_down_ExFxH, x_BxTxH, top_k, replay=None):
  """Every token through its top-k experts by einsum over all experts (float32)."""
  b, t, h = x_BxTxH.shape
  x_NxH = x_BxTxH.reshape(-1, h).astype(jnp.float32)
  probs_NxE = jax.nn.softmax(x_NxH @ router_HxE, axis=-1)
  topk_NxK = jax.lax.top_k(probs_NxE, top_k)[1] if replay is None else replay.reshape(-1, top_k)
  gate_NxK = jnp.take_along_axis(probs_NxE, topk_NxK, 1)
  gate_NxK = gate_NxK / gate_NxK.sum(1, keepdims=True)
  h_NxEx2F = jnp.einsum("nh,ehf->nef", x_NxH, w_gate_up_ExHx2F)
  gate, up = jnp.split(h_NxEx2F, 2, axis=-1)
  y_NxExH = jnp.einsum("nef,efh->neh", jax.nn.silu(gate) * up, w_down_ExFxH)
  y_NxKxH = jnp.take_along_axis(y_NxExH, topk_NxK[..., None], axis=1)
  return (y_NxKxH * gate_NxK[..., None]).sum(1).reshape(b, t, h)


def random_placement(rng: np.random.Generator, num_experts: int, num_devices: int, slots: int,
                     empty_fraction: float = 0.3):
  """Every expert once at a random slot; other slots hold random replicas or stay empty; random shares."""
  num_slots = num_devices * slots
  slot_expert_G = np.full(num_slots, -1, np.int32)
  where = rng.permutation(num_slots)
  slot_expert_G[where[:num_experts]] = rng.permutation(num_experts)
  for g in where[num_experts:]:
    if rng.random() >= empty_fraction:
      slot_expert_G[g] = rng.integers(num_experts)
  share_DxG = np.zeros((num_devices, num_slots), np.float32)
  for e in range(num_experts):
    holders = np.flatnonzero(slot_expert_G == e)
    share_DxG[:, holders] = rng.dirichlet(np.ones(len(holders)), size=num_devices)
  return slot_expert_G.reshape(num_devices, slots), share_DxG
