"""Token splits: the dispatcher's rounding rule, exact integer splits, water-filling optimality, locality."""

import numpy as np
import pytest

from foremoe_jax.planner import CostModel, PlanConfig, foremoe, plan_step, slot_token_counts, split
from test_planner import skewed_counts


def rounding_rule_reference(slot_expert_DxS, share_DxG, counts_DxE):
  """The dispatcher's rule written as a loop: replicas by increasing g, boundaries round(cum * n)."""
  slot_expert_G = slot_expert_DxS.ravel()
  num_src, num_slots = share_DxG.shape
  out = np.zeros((num_src, num_slots), np.int64)
  for s in range(num_src):
    for e in np.unique(slot_expert_G[slot_expert_G >= 0]):
      replicas = np.nonzero(slot_expert_G == e)[0]
      n, cum, start = counts_DxE[s, e], 0.0, 0
      for i, g in enumerate(replicas):
        cum += float(share_DxG[s, g])
        end = n if i == len(replicas) - 1 else min(int(np.rint(cum * n)), n)
        out[s, g] = max(end - start, 0)
        start = max(end, start)
  return out


def random_placement(rng, num_devices, slots_per_device, num_experts):
  slot_expert = np.concatenate([np.arange(num_experts),
                                rng.integers(-1, num_experts, num_devices * slots_per_device - num_experts)])
  return rng.permutation(slot_expert).reshape(num_devices, slots_per_device)


def test_slot_token_counts_follows_the_dispatcher_rule_for_any_shares():
  rng = np.random.default_rng(0)
  for _ in range(20):
    slot_expert = random_placement(rng, 4, 4, 10)
    share = rng.random((4, 16)) * (slot_expert.ravel() >= 0)
    held = slot_expert.ravel()
    for e in range(10):  # normalize over each expert's replicas
      share[:, held == e] /= share[:, held == e].sum(1, keepdims=True)
    counts = rng.integers(0, 40, (4, 10))
    expected = rounding_rule_reference(slot_expert, share.astype(np.float32), counts)
    np.testing.assert_array_equal(slot_token_counts(slot_expert, share.astype(np.float32), counts), expected)


def test_foremoe_shares_reproduce_its_integer_split_exactly_in_float32():
  counts = skewed_counts(np.random.default_rng(1), 4, 3, 8, 32, 5000)
  # No EPLB base: no whole-step check that could swap in EPLB's even split for foremoe's integer split.
  cfg = PlanConfig(32, 8, 5, eplb_base_candidate=False)
  plan = plan_step(counts, cfg)
  _, slot_pairs_BxG, _ = foremoe.plan_foremoe(counts, cfg)
  pairs = plan.slot_pairs(counts)
  np.testing.assert_array_equal(pairs.sum(-2).reshape(slot_pairs_BxG.shape), slot_pairs_BxG)
  # The same boundaries when the dispatcher accumulates shares in float32.
  m, l = 2, 1
  share32 = plan.slot_share[m, l]
  se_G = plan.slot_expert[m, l].ravel()
  for e in np.unique(se_G):
    replicas = np.nonzero(se_G == e)[0]
    n = counts[m, l, :, e][:, None]
    ends = np.rint(np.cumsum(share32[:, replicas], axis=1, dtype=np.float32) * n).astype(np.int64)
    ends[:, -1] = n[:, 0]
    np.testing.assert_array_equal(np.diff(ends, axis=1, prepend=0), pairs[m, l][:, replicas])


