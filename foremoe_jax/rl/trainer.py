"""GRPO post-training with foresight: rollout (routes captured) -> plan -> recompute -> micro-stepped update.

Per RL step:
1. rollout: G samples per prompt with the KV cache; every position's routes are captured (R3).
2. post-processing: sequences are packed into micro-steps (static shapes); the routed counts of every
   (micro-step, layer) are known now, so the planner runs beside the trainer (a thread, or with
   `rl.plan_in_process` a process: `planning.py`) while rewards and advantages are computed.
3. recompute: old log-probs, forward only, routes replayed, each micro-step under its placement.
4. update: `ppo_epochs` x `num_minibatches` optimizer steps, each over its micro-steps with gradient
   accumulation (the executor). Routes are replayed in both stages whatever the policy: a policy changes
   speed, never the math.
"""
import dataclasses
import functools
import logging
import os
import time
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from foremoe_jax import backends, distributed
from foremoe_jax.checkpoint import Checkpointer
from foremoe_jax.executor import Executor, prepare_step, replicate_unsharded
from foremoe_jax.mesh import batch_sharding, batch_shards
from foremoe_jax.planner import POLICIES, CostModel, PlanConfig, plan_step
from foremoe_jax.rl.grpo import chunked_token_logprobs, group_advantages, grpo_loss
from foremoe_jax.rl.microbatch import build_step_batches, with_advantages
from foremoe_jax.rl.optim import rl_optimizer
from foremoe_jax.rl.planning import Planner, minibatches, policy_report, timed_plan
from foremoe_jax.load_monitor import load_record, step_loads
from foremoe_jax.rl.rollout import length_stats, rollout

log = logging.getLogger(__name__)

STAGES = ("rollout", "plan_wait", "recompute", "update")


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


