"""The planner's fast kernels against plain references: the same numbers, bit for bit."""

import itertools

import numpy as np
import pytest

from foremoe_jax.planner import PlanConfig, align, bins, foremoe, home_placement, pairs, slots, split
from test_planner import skewed_counts
from test_planner_split import random_placement


@pytest.mark.parametrize("n", range(1, 11))
def test_sorting_network_sorts_every_zero_one_input(n):
  rows = list(np.array(list(itertools.product([0, 1], repeat=n))).T)  # 0-1 principle: enough for any input
  for i, j in bins.sorting_network(n):
    rows[i], rows[j] = np.minimum(rows[i], rows[j]), np.maximum(rows[i], rows[j])
  assert (np.diff(np.stack(rows), axis=0) >= 0).all()


@pytest.mark.parametrize("num_bins", [1, 2, 3, 5, 8, 9, 12])
def test_pour_matches_sort_and_cumsum_bit_for_bit(num_bins):
  rng = np.random.default_rng(num_bins)
  others = rng.random((500, num_bins)) * 1000
  others[rng.random(others.shape) < 0.2] = split.NO_BIN
  others[:, 0] = rng.random(500) * 1000  # at least one bin
  others[rng.random(others.shape) < 0.1] = 250.0  # ties
  amount = rng.random(500) * 2000
  heights = np.sort(others, axis=1)
  levels = (amount[:, None] + np.cumsum(heights, axis=1)) / np.arange(1, num_bins + 1)
  wet = (heights < levels).sum(1)
  want = np.maximum(np.take_along_axis(levels, np.maximum(wet - 1, 0)[:, None], axis=1) - others, 0.0)
  np.testing.assert_array_equal(bins.pour(np.ascontiguousarray(others.T), amount).T, want)
  np.testing.assert_array_equal(bins.sums(np.ascontiguousarray(others.T)), others.sum(1))


def test_fixed_pair_max_skips_same_device_duplicates_and_empty_slots():
  rng = np.random.default_rng(1)
  counts = rng.integers(0, 100, (2, 3, 4, 8))
  bases = np.stack([home_placement(8, 4, 3)] * 3)[None].copy()  # [1, L, D, S]: slot 2 empty everywhere
  bases[0, 1, 0, 2] = 0  # layer 1: expert 0 twice on device 0, so not held once
  bases[0, 2, 3, 2] = 6  # layer 2: expert 6 twice on device 3
  want = np.zeros((2, 3), np.int64)
  for m, layer in itertools.product(range(2), range(3)):
    flat = bases[0, layer].ravel()
    for dst in range(4):
      once = [e for e in bases[0, layer, dst] if e >= 0 and (flat == e).sum() == 1]
      want[m, layer] = max(want[m, layer], counts[m, layer][..., once].sum(-1).max())
  np.testing.assert_array_equal(pairs.fixed_pair_max(counts, bases)[0], want)


def test_free_slots_rank_slots_as_a_stable_sort():
  rng = np.random.default_rng(2)
  base = np.stack([random_placement(rng, 4, 5, 12) for _ in range(6)])
  primary = foremoe.primary_mask(base)
  w = rng.integers(0, 4, (6, 12)).astype(float)  # few values: many ties
  for per_device in (1, 2, 3):
    got = foremoe.free_slots(base, primary, w, per_device)
    # The reference ranking the function used to make: two argsorts per device.
    se = base.reshape(6, -1)
    copies = np.stack([np.bincount(row[row >= 0], minlength=12) for row in se])
    per_copy = np.take_along_axis(w / np.maximum(copies, 1), np.maximum(se, 0), axis=1)
    key = np.where(primary, np.inf, np.where(se >= 0, per_copy, -1.0).reshape(base.shape))
    rank = np.argsort(np.argsort(key, axis=2, kind="stable"), axis=2)
    np.testing.assert_array_equal(got, ~primary & (rank < per_device))


