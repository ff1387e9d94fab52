"""GRPO post-training with foresight: rollout (routes captured) -> plan -> recompute -> micro-stepped update.

Per RL step (`GRPOTrainer.step`, one method per stage):
1. `generate`: G samples per prompt with the KV cache; every position's routes are captured (R3). Each
   process draws and rolls out only the batch rows its devices hold (host-local data: `host_batches.py`).
2. `postprocess`: each process packs its rows into its shards' micro-steps (static shapes); the routed
   counts of every (micro-step, layer), summed over the processes (one gather), are known now, so one plan
   per mini-batch goes to the planner (a thread, or with `rl.plan_in_process` a process: `planning.py`)
   while rewards (gathered per row), advantages and device batches are made.
3. `recompute`: old log-probs, forward only, routes replayed; mini-batch i in its plan's layout if that
   plan is ready when i is dispatched, else in the home layout (`rl.recompute_layout`): the same log-probs.
4. `update`: `ppo_epochs` x `num_minibatches` optimizer steps, each over its micro-steps with gradient
   accumulation (the executor); each waits only for its own plan, so plan g+1 is made while g updates.
   Routes are replayed in both stages whatever the policy: a policy changes speed, never the math.
5. `record`: the step's numbers (`report.py`): reward, losses, seconds per stage, throughput, imbalance.
`plan_wait` counts only the time the host blocked on a plan; the other stages exclude it.
"""
import contextlib
import dataclasses
import functools
import os
import time
import weakref
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from foremoe_jax import backends, distributed, trees
from foremoe_jax.checkpoint import Checkpointer
from foremoe_jax.executor import Executor
from foremoe_jax.load_monitor import expert_tokens, load_record
from foremoe_jax.mesh import batch_shards
from foremoe_jax.planner import CostModel, PlanConfig
from foremoe_jax.rl.grpo import chunked_token_logprobs, group_advantages, grpo_loss
from foremoe_jax.rl import host_batches
from foremoe_jax.rl.compile_ahead import CompileAhead
from foremoe_jax.rl.optim import rl_optimizer
from foremoe_jax.rl.planning import Planner, minibatches, timed_plan
from foremoe_jax.rl.report import STAGES, format_record, home_device_load, imbalance_report, policy_loads, throughput
from foremoe_jax.rl.run_tables import RunTables
from foremoe_jax.rl.rollout import local_prompts, local_rollout, local_rows, response_rows, summarize_lengths
from foremoe_jax.rl.task import sample_rows

__all__ = ["GRPOTrainer", "format_record", "grpo_objective"]


def grpo_objective(model, batch, *, tables, working, capacity, clip_eps: float, kl_coef: float):
  """The executor's loss: clipped GRPO over this micro-batch, normalized by its mini-batch's tokens."""
  out = model(batch["tokens"], tables, batch["replay"], capacity=capacity, working=working, logits=False,
              segment_ids=batch.get("segment_ids"), positions=batch.get("positions"))  # packed rows: both set
  logp_BxT = chunked_token_logprobs(out.hidden, model.lm_head[...], batch["tokens"], batch.get("segment_ids"),
                                    chunk=model.cfg.logprob_chunk)
  loss, metrics = grpo_loss(logp_BxT, batch["logp_old"], batch["adv"], batch["mask"], clip_eps=clip_eps,
                            kl_coef=kl_coef, logp_ref_BxT=batch.get("logp_ref"),
                            num_tokens_total=batch["num_tokens"])
  return loss, {**metrics, "logp": logp_BxT, "dropped": out.dropped}


@dataclasses.dataclass
class StepWork:
  """One RL step's state between its stages; lists run over its mini-batches."""
  host_rows: list[list[int]]  # [start, stop) of the batch rows each process built
  per_row: dict[str, np.ndarray]  # every row's reward, response length and clipped flag (gathered)
  samples: list[dict]  # the first few groups built here, for the record
  inputs: host_batches.StepInputs  # the step's counts and token totals, summed over processes
  counts: list[np.ndarray]  # [M_i, L, D, E]: what mini-batch i's plan is made from
  futures: list  # the planner's (plan, seconds, device load [M_i, L, D]) per mini-batch
  minibatches: list[list[dict]]  # device micro-batches per mini-batch
  experts: Any  # future: expert tokens [L, E] of this process's rows (load monitor)
  report: Any  # future: every policy's device load (rl.report_policies), else None
  tables: list = dataclasses.field(init=False)  # StepTables under mini-batch i's plan, once it is in
  plan_loads: list = dataclasses.field(init=False)  # device load [M_i, L, D] of mini-batch i's plan
  digests: list = dataclasses.field(init=False)  # hash of mini-batch i's plan (compared across processes)
  compiled: list = dataclasses.field(default_factory=list)  # padded capacities met this step
  waited: float = 0.0  # seconds the host blocked on plans
  planner_s: float = 0.0  # planning (on the worker) + table building (here) seconds
  at_home: int = 0  # mini-batches recomputed in the home layout

  def __post_init__(self):
    n = len(self.futures)
    self.tables, self.plan_loads, self.digests = [None] * n, [None] * n, [None] * n


