"""Deferred replica gradients: a slot's gradients wait in a per-slot float32 accumulator while it keeps
its expert and go back to the base once per tenure; the step still equals the plain home-layout step."""
import jax
import numpy as np
import optax
import pytest
from flax import nnx

from foremoe_jax.executor import Executor
from foremoe_jax.planner import PlanConfig
from foremoe_jax.planner.plan import Plan
from foremoe_jax.planner.split import plan_shares
from foremoe_jax.step_tables import Tenure, assign_held_rows, capacity_power_of_two, prepare_step, tenures
from foremoe_jax.transfer import fill_moves
from moe_reference import cpu_mesh, random_placement
from test_executor import D, E, L, M, S, loss_fn, make_model, skewed_micro_batches

def movable_slots(base_DxS):
  """Global slots holding a copy of an expert an earlier slot holds: free to change, every expert stays."""
  flat = base_DxS.reshape(-1)
  return np.array([g for g in range(flat.size) if (flat[:g] == flat[g]).any()])


def random_plan(counts, seed, unfilled=(), held=False) -> Plan:
  """A base that is no home layout, and micro-steps whose non-primary slots mostly change each
  micro-step: replicas of a few experts (so one expert often sits on several devices) or empty.
  `unfilled` micro-steps keep the base in every layer; `held`: layer 0's first movable slot keeps one
  replica throughout."""
  rng = np.random.default_rng(seed)
  base = np.stack([random_placement(rng, E, D, S, empty_fraction=0.0)[0] for _ in range(L)])
  slot_expert = np.repeat(base[None], M, 0)
  for l in range(L):
    flat, movable = base[l].reshape(-1), movable_slots(base[l])
    for m in set(range(M)) - set(unfilled):
      new = rng.choice(np.array([-1, 0, 1, 2, 3]), size=len(movable), p=[0.1, 0.3, 0.2, 0.2, 0.2])
      slot_expert[m, l].reshape(-1)[movable] = np.where(rng.random(len(movable)) < 0.8, new, flat[movable])
  if held:
    d, j = divmod(int(movable_slots(base[0])[0]), S)
    slot_expert[:, 0, d, j] = (base[0, d, j] + 1) % E
  shares = plan_shares(slot_expert.reshape(M * L, D, S), counts.reshape(M * L, D, E))
  plan = Plan(slot_expert.astype(np.int32), shares.reshape(M, L, D, D * S), base.astype(np.int32), "foremoe",
              PlanConfig(E, D, S))
  plan.validate()
  return plan


def count_tenures(plan) -> tuple[int, np.ndarray]:
  """(tenures, bool [M, L, D, S]: the slot is in a tenure of two micro-steps or more), from the placements
  alone: a slot off the base starts a tenure unless it held the same expert in the micro-step before (a
  move's source depends only on the slot's expert and the base)."""
  off = (plan.slot_expert >= 0) & (plan.slot_expert != plan.base[None])
  kept = np.zeros_like(off)
  kept[1:] = off[:-1] & (plan.slot_expert[1:] == plan.slot_expert[:-1])
  long = kept.copy()
  long[:-1] |= kept[1:]  # kept into the next micro-step
  return int((off & ~kept).sum()), off & long


def written(moves, l):
  """{(device, row)} a MoveTables writes in layer l (local copies' and received rows)."""
  local = {(d, int(r)) for d in range(D) for r in np.asarray(moves.local_dst_DxL)[l, d] if r >= 0}
  recv = {(d, int(r)) for d in range(D) for r in np.asarray(moves.recv_DxRxK)[l, d].ravel() if r >= 0}
  assert not local & recv
  return local | recv


def read(moves, l):
  """The rows a MoveTables reads in layer l, as a sorted list of (device, row)."""
  local = [(d, int(r)) for d in range(D) for r in np.asarray(moves.local_src_DxL)[l, d] if r >= 0]
  send = [(d, int(r)) for d in range(D) for r in np.asarray(moves.send_DxRxK)[l, d].ravel() if r >= 0]
  return sorted(local + send)


def setup_step(seed, unfilled, held):
  counts = skewed_counts(seed)
  plan = random_plan(counts, seed, unfilled, held)
  fills = [[fill_moves(plan.slot_expert[m, l], plan.base[l]) for l in range(L)] for m in range(M)]
  return plan, fills, prepare_step(plan, counts, E, capacity=64)


