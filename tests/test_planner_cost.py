"""The cost model's measured exposed costs per path, the link / host split of a device's refills, and
the Plan's record of host-path refills."""
import dataclasses
import itertools
import json
import math

import numpy as np
import pytest

from foremoe_jax.planner import CostModel, PlanConfig, home_placement, plan_step
from foremoe_jax.planner.config import CALIBRATION_DIR, DEFAULT_CARD
from foremoe_jax.planner.tenures import keep_or_move, new_tenures


def test_calibrated_loads_the_committed_calibration():
  cost = CostModel.calibrated()
  cal = json.loads((CALIBRATION_DIR / f"{DEFAULT_CARD}.json").read_text())
  assert math.isclose(cost.link_exposed_s, cal["link_exposed_ms"] * 1e-3) and cal["card"] in cost.calibration
  assert cal["host_exposed_ms"] is None or math.isclose(cost.host_exposed_s, cal["host_exposed_ms"] * 1e-3)


def test_calibration_scales_with_expert_bytes_and_names_missing_cards(tmp_path):
  path = tmp_path / "card.json"
  path.write_text(json.dumps(dict(card="x", device="X", jax="0", shapes=dict(hidden=2048, expert=768),
                                  link_exposed_ms=1.0, host_exposed_ms=0.2)))
  same, half = CostModel.calibrated(path=path), CostModel.calibrated(path=path, expert_intermediate=384)
  assert math.isclose(same.host_exposed_s, 2e-4) and math.isclose(half.link_exposed_s, 5e-4)
  with pytest.raises(ValueError, match="no calibration for card 'nope'"):
    CostModel.calibrated(card="nope")
  with pytest.raises(ValueError, match="host_exposed_s"):
    CostModel(host_exposed_s=-1.0)


def test_refills_split_between_concurrent_paths():
  cost = CostModel(link_exposed_s=1.0, host_exposed_s=0.5, link_bytes_per_s=1e30)  # no gradient return cost
  moves = np.array([0, 1, 2, 3, 4])
  zeros = np.zeros_like(moves)
  # h on the host, the rest on the link, concurrently: max(0.5 h, k - h) at its best h.
  np.testing.assert_array_equal(cost.host_moves(moves, zeros)[0], [0, 1, 1, 2, 3])
  np.testing.assert_allclose(cost.moves_s(moves, zeros), [0.0, 0.5, 1.0, 1.0, 1.5])
  # A longer tenure's link cost is scaled by its bytes (bf16: 3 expert-sized transfers to 2); the host
  # fetch costs the same whatever the tenure's length.
  np.testing.assert_allclose(cost.moves_s(zeros, moves), [0.0, 0.5, 1.0, 1.5, 1.5])
  np.testing.assert_array_equal(cost.host_moves(zeros, moves)[1], [0, 1, 2, 2, 3])
  np.testing.assert_allclose(cost.moves_s(moves, moves), [0.0, 1.0, 1.5, 2.0, 3.0])
  link_only = dataclasses.replace(cost, host_exposed_s=None)
  np.testing.assert_allclose(link_only.moves_s(moves, zeros), moves * 1.0)
  assert all((h == 0).all() for h in link_only.host_moves(moves, moves))
  # The host refills' gradients go home over the link: priced there.
  slow_grads = dataclasses.replace(cost, link_bytes_per_s=cost.expert_bytes * 2 / 10.0)
  assert all((h == 0).all() for h in slow_grads.host_moves(moves, moves))


def skewed_counts(seed, micro=4, layers=2, devices=8, experts=32):
  rng = np.random.default_rng(seed)
  weights = rng.dirichlet(np.full(experts, 0.3), size=(micro, layers))
  return np.stack([[[rng.multinomial(512, weights[m, l]) for _ in range(devices)] for l in range(layers)]
                   for m in range(micro)])