def test_even_split_matches_integer_division():
  rng = np.random.default_rng(3)
  placement = np.stack([random_placement(rng, 4, 9, 6) for _ in range(5)]).reshape(5, -1)  # up to ~6 copies
  counts = rng.integers(0, 1000, (5, 4, 6))
  got = split.even_split_by_source(placement, counts)
  for b in range(5):
    for g, e in enumerate(placement[b]):
      if e < 0:
        assert (got[b, g] == 0).all()
        continue
      copies = (placement[b] == e).sum()
      rank = (placement[b, :g] == e).sum()
      n = counts[b, :, e]
      np.testing.assert_array_equal(got[b, g], n // copies + ((rank + np.arange(4)) % copies < n % copies))


def test_exact_pairs_stop_sees_lower_bounds_and_can_end_the_work():
  counts = skewed_counts(np.random.default_rng(4), 4, 3, 8, 32, 3000)
  cfg = PlanConfig(32, 8, 5)
  slot_expert, slot_pairs, _ = foremoe.plan_foremoe(counts, cfg)
  args = (slot_expert.reshape(12, 8, 5), counts.reshape(12, 8, 32), slot_pairs, 1)
  seen = []
  full = split.exact_pairs(*args, num_layers=3, stop=lambda busiest, need: seen.append((busiest, need)) or False)
  pairs_BxGxD, load, need = split.exact_pairs(*args, num_layers=3)
  np.testing.assert_array_equal(full[0], pairs_BxGxD)
  np.testing.assert_array_equal(full[1], load)
  assert seen, "no balancing round ran"
  busiest = load.reshape(12, 8, 5).sum(-1).max(-1)
  for busiest_floor, need_floor in seen:
    assert (busiest_floor <= busiest).all() and (need_floor <= need).all()
  assert split.exact_pairs(*args, num_layers=3, stop=lambda busiest, need: True) is None


@pytest.mark.parametrize("batch,num_devices,num_slots,num_experts", [(5, 4, 5, 16), (3, 2, 65, 128), (4, 16, 9, 128)])
def test_overlap_counts_equal_a_matmul_of_holds_indicators(batch, num_devices, num_slots, num_experts):
  """Shared experts per (placement device, reference device), an expert held twice on a device counted once."""
  rng = np.random.default_rng(batch)
  placement = rng.integers(-1, num_experts, (batch, num_devices, num_slots))
  reference = rng.integers(-1, num_experts, (batch, num_devices, num_slots))
  placement[0, 0, :3] = placement[0, 0, 3]
  reference[0, 1, :2] = reference[0, 1, 2]

  def holds(p):
    out = np.zeros((batch, num_devices, num_experts))
    for b, d, s in np.ndindex(p.shape):
      if p[b, d, s] >= 0:
        out[b, d, p[b, d, s]] = 1
    return out
  want = holds(placement) @ holds(reference).transpose(0, 2, 1)
  np.testing.assert_array_equal(align.overlap_counts(placement, reference, num_experts), want)


@pytest.mark.parametrize("num_slots", [1, 3, 17, 65])
def test_align_slots_sorted_equals_the_slot_loop(num_slots):
  """Both ways of putting the reference's experts in its slots, duplicates and empty slots included."""
  rng = np.random.default_rng(num_slots)
  for trial in range(20):
    num_experts = int(rng.integers(2, 2 * num_slots + 3))
    moved = rng.integers(-1, num_experts, (12, num_slots))
    reference = rng.integers(-1, num_experts, (12, num_slots))
    if trial % 2:  # mostly the same experts, shuffled: most of them find their slot
      reference = moved[:, rng.permutation(num_slots)]
      reference[rng.random(reference.shape) < 0.3] = -1
    want = align._align_slots_loop(moved, reference)
    np.testing.assert_array_equal(align._align_slots_sorted(moved, reference), want)
    np.testing.assert_array_equal(np.sort(want, 1), np.sort(moved, 1))  # a permutation of each row
    for row in range(moved.shape[0]):  # every copy the reference can get sits in its slot
      held = ((reference[row] >= 0) & (want[row] == reference[row])).sum()
      assert held == sum(min((moved[row] == v).sum(), (reference[row] == v).sum()) for v in set(reference[row]) - {-1})


@pytest.mark.parametrize("num_slots", [3, 16, 17, 65])
def test_device_first_mask_is_the_first_copy_per_device(num_slots):
  rng = np.random.default_rng(num_slots)
  se = rng.integers(-1, num_slots, (5, 3, num_slots))
  want = np.zeros(se.shape, bool)
  for b, d in np.ndindex(se.shape[:2]):
    seen = set()
    for s in range(num_slots):
      want[b, d, s] = se[b, d, s] >= 0 and se[b, d, s] not in seen
      seen.add(se[b, d, s])
  np.testing.assert_array_equal(slots.device_first_mask(se), want)
