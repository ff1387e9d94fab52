"""The executor: a whole step under changing placements equals the static layout, on loss, gradients and
updated parameters; new plans never recompile."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from foremoe_jax import MoEConfig
from foremoe_jax import step_programs
from foremoe_jax.executor import Executor
from foremoe_jax.step_programs import PLAIN
from foremoe_jax.step_tables import prepare_step, table_sizes
from foremoe_jax.moe_stack import MoEStack
from foremoe_jax.trees import accumulators
from foremoe_jax.planner import CostModel, PlanConfig, plan_step
from foremoe_jax.planner.pairs import bucket
from foremoe_jax.planner.split import plan_shares
from compile_count import count_compiles
from moe_reference import cpu_mesh

E, D, S, L, H, M = 16, 8, 3, 2, 16, 4
B, T = 8, 6


def loss_fn(model, batch, *, tables, working, capacity):
  out = model(batch["x"], tables, batch["replay"], capacity=capacity, working=working)
  loss = jnp.sum((out.y - batch["target"]) ** 2) / (M * B * T)
  return loss, {"dropped": out.dropped}


def make_model(mesh):
  cfg = MoEConfig(d_model=H, d_ff_expert=8, num_experts=E, top_k=2, slots_per_device=S)
  return MoEStack(cfg, L, mesh=mesh, rngs=nnx.Rngs(0))


def skewed_micro_batches(mesh, seed=0, tokens=T):
  """Micro-batches whose captured routes pile onto a few experts, differently in each micro-step."""
  model = make_model(mesh)
  graphdef, state = nnx.split(model)
  capture = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x).routes)
  batches, counts = [], np.zeros((M, L, D, E), np.int64)
  for m in range(M):
    kx, kt = jax.random.split(jax.random.key(seed * 100 + m))
    x = jax.random.normal(kx, (B, tokens, H)) + 2.0 * jax.random.normal(jax.random.key(m), (H,))
    routes = capture(state, x)
    batches.append({"x": x, "target": jax.random.normal(kt, (B, tokens, H)), "replay": routes})
    source = np.repeat(np.arange(B) // (B // D), tokens * 2)
    for l in range(L):
      np.add.at(counts[m, l], (source, np.asarray(routes[:, :, l]).reshape(-1)), 1)
  return batches, counts


@pytest.fixture(scope="module")
def step_inputs():
  mesh = cpu_mesh(1, D)
  batches, counts = skewed_micro_batches(mesh)
  executor = Executor(make_model(mesh), optax.sgd(0.5), loss_fn, mesh)
  return mesh, batches, counts, executor


def home_base(plan):
  """`plan` with its base replaced by the home layout (the micro-steps' placements kept)."""
  return dataclasses.replace(plan, base=np.stack([home_placement(E, D, S)] * L))


def home_placement(num_experts, num_devices, slots):
  per = num_experts // num_devices
  return np.array([[d * per + j if j < per else -1 for j in range(slots)] for d in range(num_devices)])


def run(executor, batches, counts, policy, prefetch=True, at_home=False, sizes=None):
  """Gradients and one update from the same initial parameters, under `policy`'s plan (its base
  replaced by the home layout when `at_home`), its tables sized by `sizes` if given."""
  # These micro-steps are tiny: a near-free link makes per-micro-step moves pay off in the cost model.
  cost = CostModel(link_bytes_per_s=1e18)
  plan = plan_step(counts, PlanConfig(num_experts=E, num_devices=D, slots_per_device=S, policy=policy, cost=cost))
  plan = home_base(plan) if at_home else plan
  step = prepare_step(plan, counts, E, capacity=64, sizes=sizes)
  params, opt_state = fresh_state(executor)
  grads = executor.gradients(params, batches, step, prefetch=prefetch)
  updated, _, metrics = executor.train_step(params, opt_state, batches, step, prefetch=prefetch)
  return plan, step, grads, metrics, updated


def fresh_state(executor):
  """(params, opt_state) of a new `make_model` (seeded: the same each time) for `executor`."""
  return executor.init(make_model(executor.mesh))


@pytest.fixture(scope="module")
def separate_programs(step_inputs):
  """The baseline schedule: base transfer and update in programs of their own."""
  return Executor(make_model(step_inputs[0]), optax.sgd(0.5), loss_fn, step_inputs[0], fused=False)


@pytest.mark.parametrize("policy,prefetch,schedule", [
    ("foremoe", True, "fused"), ("foremoe", False, "fused"), ("eplb_microstep", True, "fused"),
    ("foremoe", True, "at_home"), ("foremoe", True, "separate")])
def test_step_under_changing_placements_equals_static(step_inputs, separate_programs, policy, prefetch, schedule,
                                                      monkeypatch):
  """Every schedule (prefetch or refill before, fused first / last programs or separate ones, a base at
  home) gives the static layout's (the plain step's) loss, gradients and update, with random plans that
  move many slots per micro-step."""
  _, batches, counts, executor = step_inputs
  static, step, grads_ref, metrics_ref, params_ref = run(executor, batches, counts, "static")
  assert Executor.layout(step) == PLAIN
  traced = count_calls(monkeypatch, "home_to_base")
  executor = separate_programs if schedule == "separate" else executor
  plan, step, grads, metrics, params = run(executor, batches, counts, policy, prefetch, schedule == "at_home")
  assert Executor.layout(step) == (schedule == "at_home", True)
  if schedule == "at_home":  # its programs are new here, so traced: no base transfer among them
    assert not traced
  assert plan.imbalance(counts) < static.imbalance(counts)
  assert step.moved_slots > 0 and step.refilled_slots > 0 and step.refill_M[1:].any()
  assert int(np.sum(metrics["metrics"]["dropped"])) == 0
  np.testing.assert_allclose(metrics["loss"], metrics_ref["loss"], rtol=1e-5)
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)
  for p, r in zip(jax.tree.leaves(params), jax.tree.leaves(params_ref)):
    np.testing.assert_allclose(p, r, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("policy", ["foremoe", "static"])
def test_fixed_table_sizes_change_no_number(step_inputs, policy):
  """A run's `TableSizes` (foremoe's bounds: one layout, base and working slots, every micro-step's full
  program, empty tables moving nothing) give the static layout's loss, gradients and update: for a plan
  that moves slots, and for the home plan run in that layout (an empty base transfer)."""
  _, batches, counts, executor = step_inputs
  _, _, grads_ref, metrics_ref, params_ref = run(executor, batches, counts, "static")
  sizes = table_sizes(PlanConfig(num_experts=E, num_devices=D, slots_per_device=S))
  _, step, grads, metrics, params = run(executor, batches, counts, policy, prefetch=False, sizes=sizes)
  assert Executor.layout(step) == sizes.layout == (False, True) and step.layout == sizes.layout
  assert step.base_moves.send_DxRxK.shape[-1] == S and step.held_rows == 1
  assert (policy == "static") == (not step.fill_M.any())
  np.testing.assert_allclose(metrics["loss"], metrics_ref["loss"], rtol=1e-5)
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)
  for p, r in zip(jax.tree.leaves(params), jax.tree.leaves(params_ref)):
    np.testing.assert_allclose(p, r, rtol=1e-4, atol=1e-6)


