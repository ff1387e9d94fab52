"""EPLB-equivalent baseline: replication by load per copy, balanced packing with exactly S slots per device."""

import numpy as np

from foremoe_jax.planner import eplb
from foremoe_jax.planner.slots import copies_per_expert

# The load matrix of the EPLB README example (2 layers, 12 experts).
README_WEIGHTS = np.array([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                           [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]], float)


def test_replication_is_greedy_by_load_per_copy():
  rng = np.random.default_rng(0)
  w = np.concatenate([README_WEIGHTS, rng.integers(0, 1000, (6, 12)).astype(float)])
  copies, extra = eplb.replicate(w, 16)
  np.testing.assert_array_equal(copies - 1, [np.bincount(row, minlength=12) for row in extra])
  assert (copies >= 1).all() and (copies.sum(1) == 16).all()
  # No copy could move to another expert and lower the highest load per copy (D'Hondt optimality).
  for row, c in zip(w, copies):
    taken_from = c > 1
    if taken_from.any():
      assert (row / c).max() <= (row[taken_from] / (c[taken_from] - 1)).min() + 1e-9


def test_readme_example_replicates_the_hottest_experts():
  copies, _ = eplb.replicate(README_WEIGHTS, 16)
  # Four extra slots per layer go to the experts with the highest load per copy, one at a time.
  np.testing.assert_array_equal(np.nonzero(copies[0] > 1)[0], [1, 4, 5, 10])
  np.testing.assert_array_equal(np.nonzero(copies[1] > 1)[0], [5, 6, 7, 8])


def test_hierarchical_mode_reproduces_the_readme_example():
  placement = eplb.eplb_placement(README_WEIGHTS, num_devices=8, slots_per_device=2, num_groups=4, num_nodes=2)
  # Published output (phy2log) of the EPLB README for this input: 16 slots, 4 groups, 2 nodes, 8 GPUs.
  np.testing.assert_array_equal(placement.reshape(2, 16),
                                [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                                 [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]])


def test_groups_that_do_not_divide_over_nodes_fall_back_to_the_global_mode():
  np.testing.assert_array_equal(eplb.eplb_placement(README_WEIGHTS, 8, 2, num_groups=3, num_nodes=2),
                                eplb.eplb_placement(README_WEIGHTS, 8, 2))


def test_balanced_packing_puts_the_heaviest_first_into_the_lightest_pack_with_room():
  pack, position = eplb.balanced_packing(np.array([[10.0, 9, 8, 1, 1, 1]]), num_packs=2, per_pack=3)
  np.testing.assert_array_equal(pack[0], [0, 1, 1, 0, 0, 1])
  assert sorted(zip(pack[0], position[0])) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]


def test_placement_fills_every_slot_and_keeps_every_expert():
  rng = np.random.default_rng(1)
  w = rng.gamma(0.5, 100.0, (5, 32))
  placement = eplb.eplb_placement(w, num_devices=8, slots_per_device=6)
  assert placement.shape == (5, 8, 6) and placement.min() >= 0
  np.testing.assert_array_equal(copies_per_expert(placement.reshape(5, -1), 32), eplb.replicate(w, 48)[0])
  # Device loads under the even split stay within the heaviest single copy of each other.
  copies, _ = eplb.replicate(w, 48)
  per_copy = np.take_along_axis(w / copies, placement.reshape(5, -1), axis=1).reshape(5, 8, 6)
  load = per_copy.sum(-1)
  assert (load.max(-1) - load.min(-1) <= per_copy.max((1, 2)) + 1e-9).all()


def test_hierarchical_plans_keep_each_node_on_its_groups_after_alignment():
  from foremoe_jax.planner import PlanConfig, plan_step
  rng = np.random.default_rng(2)
  counts = rng.gamma(0.3, 50.0, (2, 6, 8, 16)).round()
  plan = plan_step(counts, PlanConfig(16, 8, 3, policy="eplb_step", eplb_groups=4, eplb_nodes=2))
  raw = eplb.eplb_placement(counts.sum((0, 2)), 8, 3, num_groups=4, num_nodes=2)
  for layer in range(6):  # alignment may only relabel devices inside a node
    for node in (slice(0, 4), slice(4, 8)):
      assert set(plan.base[layer, node].ravel()) == set(raw[layer, node].ravel())