HOST_CASES = [(0, (2,), False), (1, (), True), (2, (0, 3), False), (3, (1, 3), False)]


@pytest.mark.parametrize("seed,unfilled,held", HOST_CASES)
def test_each_tenure_goes_back_once(seed, unfilled, held):
  """Host side: every tenure's gradient goes back exactly once, at its end: a one-micro-step tenure's
  from that micro-step's gradient (direct), a longer one's by the flush of its held row; a slot held for
  all M micro-steps once, by the last; a micro-step before one that keeps the base returns its whole
  fill; nothing goes back in a micro-step that keeps the base."""
  plan, fills, step = setup_step(seed, unfilled, held)
  spans = tenures(fills)
  num, long_MxLxDxS = count_tenures(plan)
  assert step.moved_slots == sum(len(f) for row in fills for f in row) >= step.flushed_slots == len(spans) == num
  assert step.held_tenures == sum(t.end > t.start for t in spans) < step.flushed_slots
  # (1, 3) keep the base: every tenure lasts one micro-step, none is held
  assert (step.held_tenures == 0) == (unfilled == (1, 3)) == (step.moved_slots == step.flushed_slots)
  assert list(step.fill_M) == [m not in unfilled for m in range(M)]
  assert list(step.hold_M) == list(long_MxLxDxS.any((1, 2, 3)))
  assert list(step.direct_M | step.hold_M) == list(step.fill_M)
  for m in range(M):
    for l in range(L):
      ending = [t for t in spans if t.end == m and t.layer == l]
      direct, flushed = [t for t in ending if t.start == m], [t for t in ending if t.start < m]
      assert written(step.direct_moves_M[m], l) == {t.move[2:] for t in direct}
      assert read(step.direct_moves_M[m], l) == sorted(t.move[:2] for t in direct)
      assert read(step.flush_moves_M[m], l) == sorted(t.move[:2] for t in flushed)
      if m == M - 1 or m + 1 in unfilled:
        assert sorted(t.move for t in ending) == sorted(fills[m][l])
    assert step.direct_M[m] == any(t.end == t.start == m for t in spans)
    assert step.flush_M[m] == any(t.end == m > t.start for t in spans)
  if held:
    d, j = divmod(int(movable_slots(plan.base[0])[0]), S)
    assert [(t.start, t.end) for t in spans if t.layer == 0 and t.move[2:] == (d, j)] == [(0, M - 1)]
    assert (d, j) not in written(step.direct_moves_M[M - 1], 0)


def live_rows(step, m, l):
  """{(device, slot row): held row} of micro-step m's hold table in layer l."""
  slot, held = (np.asarray(t)[l] for t in step.hold_tables_M[m])
  return {(d, int(j)): int(h) for d in range(D) for j, h in zip(slot[d], held[d]) if j >= 0}


@pytest.mark.parametrize("seed,unfilled,held", HOST_CASES)
def test_held_rows_are_compact_and_kept_per_tenure(seed, unfilled, held):
  """Host side: exactly the slots of tenures of two micro-steps or more wait in held rows of their device
  (one-micro-step tenures are not held); no two tenures alive at once share one; a tenure keeps its row
  from start to end, and its flush reads that row; H is the most held tenures alive at once on one
  device (counted from the placements), rounded up to a power of two (1 when nothing is held)."""
  plan, fills, step = setup_step(seed, unfilled, held)
  spans = tenures(fills)
  _, long_MxLxDxS = count_tenures(plan)
  need = int(long_MxLxDxS.sum(-1).max())
  assert step.held_rows == capacity_power_of_two(max(1, need)) < S
  assert all(t.held_DxK.shape[-1] == step.held_rows for t in step.hold_tables_M)
  for l in range(L):
    for m in range(M):
      rows = live_rows(step, m, l)
      assert sorted(rows) == sorted(map(tuple, np.argwhere(long_MxLxDxS[m, l])))
      assert len({(d, h) for (d, _), h in rows.items()}) == len(rows)  # no shared row
      assert all(0 <= h < step.held_rows for h in rows.values())
      for t in spans:  # a tenure keeps its row, and its flush reads it
        if t.layer == l and t.start < m <= t.end:
          assert rows[t.move[2:]] == live_rows(step, m - 1, l)[t.move[2:]]
      ends = [t.move[2:] for t in spans if t.layer == l and t.end == m > t.start]
      assert written(step.flush_moves_M[m], l) == {(d, rows[d, j]) for d, j in ends}


