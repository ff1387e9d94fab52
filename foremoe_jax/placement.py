"""Placement tables: where expert replicas live in one (micro-step, layer), as traced device arrays.

A placement is `slot_expert[D, S]` (logical expert per physical slot, -1 = empty) plus
`slot_share[D_src, G]` (G = D*S): the fraction of source device s's (token, expert) pairs for expert
`slot_expert[g]` that go to global slot g. New placements are new array values of the same shapes,
so passing different tables to a jitted function never recompiles.

Deterministic split rule (shared with the planner's `slot_token_counts`): for source s and expert e
with n pairs, the replicas of e (slots holding e, by increasing g) cover the integer intervals
`[round(cum_lo * n), round(cum_hi * n))` of the source's pairs, in the source's pair order, where
cum_lo/cum_hi are the cumulative shares before/after the slot; the last replica ends at n.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from foremoe_jax.planner.slots import check_layout, home_placement

SHARE_ATOL = 1e-4


class Tables(NamedTuple):
  """One layer's placement. Leading axes may be stacked ([L, ...] or [M, L, ...]) by `stack_tables`."""
  slot_expert_G: jax.Array  # int32 [D*S]
  slot_share_DxG: jax.Array  # float32 [D, D*S]


def validate_placement(slot_expert_DxS, slot_share_DxG, num_experts: int | None = None) -> int:
  """Raises ValueError naming the broken invariant; returns the number of experts E."""
  slot_expert_DxS = np.asarray(slot_expert_DxS)
  slot_share_DxG = np.asarray(slot_share_DxG)
  if slot_expert_DxS.ndim != 2:
    raise ValueError(f"slot_expert must be [D, S], got shape {slot_expert_DxS.shape}")
  if not np.issubdtype(slot_expert_DxS.dtype, np.integer):
    raise ValueError(f"slot_expert must be an integer array, got dtype {slot_expert_DxS.dtype}")
  num_devices, slots = slot_expert_DxS.shape
  num_slots = num_devices * slots
  if slot_share_DxG.shape != (num_devices, num_slots):
    raise ValueError(f"slot_share must be [D, D*S] = {(num_devices, num_slots)}, got {slot_share_DxG.shape}")
  if not np.issubdtype(slot_share_DxG.dtype, np.floating):
    raise ValueError(f"slot_share must be a float array, got dtype {slot_share_DxG.dtype}")
  if num_experts is None:
    num_experts = int(slot_expert_DxS.max()) + 1
  if slot_expert_DxS.min() < -1 or slot_expert_DxS.max() >= num_experts:
    raise ValueError(f"slot_expert has expert ids outside [-1, {num_experts}): "
                     f"min {slot_expert_DxS.min()}, max {slot_expert_DxS.max()}")
  slot_expert_G = slot_expert_DxS.reshape(-1)
  missing = np.setdiff1d(np.arange(num_experts), slot_expert_G)
  if missing.size:
    raise ValueError(f"placement misses experts {missing.tolist()[:8]}: every expert needs a slot")
  check_layout(num_experts, num_devices, slots)
  if not np.all(np.isfinite(slot_share_DxG)) or slot_share_DxG.min() < 0:
    raise ValueError("slot_share must be finite and non-negative")
  empty_G = slot_expert_G < 0
  if np.any(slot_share_DxG[:, empty_G] != 0):
    raise ValueError("slot_share puts tokens on an empty slot (slot_expert == -1)")
  share_sum_DxE = np.zeros((num_devices, num_experts))
  np.add.at(share_sum_DxE.T, slot_expert_G[~empty_G], slot_share_DxG[:, ~empty_G].T)
  bad = np.argwhere(np.abs(share_sum_DxE - 1.0) > SHARE_ATOL)
  if bad.size:
    s, e = bad[0]
    raise ValueError(f"slot_share of source {s} over the replicas of expert {e} sums to "
                     f"{share_sum_DxE[s, e]:.6f}, not 1")
  return num_experts