class GRPOTrainer:
  """Holds the executor (parameters, optimizer state) and runs RL steps."""

  def __init__(self, cfg, model, mesh, task, run_dir: str):
    self.cfg, self.rl, self.mesh, self.task = cfg, cfg.rl.validate(batch_shards(mesh)), mesh, task
    self.tok = task.tokenizer
    moe = model.moe_layers()[0]
    self.expert_devices = moe.num_devices
    cost = CostModel(hidden=cfg.model.d_model, expert_intermediate=cfg.model.d_ff_expert,
                     bytes_per_param=jnp.dtype(cfg.model.param_dtype).itemsize,
                     matmul_flops_per_s=self.rl.plan_matmul_tflops * 1e12, link_bytes_per_s=self.rl.plan_link_gbs * 1e9,
                     a2a_bytes_per_s=self.rl.plan_a2a_gbs * 1e9,
                     padded_a2a=backends.choose_dispatch(moe.cfg.dispatch) == "padded")
    self.plan_cfg = PlanConfig(num_experts=cfg.model.num_experts, num_devices=moe.num_devices,
                               slots_per_device=moe.slots, policy=self.rl.policy, cost=cost,
                               capacity_buckets=self.rl.capacity_buckets)
    self.planner = Planner(self.rl.plan_in_process)  # a process starts now: its imports are paid early
    weakref.finalize(self, self.planner.close)
    self.prompts = task.load_prompts(self.rl.prompt_file) if self.rl.prompt_file else None
    objective = functools.partial(grpo_objective, clip_eps=self.rl.clip_eps, kl_coef=self.rl.kl_coef)
    tx = rl_optimizer(self.rl.lr, self.rl.adam_dtype)
    self.executor = Executor(model, tx, objective, mesh)
    self.reference = None
    if self.rl.kl_coef > 0:  # a frozen copy: the policy's update donates its parameter buffers
      self.reference = Executor(model, optax.identity(), objective, mesh)
      self.reference.params = jax.tree.map(jnp.copy, self.reference.params)
    self.ckpt = Checkpointer(os.path.join(run_dir, "rl_ckpt"))
    self.history = None
    self.route_hook = None  # fn(host Rollout) -> Rollout, applied after the rollout: benchmarks' trace routes
    self.capacities = set()  # the padded capacities met so far: each compiled its programs once

  # --- checkpoints ---------------------------------------------------------------------------------
  def save(self, step: int, record: dict) -> None:
    history = None if self.history is None else self.history.tolist()
    self.ckpt.save(step, {"params": self.executor.params, "opt": self.executor.opt_state},
                   {"history": history, "record": record})

  def restore(self, step: int | None = None) -> int:
    """Loads checkpoint `step` (default: the last); returns the next step to run (0 without one)."""
    target = {"params": self.executor.params, "opt": self.executor.opt_state}
    if step is None:
      restored = self.ckpt.restore_latest(target)
      distributed.check_same_across_processes([np.asarray(-1 if restored is None else restored[0])],
                                              "the RL step to resume")
      if restored is None:
        return 0
      last, state, extra = restored
    else:
      last, (state, extra) = step, self.ckpt.restore(step, target)
    state = replicate_unsharded(state, self.mesh)
    self.executor.params, self.executor.opt_state = state["params"], state["opt"]
    self.history = None if extra.get("history") is None else np.asarray(extra["history"], np.int64)
    return last

  # --- one step ------------------------------------------------------------------------------------
  def sample_prompts(self, rng: np.random.Generator) -> list[tuple[str, str]]:
    n = self.rl.prompts_per_step
    if self.prompts is None:
      return self.task.sample(rng, n)
    return [self.prompts[i] for i in rng.integers(0, len(self.prompts), size=n)]

  def device_batch(self, batch: dict) -> dict:
    """Host arrays (the same on every process) -> global arrays sharded over the batch axes."""
    shard, replicated = batch_sharding(self.mesh), NamedSharding(self.mesh, P())

    def put(v):
      v = np.asarray(v)
      sharding = replicated if v.ndim == 0 else shard
      return jax.make_array_from_callback(v.shape, sharding, lambda index: v[index])
    return {k: put(v) for k, v in batch.items()}

  def step(self, step: int) -> dict:
    rl, times = self.rl, {}
    rng = np.random.default_rng([self.cfg.seed, step])
    pairs = self.sample_prompts(rng)
    prompts_NxP, lens_N = self.task.prompt_batch([p for p, _ in pairs])

    tic = time.perf_counter()
    roll = rollout(self.executor.model(), prompts_NxP, lens_N, jax.random.key(step + 7919 * self.cfg.seed),
                   max_new_tokens=rl.max_new_tokens, group_size=rl.group_size, temperature=rl.temperature,
                   top_p=rl.top_p, eos_id=self.tok.eos_id, pad_id=self.tok.pad_id)
    roll = distributed.to_host(roll._replace(logprobs=None))  # multi-process: one gather, routes included
    times["rollout"] = time.perf_counter() - tic
    roll = roll if self.route_hook is None else self.route_hook(roll)

    tic = time.perf_counter()
    packed = build_step_batches(roll.tokens, roll.routes, roll.completion_mask, roll.lengths,
                                num_shards=batch_shards(self.mesh), expert_devices=self.expert_devices,
                                rows_per_shard=rl.rows_per_shard, tokens_per_shard=rl.tokens_per_shard,
                                num_experts=self.plan_cfg.num_experts, num_minibatches=rl.num_minibatches,
                                seed=step, pack_sequences=rl.pack_sequences)
    # One plan per mini-batch, in order: mini-batch i recomputes while the later ones are planned.
    planned = minibatches(packed.counts_MxLxDxE, rl.num_minibatches, self.history)
    futures = [self.planner.submit(timed_plan, c, self.plan_cfg, h) for c, h in planned]
    # Queued behind the plans: runs while recompute and update do, collected at the end of the step.
    report = self.planner.submit(policy_report, packed.counts_MxLxDxE, rl.num_minibatches, self.plan_cfg,
                                 self.history)
    loads = self.planner.submit(step_loads, roll.routes, roll.lengths, packed.counts_MxLxDxE, rl.num_minibatches,
                                self.plan_cfg, self.history)  # expert-load monitoring, off this thread
    answers = [a for _, a in pairs for _ in range(rl.group_size)]
    completions = [self.tok.decode(row[start:]) for row, start in zip(roll.tokens, roll.prompt_lengths)]
    rewards_N = np.array([self.task.score(c, a) for c, a in zip(completions, answers)], np.float32)
    advantages_N = np.asarray(group_advantages(jnp.asarray(rewards_N), rl.group_size))
    batches = [self.device_batch(b) for b in with_advantages(packed, advantages_N)]
    times["postprocess"] = time.perf_counter() - tic
    self.history = planned[-1][0]

    # Recompute: each mini-batch as soon as its plan is ready (the first, by default, in the home layout:
    # the same log-probs, no wait); time spent waiting for plans is plan_wait.
    tic, waited, planner_s = time.perf_counter(), 0.0, 0.0
    per_mb = len(batches) // rl.num_minibatches
    groups, compiled_M, plan_digests = [], [], []
    for i, future in enumerate(futures):
      micro_batches = batches[i * per_mb:(i + 1) * per_mb]
      at_home = i == 0 and rl.home_first_recompute
      if at_home:
        home = self.home_tables(planned[0][0])
        self.compile_ahead(step, micro_batches, home, ("forward",), compiled_M)
        self.attach_logprobs(micro_batches, home)
      wait = time.perf_counter()
      plan, plan_s = future.result()
      waited += time.perf_counter() - wait
      # Multi-process: every process planned from the same gathered routes; a differing plan would
      # silently mix placements, so compare hashes (one tiny all-gather) and fail loudly.
      plan_digests.append(distributed.check_same_across_processes(
          (plan.slot_expert, plan.slot_share, plan.base), f"rl step {step}: the plan of mini-batch {i}"))
      prepare = time.perf_counter()  # the device tables, on this thread
      tables = prepare_step(plan, planned[i][0], self.plan_cfg.num_experts, mesh=self.mesh)
      planner_s += plan_s + time.perf_counter() - prepare
      groups.append((micro_batches, tables))
      self.compile_ahead(step, micro_batches, tables, ("train",) if at_home else ("forward", "train"), compiled_M)
      if not at_home:
        self.attach_logprobs(micro_batches, tables)
    times["plan_wait"], times["recompute"] = waited, time.perf_counter() - tic - waited
    capacity_M = [c for _, t in groups for c in t.capacity_M]
    new_capacities = sorted(set(compiled_M) - self.capacities)  # their programs compile in this step
    self.capacities.update(compiled_M)

    tic = time.perf_counter()
    updates = [self.executor.train_step(mb, tables) for _ in range(rl.ppo_epochs) for mb, tables in groups]
    times["update"] = time.perf_counter() - tic
    imbalance_sums, per_micro_step = report.result()
    kl = float(np.mean([u["metrics"]["approx_kl"].sum() for u in updates]))
    return {"step": step, "reward": float(rewards_N.mean()), "kl": kl,
            "loss": float(np.mean([u["loss"] for u in updates])),
            "clip_frac": float(np.mean([u["metrics"]["clip_frac"].sum() for u in updates])),
            "seconds": times, "planner_ms": 1e3 * planner_s, "micro_steps": len(batches),
            "imbalance": {p: a / b for p, (a, b) in imbalance_sums.items()},
            "imbalance_sums": imbalance_sums, "imbalance_per_micro_step": per_micro_step,
            "dropped": int(sum(u["metrics"]["dropped"].sum() for u in updates)),
            "capacity_mean": float(np.mean(capacity_M)), "capacities_compiled": len(self.capacities),
            "new_capacities": new_capacities, "load": load_record(*loads.result()),
            "response_length": length_stats(roll.tokens, roll.lengths, roll.prompt_lengths, eos_id=self.tok.eos_id,
                                            max_new_tokens=rl.max_new_tokens),
            "samples": [{"prompt": pairs[b // rl.group_size][0], "answer": answers[b], "response": completions[b],
                         "reward": float(rewards_N[b])} for b in range(0, len(completions), rl.group_size)][:4],
            "plan_digests": plan_digests}

  def compile_ahead(self, step: int, micro_batches: list[dict], tables, programs, met_this_step: list) -> None:
    """The programs a stage will run for `tables` compile before it, `rl.compile_workers` at a time
    (`Executor.precompile`), instead of one by one inside the stage: each recompute or update program of
    a new padded capacity takes tens of seconds for a large model on a GPU. Programs compiled before cost
    a cache lookup (a few ms per call on the CI box), so every group is checked: a known capacity can
    still meet a new variant (refill, fill). New capacities are named before the wait."""
    new = sorted(set(tables.capacity_M) - self.capacities - set(met_this_step))
    met_this_step += tables.capacity_M
    if new:
      log.info("step %d: compiling %s programs for new padded capacities %s", step, "/".join(programs), new)
    if not self.rl.compile_workers:
      return  # each compiles when first called
    abstract = self.with_logprob_slots(
        micro_batches, lambda mask: jax.ShapeDtypeStruct(mask.shape, jnp.float32, sharding=mask.sharding))
    reports = [self.executor.precompile(abstract, tables, programs=programs, workers=self.rl.compile_workers)]
    if self.reference is not None and "forward" in programs:
      reports.append(self.reference.precompile(abstract, tables, programs=("forward",),
                                               workers=self.rl.compile_workers))
    if new:
      log.info("step %d: %d programs ready: lowering %.1f s, then XLA in %d threads %.1f s", step,
               sum(r["programs"] for r in reports), sum(r["lower_s"] for r in reports), self.rl.compile_workers,
               sum(r["compile_s"] for r in reports))

  def home_tables(self, counts_MxLxDxE):
    """StepTables of the home layout (no plan to wait for; the static policy's tables)."""
    home = dataclasses.replace(self.plan_cfg, policy="static")
    return prepare_step(plan_step(counts_MxLxDxE, home), counts_MxLxDxE, home.num_experts, mesh=self.mesh)

  def with_logprob_slots(self, micro_batches: list[dict], make) -> list[dict]:
    """Each micro-batch with its log-prob entries (old, and the reference's if any) made by make(mask):
    the recompute's placeholders and the update's batches then share one structure and sharding, which
    `compile_ahead` compiles for."""
    keys = ("logp_old",) if self.reference is None else ("logp_old", "logp_ref")
    return [{**b, **{k: make(b["mask"]) for k in keys}} for b in micro_batches]

  def attach_logprobs(self, micro_batches: list[dict], tables) -> None:
    """Recompute: old (and reference) log-probs under replayed routes, forward only."""
    placeholders = self.with_logprob_slots(micro_batches,
                                           lambda mask: jnp.zeros(mask.shape, jnp.float32, device=mask.sharding))
    for key, executor in (("logp_old", self.executor), ("logp_ref", self.reference)):
      if executor is None:
        continue
      for batch, (_, metrics) in zip(micro_batches, executor.forward(placeholders, tables)):
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


def format_record(step: int, record: dict, policy: str) -> str:
  secs = record["seconds"]
  stages = " ".join(f"{k} {secs[k]:.2f}s" for k in STAGES)
  imb = " ".join(f"{p}{'*' if p == policy else ''} {v:.3f}" for p, v in record["imbalance"].items())
  compiled = (f" | compiled for new padded capacities {record['new_capacities']}"
              if record.get("new_capacities") else "")
  return (f"rl step {step}: reward {record['reward']:.3f} kl {record['kl']:.4f} | {stages} "
          f"(planner {record['planner_ms']:.1f} ms) | imbalance {imb}{compiled}")


def summarize(records: list[dict], policy: str) -> dict:
  """Run-level numbers: imbalance per policy over the whole run (sum of max / sum of mean loads)."""
  sums = {p: np.sum([r["imbalance_sums"][p] for r in records], axis=0) for p in POLICIES}
  return {"steps": len(records), "reward_first": records[0]["reward"], "reward_last": records[-1]["reward"],
          "imbalance": {p: float(a / b) for p, (a, b) in sums.items()},
          "seconds_per_stage": {k: float(np.mean([r["seconds"][k] for r in records])) for k in STAGES},
          "planner_ms": float(np.mean([r["planner_ms"] for r in records])), "policy": policy}
