"""A move is priced as the executor ships it: per tenure one fetch and one gradient return, in the weights'
dtype for a tenure of one micro-step, as a float32 sum for a longer one."""
import jax.numpy as jnp
import numpy as np
import pytest

from foremoe_jax.planner import CostModel, PlanConfig, home_placement, plan_step
from foremoe_jax.planner.plan import Plan
from foremoe_jax.planner.split import plan_shares
from foremoe_jax.planner.tenures import keep_or_move, new_tenures
from foremoe_jax.step_tables import prepare_step, tenures
from foremoe_jax.transfer import fill_moves
from foremoe_jax.trees import accumulators

E, D, S, M, L = 8, 2, 6, 5, 2


def hand_made_schedule() -> np.ndarray:
  """[M, L, D, S] on the home base (slots 4 and 5 of each device redundant, empty): tenures of 1, 2 and 5
  micro-steps, back to back in one slot, a local copy, an emptied slot, one ending with the step."""
  base = home_placement(E, D, S)
  se = np.repeat(np.repeat(base[None, None], M, 0), L, 1)
  se[:, 0, 0, 4] = 5  # one tenure of all five micro-steps
  se[:, 0, 0, 5] = [-1, 6, 7, 7, 2]  # one micro-step, then two, then one (the last)
  se[:, 0, 1, 4] = [1, 1, -1, 2, 3]  # two, then emptied, then one and one
  se[:, 0, 1, 5] = [4, -1, -1, 4, -1]  # local copies of device 1's own expert: one micro-step each
  se[4, 1, 1, 5] = 0  # layer 1: one micro-step at the step's end
  return se


def executor_bytes(cost: CostModel, weights) -> np.ndarray:
  """float [M, L, D]: what the executor ships for the tenures starting in each (m, l), per device: the
  replica's weights, and its gradient back in the weights' dtype when it lasts one micro-step (a direct
  return), else as the sum its held accumulator row kept (`trees.accumulators`, the executor's)."""
  se = hand_made_schedule()
  base = np.broadcast_to(home_placement(E, D, S), (L, D, S))
  counts = np.ones((M, L, D, E), np.int64)
  shares = plan_shares(se.reshape(M * L, D, S), counts.reshape(M * L, D, E))
  plan = Plan(se.astype(np.int32), shares.reshape(M, L, D, D * S), base.astype(np.int32), "foremoe",
              PlanConfig(E, D, S))
  plan.validate()
  step = prepare_step(plan, counts, E, capacity=64)
  spans = tenures([[fill_moves(se[m, l], base[l]) for l in range(L)] for m in range(M)])
  direct = [t.end == t.start for t in spans]
  assert step.flushed_slots == len(spans) and step.held_tenures == len(spans) - sum(direct)
  params = 3 * cost.hidden * cost.expert_intermediate
  weight_bytes = jnp.dtype(weights).itemsize
  held_bytes = accumulators(jnp.zeros((), weights)).dtype.itemsize
  out = np.zeros((M, L, D))
  for t, one in zip(spans, direct):
    out[t.start, t.layer, t.move[2]] += params * (weight_bytes + (weight_bytes if one else held_bytes))
  return out


@pytest.mark.parametrize("weights", [jnp.bfloat16, jnp.float32])
def test_priced_tenures_are_the_executors_bytes(weights):
  """Per (m, l), the cost model's transfer time (no overlap, by bandwidth) is the busiest device's bytes
  of the tenures starting there over the link: a bf16 tenure of one micro-step 2 expert-sized transfers,
  a longer one 3 (float32 weights: 2 each)."""
  cost = CostModel(hidden=4, expert_intermediate=2, bytes_per_param=jnp.dtype(weights).itemsize)
  short, long = new_tenures(hand_made_schedule(), np.broadcast_to(home_placement(E, D, S), (L, D, S)))
  assert (short.sum(), long.sum()) == (7, 3)
  bytes_MxLxD = executor_bytes(cost, weights)
  priced = cost.layer_s(np.zeros((M, L)), short, long) * cost.link_bytes_per_s
  np.testing.assert_allclose(priced, bytes_MxLxD.max(-1), rtol=1e-12)
  units = {jnp.bfloat16: (2, 3), jnp.float32: (2, 2)}[weights]
  np.testing.assert_allclose(np.array([cost.direct_move_s, cost.move_s]) * cost.link_bytes_per_s,
                             np.array(units) * cost.expert_bytes, rtol=1e-12)
  assert cost.base_move_s == cost.move_s  # the base's gradients always go home as float32 sums


def test_a_one_micro_step_move_pays_at_its_bf16_price():
  """A replica that relieves the busiest device of more than a one-micro-step tenure costs (fetch and a
  bf16 gradient) but less than a float32 return would add is moved for that micro-step only: priced
  with a float32 return, as before, keeping the base was cheaper."""
  cfg = PlanConfig(E, D, S, cost=CostModel())
  base = np.stack([home_placement(E, D, S)] * L)
  moved = np.repeat(base[None], M, 0)
  moved[2, :, 1, 4] = 0  # micro-step 2 only: a replica of device 0's expert 0 on device 1
  saving = (cfg.cost.direct_move_s + cfg.cost.move_s) / 2 / cfg.cost.token_compute_s  # pairs
  keep = np.full((M, L), 2e4)
  load = np.stack([keep, np.where(np.arange(M)[:, None] == 2, keep - saving, keep)])
  choice, seconds = keep_or_move(load, moved, base, cfg)
  np.testing.assert_array_equal(choice, np.where(np.arange(M)[:, None] == 2, 1, 0) * np.ones((M, L), np.int64))
  keep_s = cfg.cost.layer_s(load[0]).sum(0)
  np.testing.assert_allclose(seconds, keep_s - saving * cfg.cost.token_compute_s + cfg.cost.direct_move_s)
  as_float32 = cfg.cost.layer_s(load[1, 2], 0, [0, 1])  # the same tenure priced with a float32 return
  assert (as_float32 > cfg.cost.layer_s(load[0, 2])).all()


def test_plan_step_moves_for_one_micro_step_where_the_bf16_return_pays():
  """End to end: one micro-step of a skewed expert; a replica for that micro-step saves more than its
  fetch and bf16 gradient cost (the plan takes it, balanced) but less than a float32 return would add
  (priced so, the planner kept the home base: 6,298 / 4,000 pairs in that micro-step)."""
  cost = CostModel(a2a_bytes_per_s=1e30)  # the exchange free: only compute and transfers count
  extra = int((cost.direct_move_s + cost.move_s) / 2 / cost.token_compute_s)  # a replica moves half of 2x this
  assert cost.direct_move_s < extra * cost.token_compute_s < cost.move_s
  counts = np.full((3, 1, D, E), 500, np.int64)
  counts[1, :, :, 0] += extra
  plan = plan_step(counts, PlanConfig(E, D, 5, cost=cost))
  plan.validate()
  np.testing.assert_array_equal(plan.moved_mask().any((1, 2, 3)), [False, True, False])
  np.testing.assert_array_equal(plan.device_load(counts)[1, 0], [4000 + extra] * 2)