def test_interval_assignment_reuses_freed_rows():
  """Tenures [0, 1], [1, 2], [2, 3] and [3, 3] on one device need 2 rows: the third takes the first's row
  once it ended; another device's or layer's tenures count apart; a fixed capacity below the need fails."""
  spans = [Tenure(0, (0, 0, 1, 0), 0, 1), Tenure(0, (0, 1, 1, 1), 1, 2), Tenure(0, (0, 2, 1, 2), 2, 3),
           Tenure(0, (0, 0, 1, 0), 3, 3), Tenure(0, (0, 0, 2, 0), 1, 2), Tenure(1, (0, 0, 1, 0), 1, 2)]
  rows, need = assign_held_rows(spans)
  assert need == 2 and [rows[t] for t in spans] == [0, 1, 0, 1, 0, 0]
  counts = skewed_counts(0)
  plan = random_plan(counts, 0, (2,))
  need = prepare_step(plan, counts, E, capacity=64).held_rows
  assert prepare_step(plan, counts, E, capacity=64, held_capacity=2 * need).held_rows == 2 * need
  with pytest.raises(ValueError, match="held_capacity"):
    prepare_step(plan, counts, E, capacity=64, held_capacity=need // 2)


def skewed_counts(seed):
  return np.random.default_rng(seed).integers(0, 6, (M, L, D, E))


@pytest.fixture(scope="module")
def setting():
  """Micro-batches, their counts, and the plain step's (gradients, loss, updated parameters): plain
  autodiff of the summed micro-step losses in the home layout, one program, and SGD (lr 0.5) on it."""
  mesh = cpu_mesh(1, D)
  batches, counts = skewed_micro_batches(mesh, seed=3)
  graphdef, params, rest = nnx.split(make_model(mesh), nnx.Param, ...)

  def total_loss(params):
    model = nnx.merge(graphdef, params, rest)
    return sum(loss_fn(model, b, tables=None, working=None, capacity=64)[0] for b in batches)

  loss, grads = jax.jit(jax.value_and_grad(total_loss))(params)
  return mesh, batches, counts, (grads, float(loss), jax.tree.map(lambda p, g: p - 0.5 * g, params, grads))


def run(executor, batches, step):
  """(gradients, loss, updated parameters) of one step from a fresh model's parameters."""
  params, opt_state = executor.init(make_model(executor.mesh))
  grads = executor.gradients(params, batches, step)
  updated, _, metrics = executor.train_step(params, opt_state, batches, step)
  return grads, metrics["loss"], updated


def assert_close(got, want):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * float(np.abs(w).max()))


@pytest.mark.parametrize("fused,seed,unfilled,held", [(True, 0, (2,), False), (False, 0, (2,), False),
                                                     (False, 1, (), True), (True, 1, (), True),
                                                     (True, 3, (1, 3), False)])
def test_deferred_step_equals_the_plain_step(setting, fused, seed, unfilled, held):
  """Random plans that move most non-primary slots every micro-step (replicas of one expert on several
  devices, emptied slots), so most tenures last one micro-step (returned directly) and some longer
  (held, flushed), with a micro-step that keeps the base in between, a slot that keeps its replica
  throughout, or only one-micro-step tenures (nothing held): loss, gradients and updated parameters
  equal the plain home-layout step's, with the first and last programs fused (the last flushes and
  updates) or separate."""
  mesh, batches, counts, (grads_ref, loss_ref, params_ref) = setting
  plan = random_plan(counts, seed, unfilled, held)
  step = prepare_step(plan, counts, E, capacity=64)
  assert Executor.layout(step) == (False, True) and step.direct_M.any()
  assert (step.held_tenures > 0) == (unfilled != (1, 3)) and step.flushed_slots > step.held_tenures
  executor = Executor(make_model(mesh), optax.sgd(0.5), loss_fn, mesh, fused=fused)
  grads, loss, params = run(executor, batches, step)
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
  assert_close(grads, grads_ref)
  assert_close(params, params_ref)