def test_table_sizes_hold_every_plan_of_their_policy():
  """The bounds of `table_sizes` hold any plan of the policy (prepare_step refuses tables that overflow),
  and give every plan one table shape; a layout that cannot hold a plan is refused."""
  rng = np.random.default_rng(3)
  for policy in ("foremoe", "eplb_microstep", "eplb_step", "static"):
    cfg = PlanConfig(E, D, S, policy=policy, cost=CostModel(link_bytes_per_s=1e18))
    sizes, shapes, moving = table_sizes(cfg), set(), []
    for seed in range(6):
      weights = (rng.random(E) < 0.3 + 0.1 * seed) * (1 + 20 * rng.random(E))
      counts = (rng.integers(0, 50, (M, L, D, E)) * weights).astype(np.int64)
      plan = plan_step(counts, cfg)
      step = prepare_step(plan, counts, E, sizes=sizes)
      shapes.add(str(jax.tree.map(np.shape, (step.base_moves, step.fill_moves_M, step.refill_moves_M,
                                             step.hold_tables_M, step.direct_moves_M, step.flush_moves_M))))
      moving += [(plan, counts)] if step.fill_M.any() else []
    assert len(shapes) == 1 and bool(moving) == (policy in ("foremoe", "eplb_microstep")), policy
    if moving:
      with pytest.raises(ValueError, match="never leaves the base"):
        prepare_step(*moving[0], E, sizes=table_sizes(PlanConfig(E, D, S, policy="eplb_step")))


