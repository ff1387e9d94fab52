"""RL with foresight: micro-batches and counts, recompute under any plan equals static, resume."""
import concurrent.futures
import dataclasses
import os
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import configs
from compile_count import count_compiles
from foremoe_jax.step_tables import prepare_step
from foremoe_jax.mesh import batch_sharding, make_mesh
from foremoe_jax.model import Model
from foremoe_jax.planner import POLICIES
from foremoe_jax.rl.config import RLConfig
from foremoe_jax.rl.microbatch import build_step_batches, spread_routes, with_advantages
from foremoe_jax.rl.packing import routes_to_counts
from foremoe_jax.rl.planning import Planner, timed_plan
from foremoe_jax.rl.report import THROUGHPUT, imbalance_report, policy_loads
from foremoe_jax.rl.trainer import GRPOTrainer, format_record
from foremoe_jax.sft import make_task


def test_micro_batches_count_every_position_and_spread_padding():
  rng = np.random.default_rng(0)
  n, t, l, k, e = 12, 10, 2, 2, 8
  lengths = rng.integers(4, t + 1, size=n)
  routes = np.stack([rng.permutation(e)[:k] for _ in range(n * t * l)]).reshape(n, t, l, k)
  mask = (np.arange(t)[None] < lengths[:, None] - 1).astype(np.int32)
  step = build_step_batches(np.ones((n, t), np.int32), routes, mask, lengths, num_shards=4, expert_devices=2,
                            rows_per_shard=2, tokens_per_shard=16, num_experts=e, num_minibatches=2)
  m = len(step.micro_batches)
  assert m % 2 == 0 and step.counts_MxLxDxE.shape == (m, l, 2, e)
  assert step.counts_MxLxDxE.sum() == m * 4 * 2 * t * l * k  # every position of every row
  for batch in step.micro_batches:
    replay = batch["replay"]
    assert replay.shape == (8, t, l, k) and (np.sort(replay, -1)[..., 1:] != np.sort(replay, -1)[..., :-1]).all()
  first = sum(b["mask"].sum() for b in step.micro_batches[:m // 2])
  assert step.micro_batches[0]["num_tokens"] == first
  adv = rng.normal(size=n).astype(np.float32)
  batches = with_advantages(step, adv)
  placed = np.concatenate([b["adv"] for b in batches])
  np.testing.assert_allclose(np.sort(placed[placed != 0]), np.sort(adv[adv != 0]))
  assert np.bincount(spread_routes((2, 4, 1, 2), 4).reshape(-1)).tolist() == [4, 4, 4, 4]


def tiny_setup(tmp_path, policy="foremoe", steps=2, **rl_settings):
  cfg = configs.get_config("cpu_tiny")
  rl = RLConfig(steps=steps, prompts_per_step=8, group_size=4, rows_per_shard=2, tokens_per_shard=32,
                policy=policy, plan_matmul_tflops=cfg.rl.plan_matmul_tflops, plan_link_gbs=cfg.rl.plan_link_gbs,
                plan_a2a_gbs=cfg.rl.plan_a2a_gbs, **rl_settings)
  cfg = types.SimpleNamespace(model=cfg.model, seed=0, rl=rl, task=cfg.task)
  mesh = make_mesh(1, 8)
  model = Model(cfg.model, mesh=mesh, rngs=nnx.Rngs(0))
  return GRPOTrainer(cfg, model, mesh, make_task(configs.get_config("cpu_tiny")), str(tmp_path))


def test_recompute_under_foremoe_equals_static(tmp_path):
  trainer = tiny_setup(tmp_path)
  rng = np.random.default_rng(1)
  n, t = 32, 12
  tokens = rng.integers(3, 18, size=(n, t)).astype(np.int32)
  model = trainer.policy()
  routes = np.asarray(jax.jit(lambda m, x: m(x).routes)(model, tokens))
  step = build_step_batches(tokens, routes, np.ones((n, t), np.int32), np.full(n, t), num_shards=8,
                            expert_devices=8, rows_per_shard=2, tokens_per_shard=2 * t, num_experts=16,
                            num_minibatches=1)
  batches = [trainer.device_batch(b) for b in with_advantages(step, np.ones(n))]
  logps = {}
  for policy in ("static", "foremoe", "eplb_microstep"):
    cfg = dataclasses.replace(trainer.plan_cfg, policy=policy)
    tables = prepare_step(timed_plan(step.counts_MxLxDxE, cfg, None)[0], step.counts_MxLxDxE, cfg.num_experts)
    copy = [dict(b) for b in batches]
    trainer.attach_logprobs(copy, tables)
    logps[policy] = np.stack([np.asarray(b["logp_old"]) for b in copy])
  imbalance = imbalance_report(policy_loads(step.counts_MxLxDxE, 1, trainer.plan_cfg, None))["imbalance"]
  assert imbalance["foremoe"] < imbalance["static"]
  np.testing.assert_allclose(logps["foremoe"], logps["static"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(logps["eplb_microstep"], logps["static"], rtol=1e-5, atol=1e-5)


def test_resume_gives_the_same_next_step(tmp_path):
  """Restoring the checkpoint after step 0 and running step 1 again reproduces the uninterrupted run."""
  trainer = tiny_setup(tmp_path, steps=2)
  trainer.run()
  straight = jax.tree.map(np.asarray, trainer.params)
  assert trainer.ckpt.all_steps() == [1, 2]
  assert trainer.restore(1) == 1
  trainer.step(1)
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(trainer.params)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_bad_rl_config_is_refused():
  with pytest.raises(ValueError, match="policy"):
    RLConfig(policy="nope").validate(8)
  with pytest.raises(ValueError, match="divisible"):
    RLConfig(prompts_per_step=3, group_size=1).validate(8)
  with pytest.raises(ValueError, match="rl.steps=0"):
    RLConfig(steps=0).validate(8)
  with pytest.raises(ValueError, match="rl.capacity_buckets=3"):
    RLConfig(capacity_buckets=3).validate(8)
  with pytest.raises(ValueError, match=r"rl.recompute_layout='first' is not one of \('ready', 'plan', 'home'\)"):
    RLConfig(recompute_layout="first").validate(8)


def test_planning_in_a_process_gives_the_same_step(tmp_path):
  """rl.plan_in_process: the plans come from a spawned process (another pid); the step (loss, imbalance
  report, updated parameters) equals the one planned in a thread."""
  trainer = tiny_setup(tmp_path, steps=1, recompute_layout="plan")
  initial = jax.tree.map(jnp.copy, (trainer.params, trainer.opt_state))
  records, params = [], []
  for in_process in (False, True):
    trainer.planner.close()
    trainer.planner = Planner(in_process)
    assert (trainer.planner.submit(os.getpid).result() != os.getpid()) == in_process
    trainer.params, trainer.opt_state = jax.tree.map(jnp.copy, initial)
    trainer.history = None
    records.append(trainer.step(0))
    params.append(jax.tree.map(np.asarray, trainer.params))
  trainer.planner.close()
  assert records[0]["imbalance"] == records[1]["imbalance"]
  np.testing.assert_allclose(records[0]["loss"], records[1]["loss"], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(params[0]), jax.tree.leaves(params[1])):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


class LazyFuture(concurrent.futures.Future):
  """A plan made only when it is asked for: never ready before."""

  def __init__(self, fn, args):
    super().__init__()
    self.call = fn, args

  def result(self, timeout=None):
    if not self.done():
      fn, args = self.call
      self.set_result(fn(*args))
    return super().result(timeout)


class InlinePlanner:
  """Plans on the calling thread: each plan ready when submitted (lazy=False) or made when asked for."""

  def __init__(self, lazy: bool):
    self.lazy = lazy

  def submit(self, fn, *args):
    future = LazyFuture(fn, args)
    if not self.lazy:
      future.result()
    return future

  def close(self):
    pass


def test_recompute_layouts_give_the_same_step(tmp_path):
  """rl.recompute_layout: "home" recomputes every mini-batch in the home layout, "plan" under its plan,
  "ready" under its plan only when that is ready at dispatch (never / always with these planners); the
  step (loss, parameters, imbalance, plans) is the same; the home tables are built once. plan_wait counts
  the time blocked on a plan, whichever stage blocks."""
  trainer = tiny_setup(tmp_path, steps=1)
  initial = jax.tree.map(jnp.copy, (trainer.params, trainer.opt_state))
  records, params = [], []
  for layout, lazy in (("home", False), ("plan", True), ("ready", True), ("ready", False)):
    trainer.rl = dataclasses.replace(trainer.rl, recompute_layout=layout)
    trainer.planner = InlinePlanner(lazy)
    trainer.params, trainer.opt_state = jax.tree.map(jnp.copy, initial)
    trainer.history = None
    records.append(trainer.step(0))
    params.append(jax.tree.map(np.asarray, trainer.params))
  assert [r["recompute_at_home"] for r in records] == [2, 0, 2, 0]
  assert len(trainer.run_tables.home) == 1  # both mini-batches have as many micro-steps
  assert records[0]["new_capacities"] and all(r["new_capacities"] == [] for r in records[1:])  # compiled once
  assert "compiled for new padded capacities" in format_record(0, records[0], "foremoe")
  for record, p in zip(records[1:], params[1:]):
    assert record["imbalance"] == records[0]["imbalance"] and record["plan_digests"] == records[0]["plan_digests"]
    np.testing.assert_allclose(record["loss"], records[0]["loss"], rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(params[0]), jax.tree.leaves(p)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

  # plan_wait holds the time the host blocked on a plan: plans 1 s late each are waited for by the
  # recompute ("plan") or, recomputed at home, by the update ("ready"). Step 0 again: nothing compiles.
  def slow_plan(*args):
    time.sleep(1.0)
    return timed_plan(*args)

  trainer.planner = Planner(False)
  submit = trainer.planner.submit
  trainer.planner.submit = lambda fn, *args: submit(slow_plan if fn is timed_plan else fn, *args)
  for layout in ("plan", "ready"):
    trainer.rl = dataclasses.replace(trainer.rl, recompute_layout=layout)
    trainer.history = None
    record = trainer.step(0)
    assert record["seconds"]["plan_wait"] >= 0.5, (layout, record["seconds"])
    assert record["recompute_at_home"] == (2 if layout == "ready" else 0)
    assert record["plan_wait_share"] == pytest.approx(record["seconds"]["plan_wait"] / record["step_s"])
  trainer.planner.close()


def test_home_tables_are_cached_and_equal_fresh_ones(tmp_path):
  """The cached home tables with the counts' capacities equal prepare_step of the static plan."""
  trainer = tiny_setup(tmp_path, steps=1)
  rng = np.random.default_rng(3)
  static = dataclasses.replace(trainer.plan_cfg, policy="static")
  for scale in (1, 40, 3):
    counts = rng.integers(0, scale + 1, size=(2, 2, 8, 16)) * (rng.random((2, 2, 8, 16)) < 0.7)
    want = prepare_step(timed_plan(counts, static, None)[0], counts, 16, sizes=trainer.run_tables.sizes)
    got = trainer.run_tables.home_tables(counts)
    assert got.capacity_M == want.capacity_M and got.moved_slots == want.moved_slots == 0
    for a, b in zip(jax.tree.leaves((want.tables_M, want.base_moves, want.fill_moves_M, want.refill_moves_M)),
                    jax.tree.leaves((got.tables_M, got.base_moves, got.fill_moves_M, got.refill_moves_M))):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert list(trainer.run_tables.home) == [2]


def test_the_record_carries_speed_and_the_running_policy_report(tmp_path):
  """Default: the running policy's and static's imbalance, from its own plans and the home layout; with
  rl.report_policies every policy, the same values where both report. Throughput entries per formula."""
  trainer = tiny_setup(tmp_path, steps=1, recompute_layout="plan")
  initial = jax.tree.map(jnp.copy, (trainer.params, trainer.opt_state))
  records = []
  for report in (False, True):
    trainer.rl = dataclasses.replace(trainer.rl, report_policies=report)
    trainer.params, trainer.opt_state = jax.tree.map(jnp.copy, initial)
    trainer.history = None
    records.append(trainer.step(0))
  off, on = records
  assert set(off["imbalance"]) == set(off["load"]["device_tokens_MxD"]) == {"foremoe", "static"}
  assert set(on["imbalance"]) == set(on["load"]["device_tokens_MxD"]) == set(POLICIES)
  for policy in ("foremoe", "static"):
    assert off["imbalance"][policy] == pytest.approx(on["imbalance"][policy], rel=1e-12)
    assert off["imbalance_per_micro_step"][policy] == pytest.approx(on["imbalance_per_micro_step"][policy])
    np.testing.assert_allclose(off["load"]["device_tokens_MxD"][policy], on["load"]["device_tokens_MxD"][policy])
  assert off["imbalance"]["foremoe"] < off["imbalance"]["static"]
  assert set(THROUGHPUT) <= set(off)
  assert off["step_s"] == pytest.approx(sum(off["seconds"].values()))
  assert off["tokens_per_s"] == pytest.approx(off["real_tokens"] / off["step_s"])
  assert off["train_tokens_per_s"] == pytest.approx(off["real_tokens"] / off["seconds"]["update"])
  model = trainer.cfg.model  # every real position went through each MoE layer to top_k experts
  assert np.sum(off["load"]["expert_tokens_LxE"]) == off["real_tokens"] * model.moe.top_k * len(model.moe_layer_ids)
  line = format_record(0, off, "foremoe")
  assert "tok/s" in line and "foremoe* " in line and "eplb_step" not in line


def test_the_trainer_compiles_each_group_ahead_once_and_names_new_capacities(tmp_path, caplog):
  """Every group's programs are checked ahead, in the executor's threads (rl.compile_workers); programs
  of a group compiled ahead before are skipped; capacities met neither in earlier steps nor earlier in
  this step are named; with 0 workers they are only named."""
  trainer = tiny_setup(tmp_path, steps=1)
  calls = []

  def precompile(batches, tables, *, programs, workers):
    calls.append((programs, tables.capacity_M, workers))
    return {"programs": 2, "lower_s": 1.0, "compile_s": 2.0}

  trainer.executor.precompile = precompile
  four, two = (trainer.run_tables.home_tables(np.zeros((m, 2, 8, 16), np.int64)) for m in (4, 2))
  batches = [{"mask": jax.device_put(jnp.zeros((16, 3)), batch_sharding(trainer.mesh))}] * 4
  groups = ((four, (16, 32, 48, 32), ("forward", "train")), (two, (16, 32), ("train",)),
            (four, (16, 32, 48, 32), ("forward",)))
  for workers in (4, 0):
    trainer.rl = dataclasses.replace(trainer.rl, compile_workers=workers)
    trainer.ahead.capacities, met = {16}, [48]
    with caplog.at_level("INFO", logger="foremoe_jax.rl.compile_ahead"):
      for tables, capacity_M, programs in groups:
        trainer.compile_ahead(3, batches[:len(capacity_M)], dataclasses.replace(tables, capacity_M=capacity_M),
                              programs, met)
  # The new capacity at every position too (all four micro-steps at 32); the third group is known.
  assert calls == [(("forward", "train"), (16, 32, 48, 32), 4), (("forward", "train"), (32, 32, 32, 32), 4),
                   (("train",), (16, 32), 4)]
  assert [r.getMessage() for r in caplog.records] == [
      "step 3: compiling forward/train programs for new padded capacities [32]",
      "step 3: 4 programs ready: lowering 2.0 s, then XLA in 4 threads 4.0 s",
      "step 3: compiling forward/train programs for new padded capacities [32]"]


def test_compiled_ahead_the_recompute_and_update_compile_nothing(tmp_path):
  """rl.compile_workers: a new capacity's programs compile before their stage, for exactly the batches
  the stages then pass (placeholders, old and reference log-probs): no program compiles twice."""
  trainer = tiny_setup(tmp_path, steps=1, kl_coef=0.1)
  compiles = []

  def counted(run, name):
    def wrapped(*args, **kwargs):
      with count_compiles() as inside:
        out = run(*args, **kwargs)
      compiles.extend([name] * len(inside))
      return out
    return wrapped

  executor = trainer.executor  # the reference's log-probs run its programs too (trainer.reference_params)
  assert trainer.reference_params is not None
  executor.forward, executor.train_step = counted(executor.forward, "forward"), counted(executor.train_step, "update")
  record = trainer.step(0)
  assert record["new_capacities"] and compiles == []


def test_packed_micro_batches_count_real_tokens_only():
  """pack_sequences: rows of several sequences; counts are the real tokens' routes (routes_to_counts of the
  packing), the rows' real-token share beats one sequence per row, and a mask at a sequence's last position
  (it would predict the next sequence's first token) is refused."""
  rng = np.random.default_rng(4)
  n, t, l, k, e = 32, 10, 2, 2, 8
  lengths = rng.integers(2, t + 1, size=n)
  routes = np.stack([rng.permutation(e)[:k] for _ in range(n * t * l)]).reshape(n, t, l, k)
  mask = (np.arange(t)[None] < lengths[:, None] - 1).astype(np.int32)
  kw = dict(num_shards=4, expert_devices=2, rows_per_shard=2, tokens_per_shard=20, num_experts=e, num_minibatches=1)
  step = build_step_batches(np.ones((n, t), np.int32), routes, mask, lengths, pack_sequences=True, **kw)
  p, m = step.packing, len(step.micro_batches)
  real = np.arange(t)[None] < lengths[:, None]
  want = routes_to_counts(routes, real, p.micro_step_N, p.device_N % 2, m, 2, e)
  np.testing.assert_array_equal(step.counts_MxLxDxE, want)
  for batch in step.micro_batches:
    assert {k: v.shape for k, v in batch.items() if k != "num_tokens"} == {
        "tokens": (8, t), "replay": (8, t, l, k), "mask": (8, t), "segment_ids": (8, t), "positions": (8, t)}
  assert sum(b["mask"].sum() for b in step.micro_batches) == mask.sum()
  one_per_row = build_step_batches(np.ones((n, t), np.int32), routes, mask, lengths, **kw)
  assert step.real_token_share > one_per_row.real_token_share
  assert step.real_token_share == lengths.sum() / (m * 8 * t)
  adv = with_advantages(step, np.arange(n, dtype=np.float32) + 1)
  np.testing.assert_array_equal([a["adv"].shape for a in adv], [(8, t)] * m)
  assert sum((a["adv"] > 0).sum() for a in adv) == lengths.sum()
  late = mask.copy()
  late[3, lengths[3] - 1] = 1
  with pytest.raises(ValueError, match=f"mask of sequence 3 \\(length {lengths[3]}\\) marks its last position"):
    build_step_batches(np.ones((n, t), np.int32), routes, late, lengths, pack_sequences=True, **kw)


def test_a_packed_step_runs(tmp_path):
  """rl.pack_sequences through the trainer: recompute and update on packed rows."""
  trainer = tiny_setup(tmp_path, steps=1, pack_sequences=True)
  record = trainer.step(0)
  assert np.isfinite(record["loss"]) and record["dropped"] == 0 and record["micro_steps"] % 2 == 0