def make_tables(slot_expert_DxS, slot_share_DxG, num_experts: int | None = None) -> Tables:
  """Validates a placement on the host and returns it as device arrays (a jit-friendly pytree)."""
  validate_placement(slot_expert_DxS, slot_share_DxG, num_experts)
  return Tables(jnp.asarray(np.asarray(slot_expert_DxS).reshape(-1), jnp.int32),
                jnp.asarray(slot_share_DxG, jnp.float32))


def single_copy_share(slot_expert_DxS) -> np.ndarray:
  """float32 [D, D*S]: every source sends all of an expert's pairs to its one slot (a placement without
  replicas, such as the home layout)."""
  slot_expert_G = np.asarray(slot_expert_DxS).reshape(-1)
  share_DxG = np.zeros((np.shape(slot_expert_DxS)[0], slot_expert_G.size), np.float32)
  share_DxG[:, slot_expert_G >= 0] = 1.0
  return share_DxG


def home_tables(num_experts: int, num_devices: int, slots_per_device: int) -> Tables:
  slot_expert_DxS = home_placement(num_experts, num_devices, slots_per_device)
  return make_tables(slot_expert_DxS, single_copy_share(slot_expert_DxS), num_experts)


def stack_tables(tables: list[Tables]) -> Tables:
  """Stacks per-layer tables into one pytree with a leading axis (e.g. [L, ...]) for scans."""
  return Tables(*(jnp.stack(leaves) for leaves in zip(*tables)))


def plan_tables(slot_expert_MxLxDxS, slot_share_MxLxDxG, num_experts: int) -> Tables:
  """All tables of a step as one pytree [M, L, ...] of host arrays, validated slice by slice."""
  slot_expert = np.asarray(slot_expert_MxLxDxS)
  slot_share = np.asarray(slot_share_MxLxDxG)
  for m in range(slot_expert.shape[0]):
    for l in range(slot_expert.shape[1]):
      try:
        validate_placement(slot_expert[m, l], slot_share[m, l], num_experts)
      except ValueError as err:
        raise ValueError(f"micro-step {m}, layer {l}: {err}") from None
  m, l, d, s = slot_expert.shape
  return Tables(slot_expert.reshape(m, l, d * s).astype(np.int32), slot_share.astype(np.float32))


def slot_pair_counts(slot_expert_G: jax.Array, share_G: jax.Array, pairs_per_expert_E: jax.Array):
  """Integer pairs one source sends to each global slot under the split rule (traced).

  Returns (count_G, order_G): count per slot, and the slots sorted by (expert, g) with empty slots last.
  """
  num_experts = pairs_per_expert_E.shape[0]
  key_G = jnp.where(slot_expert_G >= 0, slot_expert_G, num_experts)
  order_G = jnp.argsort(key_G, stable=True)
  key_sorted_G = key_G[order_G]
  share_sorted_G = jnp.where(key_sorted_G < num_experts, share_G[order_G], 0.0)
  expert_sorted_G = jnp.minimum(key_sorted_G, num_experts - 1)
  n_sorted_G = jnp.where(key_sorted_G < num_experts, pairs_per_expert_E[expert_sorted_G], 0)
  cum_G = jnp.cumsum(share_sorted_G)
  first_G = jnp.searchsorted(key_sorted_G, key_sorted_G, side="left")
  cum_within_G = cum_G - (cum_G - share_sorted_G)[first_G]
  is_last_G = jnp.append(key_sorted_G[1:] != key_sorted_G[:-1], True)
  hi_G = jnp.round(cum_within_G * n_sorted_G.astype(jnp.float32)).astype(jnp.int32)
  hi_G = jnp.where(is_last_G, n_sorted_G, jnp.clip(hi_G, 0, n_sorted_G))
  lo_G = jnp.where(first_G == jnp.arange(key_G.shape[0]), 0, jnp.roll(hi_G, 1))
  count_sorted_G = jnp.maximum(hi_G - lo_G, 0)
  count_G = jnp.zeros_like(count_sorted_G).at[order_G].set(count_sorted_G)
  return count_G, order_G