def count_calls(monkeypatch, *names):
  """Replaces the step programs' transfer functions `names` by counting wrappers; returns the calls' names."""
  calls = []
  for name in names:
    fn = getattr(step_programs, name)
    monkeypatch.setattr(step_programs, name,
                        lambda *a, _fn=fn, _name=name, **k: (calls.append(_name), _fn(*a, **k))[1])
  return calls


def relabel(plan, perm_E):
  """`plan` with expert e renamed perm_E[e]: other placements, the same pattern of moves."""
  rename = lambda a: np.where(a >= 0, perm_E[np.maximum(a, 0)], a)
  return dataclasses.replace(plan, slot_expert=rename(plan.slot_expert), base=rename(plan.base))


def test_new_plans_do_not_recompile(step_inputs):
  """Placements are traced table values: a new plan whose tables have the shapes of the last one's (the
  same capacities, refills and power-of-two move-table rows) runs the programs compiled for it (first,
  middle, last micro-step) as they are. Relabelled, this plan's base moves two experts between one pair
  of devices, so its base table needs 2 rows where the original needs 1: `base_capacity` fixes them."""
  _, batches, counts, executor = step_inputs
  plan = plan_step(counts, PlanConfig(E, D, S, policy="foremoe", cost=CostModel(link_bytes_per_s=1e18)))
  plans = (plan, relabel(plan, np.roll(np.arange(E), 5)))
  loose = [prepare_step(p, counts, E, capacity=64) for p in plans]
  assert [t.base_moves.send_DxRxK.shape[-1] for t in loose] == [1, 2]
  steps = [prepare_step(p, counts, E, capacity=64, base_capacity=2) for p in plans]
  assert jax.tree.map(np.shape, steps[0].base_moves) == jax.tree.map(np.shape, steps[1].base_moves)
  assert Executor.layout(steps[0]) == Executor.layout(steps[1]) == (False, True)
  for flags in ("refill_M", "fill_M", "hold_M", "flush_M"):
    assert (getattr(steps[0], flags) == getattr(steps[1], flags)).all()
  assert steps[0].held_rows == steps[1].held_rows
  for tables in ("hold_tables_M", "flush_moves_M"):
    assert jax.tree.map(np.shape, getattr(steps[0], tables)) == jax.tree.map(np.shape, getattr(steps[1], tables))
  assert any((a.slot_expert_G != b.slot_expert_G).any() for a, b in zip(steps[0].tables_M, steps[1].tables_M))
  params, opt_state, _ = executor.train_step(*fresh_state(executor), batches, steps[0])
  assert _backend_compiles(lambda: executor.train_step(params, opt_state, batches, steps[1])) == 0


def test_capacity_below_need_is_refused(step_inputs):
  _, _, counts, _ = step_inputs
  plan = plan_step(counts, PlanConfig(E, D, S, policy="static"))
  with pytest.raises(ValueError, match="below this step's need"):
    prepare_step(plan, counts, E, capacity=2)


