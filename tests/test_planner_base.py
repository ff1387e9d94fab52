"""foremoe's step-level base: the swap candidate, the pairs no split can move, and the capacity-aware choice."""

import math

import numpy as np

from foremoe_jax.planner import CostModel, PlanConfig, foremoe, home_placement, pairs, plan_step
from foremoe_jax.planner.tenures import new_tenures
from test_planner import skewed_counts


def test_fixed_pair_max_counts_the_single_copy_experts_pairs():
  rng = np.random.default_rng(0)
  counts = rng.integers(0, 100, (3, 2, 4, 12))
  base = np.stack([home_placement(12, 4, 4), home_placement(12, 4, 4)])
  base[0, 1, 3] = 0  # expert 0 now has two copies: its pairs may go either way
  base[1, 2, 0], base[1, 3, 0] = base[1, 3, 0], base[1, 2, 0]  # experts 6 and 9 swap devices
  want = np.zeros((3, 2), np.int64)  # per micro-step and layer: the max over devices only
  for layer in range(2):
    flat = base[layer].ravel()
    for dst in range(4):
      single = [e for e in base[layer, dst] if e >= 0 and (flat == e).sum() == 1]
      want[:, layer] = np.maximum(want[:, layer], counts[:, layer][..., single].sum(-1).max(-1))
  assert len(np.unique(want[:, 0])) > 1  # the micro-steps differ: no max over them
  np.testing.assert_array_equal(pairs.fixed_pair_max(counts, base[None])[0], want)


def test_swap_base_balances_a_hot_device_with_few_fetched_experts():
  cfg = PlanConfig(32, 4, 9)
  counts = skewed_counts(np.random.default_rng(1), 4, 3, 4, 32, 4000)
  counts[..., :8] *= 3  # device 0's home experts take most pairs
  w = counts.sum((0, 2)).astype(float)
  load_home = w.reshape(3, 4, 8).sum(-1)
  swapped = foremoe.swap_base(w, cfg)
  primary = swapped[..., :8]  # swaps keep E/D experts per device; the ninth slot holds a replica
  np.testing.assert_array_equal(np.sort(primary.reshape(3, -1), axis=1), np.broadcast_to(np.arange(32), (3, 32)))
  load_swap = np.take_along_axis(w, primary.reshape(3, -1), axis=1).reshape(3, 4, 8).sum(-1)
  assert (load_swap.max(1) / load_swap.mean(1) < 1.02).all()
  assert (load_home.max(1) / load_home.mean(1) > 1.5).all()
  lpt = foremoe.align.align_placement(foremoe.lpt_base(w, cfg), home_placement(32, 4, 9), 32)
  assert (foremoe.remote_base_slots(swapped, cfg) < foremoe.remote_base_slots(lpt, cfg)).all()


def test_base_choice_weighs_each_micro_steps_capacity():
  cfg = PlanConfig(32, 4, 9)
  # 2 micro-steps, 2 layers. Base 1 is faster in layer 0, but there it needs one capacity bucket more
  # in micro-step 0 only: both layers of micro-step 0 pay it in the padded all_to_all, micro-step 1 not.
  need = np.array([[[1000.0, 1000.0], [1000.0, 1000.0]],
                   [[1100.0, 1000.0], [1000.0, 1000.0]]])
  assert (pairs.bucket(1000), pairs.bucket(1100)) == (1024, 1152)
  raised_s = 2 * cfg.cost.a2a_s(4 * (1152 - 1024))  # one micro-step's two layers, 128 more rows each
  for saving, want in [(1.5 * raised_s, [1, 0]), (0.5 * raised_s, [0, 0])]:
    step_s = np.array([[1e-3, 1e-3], [1e-3 - saving, 1e-3 + 1e-4]])
    # Pays: the saving beats one micro-step's raise (a step-wide capacity, raised in both, would not).
    np.testing.assert_array_equal(foremoe.choose_bases(step_s, need, cfg), want)
  # Free when layer 1 already sets micro-step 0's capacity at that bucket: then any saving pays.
  need[:, 0, 1] = 1100.0
  step_s = np.array([[1e-3, 1e-3], [1e-3 - 0.01 * raised_s, 1e-3 + 1e-4]])
  np.testing.assert_array_equal(foremoe.choose_bases(step_s, need, cfg), [1, 0])
  cheap_a2a = PlanConfig(32, 4, 9, cost=CostModel(a2a_bytes_per_s=1e18))
  step_s = np.array([[1e-3, 1e-3], [0.9e-3, 0.9e-3]])
  np.testing.assert_array_equal(foremoe.choose_bases(step_s, need, cheap_a2a), [1, 1])