def test_waterfilled_loads_meet_the_optimality_conditions():
  """At the optimum no replicated expert has pairs on a device more loaded than another of its holders."""
  rng = np.random.default_rng(2)
  counts = skewed_counts(rng, 1, 16, 8, 32, 4000)
  w_BxE = counts.sum(2).reshape(16, 32).astype(float)
  placement = np.stack([random_placement(rng, 8, 6, 32) for _ in range(16)])
  x0 = split.even_slot_loads(placement, w_BxE)
  x = split.waterfill_slot_loads(placement, x0, 32, sweeps=500, tolerance=1e-9)
  load = x.reshape(16, 8, 6).sum(-1)
  even_load = x0.reshape(16, 8, 6).sum(-1)
  assert (load.max(-1) <= even_load.max(-1) + 1e-9).all()
  for b in range(16):
    se_G = placement[b].ravel()
    totals = np.bincount(se_G[se_G >= 0], weights=x[b][se_G >= 0], minlength=32)
    np.testing.assert_allclose(totals, w_BxE[b], atol=1e-6)
    for e in np.unique(se_G[se_G >= 0]):
      devices = np.unique(np.nonzero(se_G == e)[0] // 6)
      used = [d for d in devices if x[b, d * 6:(d + 1) * 6][se_G[d * 6:(d + 1) * 6] == e].sum() > 1e-6]
      if used:
        assert max(load[b, used]) <= load[b, devices].min() + 1e-3


def test_waterfilled_max_load_matches_a_linear_program():
  linprog = pytest.importorskip("scipy.optimize").linprog
  rng = np.random.default_rng(3)
  for _ in range(5):
    placement = random_placement(rng, 4, 4, 8)[None]
    w = rng.integers(0, 100, (1, 8)).astype(float)
    x = split.waterfill_slot_loads(placement, split.even_slot_loads(placement, w), 8, sweeps=2000, tolerance=0.0)
    se_G = placement.ravel()
    held = np.nonzero(se_G >= 0)[0]
    # Variables: load on each held slot, then the max device load t; minimize t.
    c = np.r_[np.zeros(held.size), 1.0]
    a_eq = np.array([np.r_[(se_G[held] == e).astype(float), 0.0] for e in range(8)])
    a_ub = np.array([np.r_[(held // 4 == d).astype(float), -1.0] for d in range(4)])
    best = linprog(c, A_ub=a_ub, b_ub=np.zeros(4), A_eq=a_eq, b_eq=w[0], bounds=(0, None)).fun
    assert x.reshape(4, 4).sum(-1).max() == pytest.approx(best, abs=1e-3)


def test_integer_slot_loads_round_within_one_pair_and_keep_totals():
  rng = np.random.default_rng(4)
  placement = np.stack([random_placement(rng, 4, 5, 12) for _ in range(8)])
  w = rng.integers(0, 500, (8, 12))
  x = split.waterfill_slot_loads(placement, split.even_slot_loads(placement, w.astype(float)), 12, 8)
  rounded = split.integer_slot_loads(placement.reshape(8, -1), x, w)
  assert np.abs(rounded - x).max() < 1.0
  for b in range(8):
    se_G = placement[b].ravel()
    np.testing.assert_array_equal(np.bincount(se_G[se_G >= 0], weights=rounded[b][se_G >= 0], minlength=12), w[b])


def test_split_keeps_pairs_on_their_own_device_first():
  slot_expert = np.array([[[0, 2], [1, 0]]])  # expert 0 on devices 0 and 1
  counts = np.array([[[30, 0, 5], [50, 7, 0]]])  # source 0 has 30 pairs for expert 0, source 1 has 50
  pairs_GxD = split.split_by_source(slot_expert, np.array([[40, 5, 7, 40]]), counts)[0]
  # Slot 0 (device 0) takes source 0's 30 pairs, then 10 of source 1's; slot 3 (device 1) takes 40 local pairs.
  np.testing.assert_array_equal(pairs_GxD[:, 0], [30, 5, 0, 0])
  np.testing.assert_array_equal(pairs_GxD[:, 1], [10, 0, 7, 40])


def test_even_split_spreads_each_source_within_one_pair():
  rng = np.random.default_rng(5)
  placement = random_placement(rng, 4, 6, 8).reshape(1, -1)
  counts = rng.integers(0, 100, (1, 4, 8))
  pairs_GxD = split.even_split_by_source(placement, counts)[0]
  for e in range(8):
    replicas = np.nonzero(placement[0] == e)[0]
    np.testing.assert_array_equal(pairs_GxD[replicas].sum(0), counts[0, :, e])
    assert (np.abs(pairs_GxD[replicas] - counts[0, :, e] / replicas.size) < 1).all()


def pair_need_ml(plan, counts):
  """int [M, L]: the largest (source, destination device) pair count: what sets the padded capacity."""
  pairs = plan.slot_pairs(counts)
  return pairs.reshape(*pairs.shape[:3], plan.config.num_devices, -1).sum(-1).max((-2, -1))


@pytest.mark.parametrize("num_devices, slots_per_device", [(2, 17), (4, 9), (8, 6)])
def test_pair_aware_split_lowers_the_pair_need_without_touching_device_loads(num_devices, slots_per_device):
  counts = skewed_counts(np.random.default_rng(10), 4, 6, num_devices, 32, 4000)
  fast = CostModel(link_bytes_per_s=1e18)  # moves pay: replicas everywhere, the split has freedom
  local_first = plan_step(counts, PlanConfig(32, num_devices, slots_per_device, pair_sweeps=0, cost=fast))
  aware = plan_step(counts, PlanConfig(32, num_devices, slots_per_device, cost=fast))
  aware.validate()
  # Same placements and slot loads, so every device load is the same (tolerance: none needed).
  np.testing.assert_array_equal(aware.slot_expert, local_first.slot_expert)
  np.testing.assert_array_equal(aware.device_load(counts), local_first.device_load(counts))
  old, new = pair_need_ml(local_first, counts), pair_need_ml(aware, counts)
  # The max may sit on a pair that only unreplicated experts feed (no freedom), so: never higher there.
  assert new.max() <= old.max() and new.sum() < 0.99 * old.sum()
  assert (new <= old).mean() >= 0.9  # block descent on squares: the max may rarely tick up by a pair


def test_balance_pairs_keeps_slot_and_source_totals_and_whole_counts():
  from foremoe_jax.planner import pairs
  rng = np.random.default_rng(11)
  placement = np.stack([random_placement(rng, 4, 6, 16) for _ in range(5)])
  counts = rng.integers(0, 200, (5, 4, 16))
  w = counts.sum(1)
  x = split.waterfill_slot_loads(placement, split.even_slot_loads(placement, w.astype(float)), 16, 8)
  slot_pairs = split.integer_slot_loads(placement.reshape(5, -1), x, w)
  before = split.split_by_source(placement, slot_pairs, counts)
  after = pairs.balance_pairs(split.replica_table(placement, 16), before.copy(), 6, sweeps=3, near_max=0.0)
  assert after.dtype == np.int64 and after.min() >= 0
  np.testing.assert_array_equal(after.sum(-1), before.sum(-1))
  se = placement.reshape(5, -1)
  onehot = se[:, :, None] == np.arange(16)
  np.testing.assert_array_equal(np.einsum("bgs,bge->bse", after, onehot), counts)
  square = lambda p: (pairs.pair_counts(p, 4).astype(float) ** 2).sum()
  assert square(after) < square(before)


def test_balance_pairs_leaves_problems_far_below_the_max_alone_and_keeps_the_max():
  from foremoe_jax.planner import pairs
  rng = np.random.default_rng(12)
  placement = np.stack([random_placement(rng, 4, 6, 16) for _ in range(6)])
  counts = rng.integers(0, 200, (6, 4, 16))
  counts[:3] //= 10  # three problems with a tenth of the pairs: they cannot hold the step-wide max
  w = counts.sum(1)
  x = split.waterfill_slot_loads(placement, split.even_slot_loads(placement, w.astype(float)), 16, 8)
  before = split.split_by_source(placement, split.integer_slot_loads(placement.reshape(6, -1), x, w), counts)
  table = split.replica_table(placement, 16)
  every = pairs.balance_pairs(table, before.copy(), 6, sweeps=3, near_max=0.0)
  lazy = pairs.balance_pairs(table, before.copy(), 6, sweeps=3)
  np.testing.assert_array_equal(lazy[:3], before[:3])
  assert not np.array_equal(every[:3], before[:3])
  need = lambda p: pairs.pair_counts(p, 4).max()
  assert need(lazy) <= need(every) < need(before)


def test_balance_pairs_balances_near_each_micro_steps_own_max():
  """Two micro-steps of 3 layers, micro-step 1 with a tenth of the pairs: each micro-step's max sets its
  own capacity, so the problems near micro-step 1's max are balanced too (a step-wide rule skips them)."""
  from foremoe_jax.planner import pairs
  rng = np.random.default_rng(13)
  placement = np.stack([random_placement(rng, 4, 6, 16) for _ in range(6)])
  counts = rng.integers(0, 200, (6, 4, 16))
  counts[2] //= 10  # far below micro-step 0's max
  counts[3:] //= 10  # micro-step 1: all far below micro-step 0's max ...
  counts[5] //= 10  # ... and its layer 2 far below its own max
  w = counts.sum(1)
  x = split.waterfill_slot_loads(placement, split.even_slot_loads(placement, w.astype(float)), 16, 8)
  before = split.split_by_source(placement, split.integer_slot_loads(placement.reshape(6, -1), x, w), counts)
  table = split.replica_table(placement, 16)
  step_wide = pairs.balance_pairs(table, before.copy(), 6, sweeps=3)
  one_micro_step = pairs.balance_pairs(table, before.copy(), 6, sweeps=3, num_layers=6)
  np.testing.assert_array_equal(one_micro_step, step_wide)
  np.testing.assert_array_equal(step_wide[2:], before[2:])
  every = pairs.balance_pairs(table, before.copy(), 6, sweeps=3, near_max=0.0, num_layers=3)
  per_micro = pairs.balance_pairs(table, before.copy(), 6, sweeps=3, num_layers=3)
  np.testing.assert_array_equal(per_micro[[2, 5]], before[[2, 5]])
  need_MxL = lambda p: pairs.pair_counts(p, 4).max((1, 2)).reshape(2, 3)
  top = need_MxL(before)[1].argmax()
  assert top != 2 and not np.array_equal(per_micro[3 + top], before[3 + top])
  np.testing.assert_array_equal(per_micro[:3], step_wide[:3])
  assert (need_MxL(per_micro).max(1) <= need_MxL(every).max(1)).all()
  assert need_MxL(per_micro)[1].max() < need_MxL(before)[1].max() == need_MxL(step_wide)[1].max()