def test_capacity_buckets_are_coarse():
  assert [bucket(n) for n in (1, 8, 9, 33, 100, 1000)] == [8, 8, 16, 40, 104, 1024]
  assert all(bucket(n) >= n and bucket(n) <= 1.0625 * n + 8 for n in range(1, 5000, 37))
  assert len({bucket(n) for n in range(4097, 8193)}) == 16
  assert [bucket(n, 1) for n in (1, 9, 100, 1000, 1025)] == [8, 16, 128, 1024, 2048]
  assert len({bucket(n, 4) for n in range(4097, 8193)}) == 4


def test_a_plan_with_fewer_capacity_buckets_compiles_fewer_capacities():
  """PlanConfig.capacity_buckets reaches the step's capacities (and the planner's prices of them)."""
  counts = np.random.default_rng(0).integers(0, 400, (M, L, D, E)) * np.arange(1, M + 1)[:, None, None, None]
  steps = {b: prepare_step(plan_step(counts, PlanConfig(E, D, S, policy="static", capacity_buckets=b)), counts, E)
           for b in (16, 1)}
  assert all(c & (c - 1) == 0 for c in steps[1].capacity_M)
  assert len(set(steps[1].capacity_M)) < len(set(steps[16].capacity_M))
  assert all(c1 >= c16 for c1, c16 in zip(steps[1].capacity_M, steps[16].capacity_M))
  with pytest.raises(ValueError, match="capacity_buckets"):
    PlanConfig(E, D, S, capacity_buckets=3)


def test_each_micro_step_gets_its_own_capacity_and_each_compiles_once(step_inputs):
  """By default micro-step m's capacity is its own largest (source, destination) pair count, bucketed;
  the step equals the static layout at a fixed capacity, and each distinct capacity traces once."""
  mesh = step_inputs[0]
  batches, counts = skewed_micro_batches(mesh, tokens=2 * T)  # enough pairs per source to span buckets
  traces = []

  def counting_loss(model, batch, **kw):
    traces.append(kw["capacity"])
    return loss_fn(model, batch, **kw)

  executor = Executor(make_model(mesh), optax.sgd(0.5), counting_loss, mesh)
  reference = Executor(make_model(mesh), optax.sgd(0.5), loss_fn, mesh)
  plan = plan_step(counts, PlanConfig(E, D, S, policy="static"))
  step = prepare_step(plan, counts, E)
  pairs_MxLxSrcxDst = plan.slot_pairs(counts).reshape(M, L, D, D, -1).sum(-1)
  assert step.capacity_M == tuple(bucket(int(n)) for n in pairs_MxLxSrcxDst.max((1, 2, 3)))
  assert len(set(step.capacity_M)) > 1 and step.capacity == max(step.capacity_M)
  grads = executor.gradients(fresh_state(executor)[0], batches, step)  # a dropped pair would show here
  want = reference.gradients(fresh_state(reference)[0], batches, prepare_step(plan, counts, E, capacity=step.capacity))
  for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)
  # one program per capacity and position (the first micro-step's program starts the accumulators)
  assert sorted(traces) == sorted(c for c, _ in {(c, m == 0) for m, c in enumerate(step.capacity_M)})


def test_accumulators_are_zero_filled_where_they_live(step_inputs):
  """No device-to-device copy: each shard is filled on its own device (eager zeros_like is not)."""
  _, _, _, executor = step_inputs
  params, _ = fresh_state(executor)
  with jax.transfer_guard_device_to_device("disallow"):
    acc = executor.zero_accumulators(params)
    jax.block_until_ready(acc)
    with pytest.raises(Exception, match="Disallowed device-to-device transfer"):
      jax.block_until_ready(accumulators(params))
  for a, p in zip(jax.tree.leaves(acc), jax.tree.leaves(params)):
    assert a.sharding == p.sharding and a.dtype == jnp.promote_types(p.dtype, jnp.float32) and not a.any()