class GRPOTrainer:
  """Owns the policy's state (`params`, `opt_state`; `reference_params`, the frozen KL reference) and runs
  RL steps through the executor, which holds none: each update hands the state in and takes the new one."""

  def __init__(self, cfg, model, mesh, task, run_dir: str):
    self.cfg, self.rl, self.mesh, self.task = cfg, cfg.rl.validate(batch_shards(mesh)), mesh, task
    self.num_rows = self.rl.prompts_per_step * self.rl.group_size
    self.groups = host_batches.num_groups(self.rl.pack_groups, jax.process_count(), batch_shards(mesh))
    self.tok = task.tokenizer
    moe = model.moe_layers()[0]
    self.expert_devices = moe.num_devices
    cost = CostModel(hidden=cfg.model.d_model, expert_intermediate=cfg.model.moe.d_ff_expert,
                     bytes_per_param=jnp.dtype(cfg.model.param_dtype).itemsize,
                     matmul_flops_per_s=self.rl.plan_matmul_tflops * 1e12, link_bytes_per_s=self.rl.plan_link_gbs * 1e9,
                     a2a_bytes_per_s=self.rl.plan_a2a_gbs * 1e9,
                     dispatch=backends.choose_dispatch(moe.cfg.dispatch))
    self.plan_cfg = PlanConfig(num_experts=cfg.model.moe.num_experts, num_devices=moe.num_devices,
                               slots_per_device=moe.slots, policy=self.rl.policy, cost=cost,
                               capacity_buckets=self.rl.capacity_buckets)
    self.run_tables = RunTables(self.plan_cfg, mesh, base_rows=self.rl.base_rows, fixed=self.rl.table_sizes == "fixed")
    self.planner = Planner(self.rl.plan_in_process)  # a process starts now: its imports are paid early
    weakref.finalize(self, self.planner.close)
    self.prompts = task.load_prompts(self.rl.prompt_file) if self.rl.prompt_file else None
    objective = functools.partial(grpo_objective, clip_eps=self.rl.clip_eps, kl_coef=self.rl.kl_coef)
    tx = rl_optimizer(self.rl.lr, self.rl.adam_dtype)
    self.executor = Executor(model, tx, objective, mesh)
    self.ahead = CompileAhead(self.executor)
    self.params, self.opt_state = self.executor.init(model)
    # A frozen copy: the policy's update donates its parameter buffers.
    self.reference_params = trees.copy(self.params) if self.rl.kl_coef > 0 else None
    self.ckpt = Checkpointer(os.path.join(run_dir, "rl_ckpt"))
    self.history = None
    self.route_hook = None  # fn(Rollout of rows `rows` of num_rows, rows, num_rows) -> Rollout: trace routes
    self.forwards = set()  # (first micro-step, padded capacity) of every forward program run so far
    self.zeros = {}  # (shape, sharding) -> the recompute's log-prob placeholder

  # --- checkpoints ---------------------------------------------------------------------------------
  def save(self, step: int, record: dict) -> None:
    history = None if self.history is None else self.history.tolist()
    self.ckpt.save(step, {"params": self.params, "opt": self.opt_state},
                   {"history": history, "record": record})

  def restore(self, step: int | None = None) -> int:
    """Loads checkpoint `step` (default: the last); returns the next step to run (0 without one)."""
    target = {"params": self.params, "opt": self.opt_state}
    if step is None:
      restored = self.ckpt.restore_latest(target)
      distributed.check_same_across_processes([np.asarray(-1 if restored is None else restored[0])],
                                              "the RL step to resume")
      if restored is None:
        return 0
      last, state, extra = restored
    else:
      last, (state, extra) = step, self.ckpt.restore(step, target)
    state = trees.replicate_unsharded(state, self.mesh)
    self.params, self.opt_state = state["params"], state["opt"]
    self.history = None if extra.get("history") is None else np.asarray(extra["history"], np.int64)
    return last

  def policy(self):
    """The model with the current parameters (sharing their arrays): for rollout and evaluation."""
    return self.executor.model(self.params)

  # --- one step: the pipeline ------------------------------------------------------------------
  def step(self, step: int) -> dict:
    times = {}
    with self._timed(times, "rollout"):
      rows, pairs, roll = self.generate(step)
    roll = roll if self.route_hook is None else self.route_hook(roll, rows, self.num_rows)
    with self._timed(times, "postprocess"):
      work = self.postprocess(step, rows, pairs, roll)
    with self._timed(times, "recompute", work):
      self.recompute(step, work)
    with self._timed(times, "update", work):
      updates = self.update(step, work)
    with self._timed(times, "record"):
      loads = self.step_loads(work)
    times["plan_wait"] = work.waited
    return self.record(step, work, updates, loads, {k: times[k] for k in STAGES})

  @staticmethod
  @contextlib.contextmanager
  def _timed(times: dict, stage: str, work: StepWork | None = None):
    """times[stage] = the block's seconds, less the plan waits inside it (those are plan_wait)."""
    tic, waited = time.perf_counter(), work.waited if work else 0.0
    yield
    times[stage] = time.perf_counter() - tic - ((work.waited - waited) if work else 0.0)

  def sample_prompts(self, step: int, rows) -> list[tuple[str, str]]:
    """(prompt, answer) of prompt rows `rows` of the step, each from its own generator (`task.row_rng`)."""
    def from_file(rng, n):
      return [self.prompts[i] for i in rng.integers(0, len(self.prompts), size=n)]
    return sample_rows(self.task.sample if self.prompts is None else from_file, rows, seed=self.cfg.seed, step=step)

  def generate(self, step: int):
    """This process's batch rows, their (prompt, answer) pairs and their rollout (numpy): no process draws
    or holds another's rows."""
    rl, rows = self.rl, local_rows(self.mesh, self.num_rows)
    pairs = local_prompts(functools.partial(self.sample_prompts, step), rows, rl.group_size)
    prompts_BxP, lens_B = self.task.prompt_batch([p for p, _ in pairs])
    roll = local_rollout(self.policy(), prompts_BxP, lens_B, jax.random.key(step + 7919 * self.cfg.seed),
                         num_rows=self.num_rows, max_new_tokens=rl.max_new_tokens, temperature=rl.temperature,
                         top_p=rl.top_p, eos_id=self.tok.eos_id, pad_id=self.tok.pad_id)
    return rows, pairs, roll._replace(logprobs=None)

  def postprocess(self, step: int, rows: range, pairs, roll) -> StepWork:
    """Packs this process's rows, gathers the step's counts and submits one plan per mini-batch, in order
    (mini-batch i recomputes while the later ones are planned), then scores the samples and makes the
    device batches meanwhile."""
    rl = self.rl
    host = host_batches.pack_host(roll, rows, step=step, num_rows=self.num_rows, num_shards=batch_shards(self.mesh),
                                  groups=self.groups, expert_devices=self.expert_devices,
                                  num_experts=self.plan_cfg.num_experts, rl=rl)
    inputs = host_batches.gather_inputs(host, rl.num_minibatches)
    planned = minibatches(inputs.counts_MxLxDxE, rl.num_minibatches, self.history)
    futures = [self.planner.submit(timed_plan, c, self.plan_cfg, h) for c, h in planned]
    # Queued behind the plans: they run while recompute and update do, collected in `record`.
    report = (self.planner.submit(policy_loads, inputs.counts_MxLxDxE, rl.num_minibatches, self.plan_cfg,
                                  self.history) if rl.report_policies else None)
    experts = self.planner.submit(expert_tokens, roll.routes, roll.lengths, self.plan_cfg.num_experts)
    completions = [self.tok.decode(row[start:]) for row, start in zip(roll.tokens, roll.prompt_lengths)]
    rewards_B = np.array([self.task.score(c, a) for c, (_, a) in zip(completions, pairs)], np.float32)
    new_B, clipped_B = response_rows(roll.tokens, roll.lengths, roll.prompt_lengths, eos_id=self.tok.eos_id,
                                     max_new_tokens=rl.max_new_tokens)
    per_row, host_rows = host_batches.gather_rows(rows, self.num_rows, {"reward": rewards_B, "new_tokens": new_B,
                                                                        "clipped": clipped_B.astype(np.int32)})
    advantages_B = np.asarray(group_advantages(jnp.asarray(per_row["reward"]), rl.group_size))[rows.start:rows.stop]
    batches = [self.device_batch(b) for b in host_batches.host_micro_batches(host, advantages_B, inputs.num_tokens_M)]
    self.history = planned[-1][0]
    per_mb = len(batches) // rl.num_minibatches
    first = -rows.start % rl.group_size  # the first row here that starts a group
    samples = [{"prompt": pairs[b][0], "answer": pairs[b][1], "response": completions[b], "reward": float(rewards_B[b])}
               for b in range(first, len(completions), rl.group_size)][:4]
    return StepWork(host_rows, per_row, samples, inputs, [c for c, _ in planned], futures,
                    [batches[i * per_mb:(i + 1) * per_mb] for i in range(rl.num_minibatches)], experts, report)

  def recompute(self, step: int, work: StepWork) -> None:
    """Old (and reference) log-probs of each mini-batch, forward only: under its plan's tables when
    `recompute_tables` picks it (its update's programs then compile here too), else the home layout's."""
    for i, micro_batches in enumerate(work.minibatches):
      tables, programs = self.recompute_tables(step, work, i)
      self.compile_ahead(step, micro_batches, tables, programs, work.compiled)
      self.attach_logprobs(micro_batches, tables)
      self.forwards.update((m == 0, c) for m, c in enumerate(tables.capacity_M))

  def recompute_tables(self, step: int, work: StepWork, i: int):
    """rl.recompute_layout: mini-batch i's recompute under its plan ("ready": if it is in by now, or if
    the home layout would compile a forward program: a padded capacity no recompute met; the plan's
    programs compile anyway, for the update, and planning takes less than a compile) or at home.
    -> (tables, the programs to compile ahead for them)."""
    layout = self.rl.recompute_layout
    home = None if layout == "plan" else self.run_tables.home_tables(work.counts[i])
    # A plan's readiness differs between processes, their programs must not: voted.
    if layout == "plan" or (layout == "ready" and (
        not self.forwards.issuperset((m == 0, c) for m, c in enumerate(home.capacity_M))
        or distributed.true_on_every_process(work.futures[i].done()))):
      return self.plan_tables(step, work, i), ("forward", "train")
    work.at_home += 1
    return home, ("forward",)

  def update(self, step: int, work: StepWork) -> list[dict]:
    """ppo_epochs x num_minibatches optimizer steps, each under its plan (waited for only now when the
    recompute ran at home)."""
    updates = []
    for _ in range(self.rl.ppo_epochs):
      for i, micro_batches in enumerate(work.minibatches):
        if work.tables[i] is None:
          self.compile_ahead(step, micro_batches, self.plan_tables(step, work, i), ("train",), work.compiled)
        self.params, self.opt_state, out = self.executor.train_step(self.params, self.opt_state, micro_batches,
                                                                    work.tables[i])
        updates.append(out)
    return updates

  def plan_tables(self, step: int, work: StepWork, i: int):
    """Mini-batch i's StepTables under its plan, made once: waits for the plan (plan_wait), compares it
    across processes, builds its tables (the cached home tables when the plan is the home layout)."""
    if work.tables[i] is None:
      tic = time.perf_counter()
      plan, plan_s, work.plan_loads[i] = work.futures[i].result()
      prepare = time.perf_counter()
      work.waited += prepare - tic
      # Multi-process: every process planned from the same gathered routes; a differing plan would
      # silently mix placements, so compare hashes (one tiny all-gather) and fail loudly.
      work.digests[i] = distributed.check_same_across_processes(
          (plan.slot_expert, plan.slot_share, plan.base), f"rl step {step}: the plan of mini-batch {i}")
      work.tables[i] = self.run_tables.for_plan(step, plan, work.counts[i])
      work.planner_s += plan_s + time.perf_counter() - prepare
    return work.tables[i]

  def step_loads(self, work: StepWork) -> dict[str, np.ndarray]:
    """policy -> device load [M, L, D] of the step: every policy's (rl.report_policies), else the running
    policy's (from its own plans) and static's (the home layout)."""
    if work.report is not None:
      return work.report.result()
    static = home_device_load(np.concatenate(work.counts), self.expert_devices)
    return {self.plan_cfg.policy: np.concatenate(work.plan_loads), "static": static}

  def record(self, step: int, work: StepWork, updates: list[dict], loads: dict, seconds: dict) -> dict:
    rl, per_row = self.rl, work.per_row
    expert_LxE = distributed.gather_over_processes([work.experts.result()])[0].sum(0)  # every process's rows
    capacity_M = [c for tables in work.tables for c in tables.capacity_M]
    new_capacities = self.ahead.end_step(work.compiled)
    return {"step": step, "reward": float(per_row["reward"].mean()),
            "kl": float(np.mean([u["metrics"]["approx_kl"].sum() for u in updates])),
            "loss": float(np.mean([u["loss"] for u in updates])),
            "clip_frac": float(np.mean([u["metrics"]["clip_frac"].sum() for u in updates])),
            "seconds": seconds, **throughput(seconds, work.inputs.real_tokens, rl.ppo_epochs, self.cfg.model),
            "planner_ms": 1e3 * work.planner_s, "micro_steps": sum(len(mb) for mb in work.minibatches),
            "recompute_at_home": work.at_home, "real_token_share": work.inputs.real_token_share,
            **imbalance_report(loads),
            "dropped": int(sum(u["metrics"]["dropped"].sum() for u in updates)),
            "capacity_mean": float(np.mean(capacity_M)), "capacities_compiled": len(self.ahead.capacities),
            "new_capacities": new_capacities,
            "load": load_record(expert_LxE, {p: x.sum(1) for p, x in loads.items()}),
            "response_length": summarize_lengths(per_row["new_tokens"], per_row["clipped"]),
            "samples": work.samples, "host_rows": work.host_rows, "plan_digests": work.digests}

  # --- helpers of the stages -----------------------------------------------------------------------
  def device_batch(self, batch: dict) -> dict:
    """This process's part of a micro-batch -> global arrays sharded over the batch axes."""
    return host_batches.device_batch(batch, self.mesh)

  def compile_ahead(self, step: int, micro_batches: list[dict], tables, programs, met_this_step: list) -> None:
    """A stage's programs for `tables` compile before it (`CompileAhead`), for the batches it will pass:
    with their log-prob entries, abstract."""
    abstract = self.with_logprob_slots(
        micro_batches, lambda mask: jax.ShapeDtypeStruct(mask.shape, jnp.float32, sharding=mask.sharding))
    self.ahead(step, abstract, tables, programs, met_this_step, workers=self.rl.compile_workers)

  def with_logprob_slots(self, micro_batches: list[dict], make) -> list[dict]:
    """Each micro-batch with its log-prob entries (old, and the reference's if any) made by make(mask):
    the recompute's placeholders and the update's batches then share one structure and sharding, which
    `compile_ahead` compiles for."""
    keys = ("logp_old",) if self.reference_params is None else ("logp_old", "logp_ref")
    return [{**b, **{k: make(b["mask"]) for k in keys}} for b in micro_batches]

  def zeros_like_mask(self, mask):
    """float32 zeros of the mask's shape and sharding, made once: the forward reads, never donates them."""
    key = (mask.shape, mask.sharding)
    if key not in self.zeros:
      self.zeros[key] = jnp.zeros(mask.shape, jnp.float32, device=mask.sharding)
    return self.zeros[key]

  def attach_logprobs(self, micro_batches: list[dict], tables) -> None:
    """Recompute: old (and reference) log-probs under replayed routes, forward only."""
    placeholders = self.with_logprob_slots(micro_batches, self.zeros_like_mask)
    for key, params in (("logp_old", self.params), ("logp_ref", self.reference_params)):
      if params is None:
        continue
      for batch, (_, metrics) in zip(micro_batches, self.executor.forward(params, placeholders, tables)):
        batch[key] = jax.device_put(metrics["logp"], batch["mask"].sharding)  # as compile_ahead assumed

  def run(self, logger=None, resume: bool = False) -> list[dict]:
    start = self.restore() if resume else 0
    if resume and logger is not None:
      logger.rewind("rl", start)  # steps logged after the checkpoint run again
    records = []
    with logging_redirect_tqdm():  # log lines (e.g. the compiles a step waits for) above the bar
      for step in tqdm(range(start, self.rl.steps), desc=f"rl ({self.rl.policy})", initial=start,
                       total=self.rl.steps):
        record = self.step(step)
        records.append(record)
        tqdm.write(format_record(step, record, self.rl.policy))
        if logger is not None:
          logger.log(step, {"rl": {k: v for k, v in record.items() if k != "imbalance_sums"}})
        if (step + 1) % self.rl.ckpt_every == 0 or step + 1 == self.rl.steps:
          self.save(step + 1, {"reward": record["reward"]})
    return records
