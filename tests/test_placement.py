"""Placement tables: host validation names the broken invariant; the split rule is exact."""
import jax.numpy as jnp
import numpy as np
import pytest

from foremoe_jax.placement import make_tables, plan_tables, single_copy_share, slot_pair_counts
from foremoe_jax.planner import home_placement
from moe_reference import random_placement


def home(num_experts, num_devices, slots):
  """The home layout and its shares: the placement every test here mutates."""
  slot_expert = home_placement(num_experts, num_devices, slots)
  return slot_expert, single_copy_share(slot_expert)


def test_home_placement_layout():
  slot_expert, share = home(8, 4, 3)
  assert slot_expert.tolist() == [[0, 1, -1], [2, 3, -1], [4, 5, -1], [6, 7, -1]]
  assert share[:, 2].sum() == 0 and share[:, 0].tolist() == [1, 1, 1, 1]
  make_tables(slot_expert, share, num_experts=8)


@pytest.mark.parametrize("mutate,message", [
    (lambda se, sh: (se.reshape(-1), sh), r"\[D, S\]"),
    (lambda se, sh: (se.astype(np.float32), sh), "integer"),
    (lambda se, sh: (se, sh[:, :-1]), "slot_share must be"),
    (lambda se, sh: (np.where(se == 3, 0, se), sh), "misses experts \\[3\\]"),
    (lambda se, sh: (np.where(se == 3, 9, se), sh), "outside"),
    (lambda se, sh: (se, sh * 0.5), "sums to 0.5"),
    (lambda se, sh: (se, np.where(np.arange(12) == 2, 0.1, sh).astype(np.float32)), "empty slot"),
    (lambda se, sh: (se, np.full_like(sh, np.nan)), "finite"),
])
def test_broken_invariants_are_named(mutate, message):
  slot_expert, share = home(8, 4, 3)
  with pytest.raises(ValueError, match=message):
    make_tables(*mutate(slot_expert, share), num_experts=8)


def test_plan_tables_names_the_micro_step_and_layer():
  slot_expert, share = home(8, 4, 2)
  se = np.stack([np.stack([slot_expert] * 3)] * 2)
  sh = np.stack([np.stack([share] * 3)] * 2)
  assert plan_tables(se, sh, 8).slot_expert_G.shape == (2, 3, 8)
  sh[1, 2, 0, 0] = 0.5
  with pytest.raises(ValueError, match="micro-step 1, layer 2"):
    plan_tables(se, sh, 8)


@pytest.mark.parametrize("seed", range(5))
def test_split_rule_gives_exact_integer_counts(seed):
  """Shares c/n of integer counts c reproduce c; every expert's pairs are fully covered."""
  rng = np.random.default_rng(seed)
  slot_expert, _ = random_placement(rng, 16, 4, 6, empty_fraction=0.2)
  slot_expert_G = slot_expert.reshape(-1)
  n_E = rng.integers(0, 50, size=16)
  want_G = np.zeros(24, np.int64)
  for e in range(16):
    holders = np.flatnonzero(slot_expert_G == e)
    want_G[holders] = rng.multinomial(n_E[e], rng.dirichlet(np.ones(len(holders))))
  share_G = np.where(slot_expert_G >= 0, want_G / np.maximum(n_E[np.maximum(slot_expert_G, 0)], 1), 0)
  for e in np.flatnonzero(n_E == 0):
    holders = np.flatnonzero(slot_expert_G == e)
    share_G[holders] = 1.0 / len(holders)
  count_G, _ = slot_pair_counts(jnp.asarray(slot_expert_G), jnp.asarray(share_G, jnp.float32),
                                jnp.asarray(n_E, jnp.int32))
  np.testing.assert_array_equal(np.asarray(count_G), want_G)


def test_gather_rows_backward_is_the_inverse_gather():
  import jax
  from foremoe_jax.dispatch import gather_rows, inverse_map
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(7, 3)), jnp.float32)
  idx = jnp.asarray([4, -1, 0, 6, 2, -1], jnp.int32)
  inverse = inverse_map(idx, 7)
  assert inverse.tolist() == [2, -1, 4, -1, 0, -1, 3]
  cot = jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)
  want = jax.grad(lambda x: jnp.sum(jnp.where((idx >= 0)[:, None], x[jnp.maximum(idx, 0)], 0) * cot))(x)
  got = jax.grad(lambda x: jnp.sum(gather_rows(x, idx, inverse[:, None], "xla") * cot))(x)
  np.testing.assert_allclose(got, want)
  np.testing.assert_allclose(gather_rows(x, idx, inverse[:, None], "xla")[1], 0)