def test_low_precision_gradients_accumulate_in_float32():
  tree = {"w": jnp.ones((2, 3), jnp.bfloat16), "f": jnp.ones(2), "i": jnp.ones(2, jnp.int32)}
  acc = accumulators(tree)
  assert {k: v.dtype for k, v in acc.items()} == {"w": jnp.float32, "f": jnp.float32, "i": jnp.int32}
  assert all(not v.any() for v in acc.values())


def test_static_step_equals_plain_autodiff(step_inputs):
  """The executor's gradients (base layout, transfers, accumulation) equal jax.grad of the summed
  micro-step losses of the plain model (home layout, no tables, no working slots)."""
  mesh, batches, counts, executor = step_inputs
  plan = plan_step(counts, PlanConfig(E, D, S, policy="foremoe", cost=CostModel(link_bytes_per_s=1e18)))
  params, opt_state = fresh_state(executor)
  grads = executor.gradients(params, batches, prepare_step(plan, counts, E, capacity=64))
  graphdef, _, rest = nnx.split(executor.model(params), nnx.Param, ...)

  def total_loss(params):
    model = nnx.merge(graphdef, params, rest)
    return sum(loss_fn(model, b, tables=None, working=None, capacity=64)[0] for b in batches)

  want = jax.jit(jax.grad(total_loss))(params)
  for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)
  # The home expert weights' gradients come from the base accumulators alone: none are kept for them.
  step = prepare_step(plan, counts, E, capacity=64)
  (dense_acc, base_acc), _, _ = executor.accumulate(params, batches, step)
  assert len(jax.tree.leaves(dense_acc)) == len(jax.tree.leaves(params)) - 2 * L == L  # the routers
  # The update is plain SGD on those gradients (lr 0.5), in the parameters' own dtypes.
  initial = jax.tree.map(np.asarray, params)
  new_params, _, _ = executor.train_step(params, opt_state, batches, step)
  for new, old, g in zip(jax.tree.leaves(new_params), jax.tree.leaves(initial), jax.tree.leaves(want)):
    assert new.dtype == old.dtype
    np.testing.assert_allclose(new, old - 0.5 * g, rtol=1e-4, atol=1e-6)


def collectives(text: str) -> dict:
  return {op: text.count(op) for op in ("all_to_all", "all_gather", "collective_permute", "all_reduce",
                                        "reduce_scatter")}


def test_a_step_at_home_is_the_plain_step(step_inputs, monkeypatch):
  """Base = home in every layer and never left (static policy; S = E/D): no transfer function is called,
  the micro-step program has the collectives of plain autodiff of the loss and nothing more, and the
  gradients and update are plain autodiff's."""
  mesh, batches, counts, _ = step_inputs
  slots = E // D
  model = MoEStack(MoEConfig(d_model=H, d_ff_expert=8, num_experts=E, top_k=2, slots_per_device=slots), L, mesh=mesh,
                   rngs=nnx.Rngs(0))
  calls = count_calls(monkeypatch, "apply_moves", "hold_rows", "flush_rows", "home_to_base", "home_to_base_transpose",
                      "pad_home")
  executor = Executor(model, optax.sgd(0.5), loss_fn, mesh)
  step = prepare_step(plan_step(counts, PlanConfig(E, D, slots, policy="static")), counts, E, capacity=64, mesh=mesh)
  assert step.at_home and Executor.layout(step) == PLAIN
  params, opt_state = executor.init(model)
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)

  def plain_loss(params, batch, tables):
    model = nnx.merge(graphdef, params, rest)
    working = [layer.expert_weights() for layer in model.moe_layers()]
    working = [(w_gate_up[...], w_down[...]) for w_gate_up, w_down in working]
    return loss_fn(model, batch, tables=tables, working=working, capacity=64)

  tables, kw = executor._micro_args(step, 1, None)
  acc = executor.programs.state(PLAIN, step.held_rows)[2]
  program = executor.programs.micro.lower(params, (), (), acc, batches[1], *tables, **kw)
  plain_grad = jax.jit(jax.value_and_grad(plain_loss, has_aux=True))
  want_ops = collectives(plain_grad.lower(params, batches[1], step.tables_M[1]).as_text())
  assert want_ops["all_to_all"] > 0 and collectives(program.as_text()) == want_ops

  def total_loss(params):
    model = nnx.merge(graphdef, params, rest)
    return sum(loss_fn(model, b, tables=None, working=None, capacity=64)[0] for b in batches)

  want = jax.jit(jax.grad(total_loss))(params)
  grads = executor.gradients(params, batches, step)
  for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)
  initial = jax.tree.map(np.asarray, params)
  new_params, _, _ = executor.train_step(params, opt_state, batches, step)
  for new, old, g in zip(jax.tree.leaves(new_params), jax.tree.leaves(initial), jax.tree.leaves(want)):
    np.testing.assert_allclose(new, old - 0.5 * g, rtol=1e-5, atol=1e-7)
  assert calls == []