def test_plan_records_host_path_refills_where_the_host_is_cheaper():
  counts = skewed_counts(0)
  free_host = CostModel(link_exposed_s=1.0, host_exposed_s=0.0, link_bytes_per_s=1e30)
  plan = plan_step(counts, PlanConfig(32, 8, 5, max_moves_per_device=2, cost=free_host))
  plan.validate()
  moved = plan.moved_mask() & (plan.slot_expert >= 0)
  assert moved.any() and plan.host_path.any() and not (plan.host_path & ~moved).any()
  link = plan_step(counts, PlanConfig(32, 8, 5, cost=CostModel(link_bytes_per_s=1e30)))
  assert link.moved_mask().any() and not link.host_path.any()  # no host path priced: all on the link
  bad = dataclasses.replace(plan, host_path=~moved)
  with pytest.raises(ValueError, match="host_path marks a slot"):
    bad.validate()
  with pytest.raises(ValueError, match="host_path must be a numpy bool"):
    dataclasses.replace(plan, host_path=moved.astype(np.int8)).validate()


def test_a_replica_kept_over_micro_steps_is_priced_once():
  """A tenure (a slot holding one replica over consecutive micro-steps) pays one fetch and one gradient
  return where it starts, by its length; an emptied slot and a slot back on the base pay nothing."""
  base = np.stack([home_placement(8, 2, 5)])  # [L=1, D=2, S=5]: slots 4 on each device are redundant
  se = np.repeat(base[None], 4, 0)
  se[:, 0, 0, 4] = 5  # device 0 holds a replica of expert 5 all four micro-steps: one long tenure
  se[1:3, 0, 1, 4] = [1, 2]  # device 1: two one-micro-step tenures
  se[3, 0, 1, 4] = -1  # emptied: no tenure
  short, long = new_tenures(se, base)
  np.testing.assert_array_equal(short[:, 0], [[0, 0], [0, 1], [0, 1], [0, 0]])
  np.testing.assert_array_equal(long[:, 0], [[1, 0], [0, 0], [0, 0], [0, 0]])
  np.testing.assert_array_equal((se != base[None]).sum(-1).max(-1)[:, 0], [1, 1, 1, 1])


def test_keep_or_move_is_the_cheapest_path_over_micro_steps():
  """foremoe's per-layer choice between the base and the moved candidate, micro-step by micro-step, is
  exact on the cost model, one-micro-step tenures priced at their bf16 return (brute force over every
  choice, with and without a host path), and keeps a replica whose saving per micro-step is below a
  tenure's cost when it holds over enough micro-steps."""
  rng = np.random.default_rng(1)
  num_micro, layers = 5, 3
  base = np.stack([home_placement(8, 2, 6)] * layers)
  moved = np.repeat(base[None], num_micro, 0)
  moved[..., 4:] = rng.choice([-1, 0, 5, 6], size=(num_micro, layers, 2, 2))
  for cost in (CostModel(), CostModel(link_exposed_s=1e-4, host_exposed_s=1.2e-4)):
    cfg = PlanConfig(8, 2, 6, cost=cost)
    saving = cfg.cost.direct_move_s / cfg.cost.token_compute_s / 2  # half a one-micro-step tenure's price
    keep_load = rng.uniform(1e4, 2e4, (num_micro, layers))
    load = np.stack([keep_load, keep_load - saving * rng.uniform(0.5, 1.5, (num_micro, layers))])
    choice, seconds = keep_or_move(load, moved, base, cfg)
    for l in range(layers):
      best = np.inf
      for path in itertools.product((0, 1), repeat=num_micro):
        se = np.where(np.array(path)[:, None, None], moved[:, l], base[l])
        tenures = new_tenures(se[:, None], base[l][None])[:, :, 0]
        total = cfg.cost.layer_s(load[list(path), range(num_micro), l], *tenures)
        best = min(best, total.sum())
        if path == tuple(choice[:, l]):
          assert math.isclose(total.sum(), seconds[l])
      assert math.isclose(seconds[l], best)
  cfg = PlanConfig(8, 2, 6, cost=CostModel())
  held = np.repeat(base[None], num_micro, 0)
  held[:, :, 0, 4] = 5
  saving = cfg.cost.move_s / cfg.cost.token_compute_s / 3  # a third of a long tenure's price per micro-step
  steady = np.stack([keep_load, keep_load - saving])
  assert (keep_or_move(steady, held, base, cfg)[0] == 1).all()