def test_bucket_works_elementwise_with_the_scalar_rule():
  def rule(n):  # the executor's rule, one int at a time
    n = max(8, math.ceil(n / 8) * 8)
    step = max(8, 2 ** (n.bit_length() - 1) // pairs.BUCKETS_PER_OCTAVE)
    return math.ceil(n / step) * step
  needs = np.concatenate([np.arange(0, 5000), np.random.default_rng(7).integers(0, 1 << 40, 2000)])
  np.testing.assert_array_equal(pairs.bucket(needs), [rule(int(n)) for n in needs])
  assert pairs.bucket(1000) == 1024 and isinstance(pairs.bucket(1000), int)
  assert pairs.bucket(1000.5) == pairs.bucket(1001)  # float needs round up like ints


def test_exchange_s_prices_each_micro_step_at_its_own_capacity():
  cfg = PlanConfig(32, 4, 9)
  load = np.zeros((2, 2))
  need = np.array([[1000, 900], [200, 300]])  # micro-step 0 needs 1024 rows per pair, micro-step 1 304
  assert (pairs.bucket(1000), pairs.bucket(300)) == (1024, 304)
  row_s = cfg.cost.a2a_s_per_token
  want = 2 * 4 * (1024 + 304) * row_s  # 2 layers each, D=4 chunks of the capacity
  assert np.isclose(foremoe.exchange_s(load, need, cfg), want, rtol=1e-12)
  assert not np.isclose(want, 2 * 2 * 4 * 1024 * row_s)  # a step-wide capacity would charge more
  np.testing.assert_array_equal(pairs.micro_capacities(need), [1024, 304])
  coarse = PlanConfig(32, 4, 9, capacity_buckets=1)  # powers of two: 1024 and 512 rows
  assert np.isclose(foremoe.exchange_s(load, need, coarse), 2 * 4 * (1024 + 512) * row_s, rtol=1e-12)


def estimate(plan, cfg):
  moves = new_tenures(plan.slot_expert, plan.base)
  return foremoe.estimated_step_s(plan.slot_load, plan.pair_need, moves, plan.base, cfg)


def test_foremoe_is_never_slower_than_eplb_step_on_its_cost_model():
  """Whole-step estimate, padded capacity included: foremoe falls back to the step-level EPLB plan where
  its water-filled split needs more all_to_all rows than the balance saves."""
  rng = np.random.default_rng(3)
  fell_back = kept = 0
  for devices, slots, a2a in [(4, 9, 500e9), (8, 5, 500e9), (8, 5, 5e9), (16, 3, 5e9)]:
    cfg = PlanConfig(32, devices, slots, cost=CostModel(a2a_bytes_per_s=a2a))
    counts = skewed_counts(rng, 4, 2, devices, 32, 2000)
    ours = plan_step(counts, cfg)
    ours.validate()
    eplb = plan_step(counts, PlanConfig(32, devices, slots, policy="eplb_step", cost=cfg.cost))
    assert estimate(ours, cfg) <= estimate(eplb, cfg) * (1 + 1e-9)
    same = np.array_equal(ours.slot_expert, eplb.slot_expert)
    fell_back, kept = fell_back + same, kept + (not same)
  assert kept > 0 and fell_back > 0, (kept, fell_back)  # both outcomes occur here


def test_a_ragged_exchange_prices_each_micro_steps_own_rows():
  """CostModel(dispatch="ragged"): no padded capacities (the base choice ignores pair needs, the step
  pays each (m, l)'s busiest receiver), and foremoe stays never slower than eplb_step on that model."""
  ragged = PlanConfig(32, 4, 9, cost=CostModel(dispatch="ragged"))
  step_s = np.array([[1.0, 1.0], [0.9, 0.9]]) * 1e-3
  need = np.array([[[1000.0, 1000.0]], [[1100.0, 1000.0]]])
  np.testing.assert_array_equal(foremoe.choose_bases(step_s, need, ragged), [1, 1])
  load = np.array([[900.0, 1000.0]])
  for dispatch in ("padded", "ragged"):
    cfg = PlanConfig(32, 4, 9, cost=CostModel(dispatch=dispatch))
    expected = cfg.cost.a2a_s(load).sum() if dispatch == "ragged" else 2 * cfg.cost.a2a_s(4 * pairs.bucket(1001))
    assert foremoe.exchange_s(load, np.array([[1001, 7]]), cfg) == expected
  rng = np.random.default_rng(5)
  kept = 0
  for devices, slots in [(8, 5), (16, 3)]:
    cfg = PlanConfig(32, devices, slots, cost=CostModel(a2a_bytes_per_s=5e9, dispatch="ragged"))
    counts = skewed_counts(rng, 4, 2, devices, 32, 2000)
    ours = plan_step(counts, cfg)
    ours.validate()
    eplb = plan_step(counts, PlanConfig(32, devices, slots, policy="eplb_step", cost=cfg.cost))
    assert estimate(ours, cfg) <= estimate(eplb, cfg) * (1 + 1e-9)
    kept += not np.array_equal(ours.slot_expert, eplb.slot_expert)
  assert kept > 0  # with exact rows the balance pays for itself here


def test_a_base_move_pays_its_float32_gradient_on_the_way_back():
  """The base's gradients go home as float32 sums, and so do a replica's at the end of a tenure of two
  micro-steps or more: a bf16 expert fetched into the base or such a slot costs 1 + 2 expert-sized
  transfers, a float32 one 1 + 1 (a one-micro-step tenure's goes back in the weights' dtype: 1 + 1)."""
  bf16, f32 = CostModel(bytes_per_param=2), CostModel(bytes_per_param=4)
  for cost, units in ((bf16, 3), (f32, 2)):
    assert math.isclose(cost.base_move_s, cost.move_s)
    assert math.isclose(cost.move_s, units * cost.expert_bytes / cost.link_bytes_per_s)
    assert math.isclose(cost.direct_move_s, 2 * cost.expert_bytes / cost.link_bytes_per_s)
  cfg = PlanConfig(32, 4, 9, cost=bf16)
  home = np.stack([home_placement(32, 4, 9)] * 2)
  base = home.copy()
  base[0, 0, 8], base[1, 1, 8], base[1, 2, 8] = 9, 0, 31  # fetched: 1 slot on device 0, 1 each on 1 and 2
  zeros = np.zeros((3, 2))
  extra = foremoe.step_s(zeros, zeros, 0, base, cfg) - foremoe.step_s(zeros, zeros, 0, home, cfg)
  assert math.isclose(extra, 2 * bf16.base_move_s)  # the busiest device's fetches, per layer