def test_refills_write_only_changed_slots_and_skip_repeated_placements(step_inputs):
  """A placement repeated by the next micro-step needs no refill; one that returns to the base needs
  only local copies; the forward pass gives the same losses with and without prefetch."""
  _, batches, counts, executor = step_inputs
  plan = plan_step(counts, PlanConfig(E, D, S, policy="foremoe", cost=CostModel(link_bytes_per_s=1e18)))
  moved = plan.slot_expert[0]
  base_share = plan_shares(plan.base, counts[2]).reshape(plan.slot_share[2].shape).astype(np.float32)
  repeated = dataclasses.replace(plan, slot_expert=np.stack([moved, moved, plan.base, moved]),
                                 slot_share=np.stack([plan.slot_share[0]] * 2 + [base_share, plan.slot_share[0]]))
  step = prepare_step(repeated, counts, E, capacity=64)
  # Back to the base rewrites the changed slots the base fills; a slot the base leaves empty keeps its
  # stale replica (it gets no tokens).
  restored = (moved != plan.base) & (plan.base >= 0)
  assert list(step.refill_M) == [True, False, bool(restored.any()), True]
  sends = [np.asarray(moves.send_DxRxK) for moves in step.refill_moves_M]
  assert (sends[1] < 0).all() and (sends[2] < 0).all()  # nothing crosses devices to repeat or restore
  assert (np.asarray(step.refill_moves_M[2].local_src_DxL) >= 0).sum() == restored.sum()
  static = prepare_step(plan_step(counts, PlanConfig(E, D, S, policy="static")), counts, E, capacity=64)
  step = prepare_step(plan, counts, E, capacity=64)
  params, _ = fresh_state(executor)
  want = [float(loss) for loss, _ in executor.forward(params, batches, static)]
  for prefetch in (True, False):
    got = [float(loss) for loss, _ in executor.forward(params, batches, step, prefetch=prefetch)]
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_ppermute_exchange_step_equals_static(step_inputs):
  """The ppermute rounds (idle ones skipped by lax.cond; every one when prefetched) give the static
  layout's step too."""
  mesh, batches, counts, executor = step_inputs
  _, _, grads_ref, metrics_ref, _ = run(executor, batches, counts, "static")
  rounds = Executor(make_model(mesh), optax.sgd(0.5), loss_fn, mesh, exchange="ppermute")
  _, step, grads, metrics, _ = run(rounds, batches, counts, "foremoe")
  assert step.moved_slots > 0
  np.testing.assert_allclose(metrics["loss"], metrics_ref["loss"], rtol=1e-5)
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)


def test_a_step_that_keeps_the_base_computes_on_it_without_a_copy(step_inputs):
  """A plain step (base at home, never left) keeps no slot arrays at all, only home-layout accumulators;
  with per-micro-step moves a base, working slots and the base's accumulators exist (after micro-step 0,
  whose program builds them), and the held gradients' H rows per device, not a slot-shaped copy."""
  _, batches, counts, executor = step_inputs
  params, _ = fresh_state(executor)
  expert_shape = params["layers"][0]["w_gate_up"][...].shape[1:]
  seen = []

  def count_slot_arrays(name, acc):
    if name == "micro" and not seen:
      held = [] if len(acc) < 3 else [leaf.shape for leaf in jax.tree.leaves(acc[2])[::2]]
      seen.append((sum(a.shape == (D * S, *expert_shape) for a in jax.live_arrays()), held))

  for policy, sets in (("static", 0), ("foremoe", 3)):
    plan = plan_step(counts, PlanConfig(E, D, S, policy=policy, cost=CostModel(link_bytes_per_s=1e18)))
    step = prepare_step(plan, counts, E, capacity=64)
    assert step.fill_M.any() == (policy == "foremoe") and step.held_rows < S
    seen.clear()
    executor.accumulate(params, batches, step, stage_done=count_slot_arrays)
    assert seen == [(sets * L, [(D * step.held_rows, *expert_shape)] * L if sets else [])]


def test_the_host_loop_hands_programs_arrays_already_on_the_mesh(step_inputs):
  """No implicit copies within a step: tables left on one device were resliced onto the mesh before
  every micro-step's program (on 2 x H200 the GPUs sat idle ~15 ms per step waiting for them)."""
  mesh, batches, counts, executor = step_inputs
  on_mesh = jax.device_put(batches, NamedSharding(mesh, P(("data", "expert"))))
  plan = plan_step(counts, PlanConfig(E, D, S, policy="foremoe", cost=CostModel(link_bytes_per_s=1e18)))
  params, _ = fresh_state(executor)
  for step in (prepare_step(plan, counts, E, capacity=64), prepare_step(plan, counts, E, capacity=64, mesh=mesh)):
    assert step.fill_M.any()
    jax.block_until_ready(executor.accumulate(params, on_mesh, step))  # compiles
    with jax.transfer_guard("disallow"):
      jax.block_until_ready(executor.accumulate(params, on_mesh, step))


def _backend_compiles(run_step) -> int:
  """How many XLA compilations `run_step()` triggers."""
  with count_compiles() as compiles:
    jax.block_until_ready(run_step())
  return len(compiles)


def test_precompile_leaves_the_step_nothing_to_compile(step_inputs):
  """A step's capacities are known ahead: precompile compiles all its programs (in threads), so the
  step itself compiles nothing, forward or train; without it the step compiles them one by one."""
  mesh, batches, counts, _ = step_inputs
  on_mesh = jax.device_put(batches, NamedSharding(mesh, P(("data", "expert"))))
  plan = plan_step(counts, PlanConfig(E, D, S, policy="foremoe", cost=CostModel(link_bytes_per_s=1e18)))
  step = prepare_step(plan, counts, E, mesh=mesh)
  step = dataclasses.replace(step, capacity_M=(step.capacity, 2 * step.capacity) * (M // 2))  # two programs
  plain = Executor(make_model(mesh), optax.sgd(0.5), loss_fn, mesh)
  assert _backend_compiles(lambda: plain.train_step(*fresh_state(plain), on_mesh, step)) > 0
  ahead = Executor(make_model(mesh), optax.sgd(0.5), loss_fn, mesh)
  report = ahead.precompile(on_mesh, step, programs=("forward", "train"))  # before any state exists
  # forward: first, middle and last capacities with their refills (3); train: first, two middle, last (4)
  assert report["programs"] == 3 + 4
  params, opt_state = fresh_state(ahead)
  assert _backend_compiles(lambda: ahead.forward(params, on_mesh, step)) == 0
  assert _backend_compiles(lambda: ahead.train_step(params, opt_state, on_mesh, step)) == 0
