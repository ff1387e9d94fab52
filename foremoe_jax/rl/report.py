"""What an RL step reports: device load and imbalance per policy, throughput, the log line and the run summary.

Imbalance (max / mean device load, summed over micro-steps and layers) comes from device loads `[M, L, D]`
per policy: by default the running policy's (from the plans it ran) and static's (the home layout, a sum
of the counts); with `rl.report_policies` every policy is planned on the same counts for it
(`policy_loads`, on the planner's worker). The expert-load monitor (`load_monitor.load_record`) reads the
same loads.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from foremoe_jax.planner import POLICIES, PlanConfig, plan_step
from foremoe_jax.rl.planning import minibatches

STAGES = ("rollout", "postprocess", "plan_wait", "recompute", "update", "record")
THROUGHPUT = ("step_s", "real_tokens", "tokens_per_s", "train_tokens_per_s", "plan_wait_share", "moe_flop_share")


def home_device_load(counts_MxLxDxE: np.ndarray, num_devices: int) -> np.ndarray:
  """float64 `[M, L, D]`: the static policy's device load, every expert's pairs (from all sources) on its
  home device `e // (E / D)`; equal to the static plan's `device_load`, without planning."""
  num_micro, num_layers, _, num_experts = counts_MxLxDxE.shape
  per_expert = np.asarray(counts_MxLxDxE).sum(2)
  return per_expert.reshape(num_micro, num_layers, num_devices, num_experts // num_devices).sum(-1).astype(np.float64)


def policy_loads(counts_MxLxDxE, num_minibatches: int, plan_cfg: PlanConfig, history) -> dict[str, np.ndarray]:
  """policy -> device load `[M, L, D]` for every policy on the same counts, one plan per mini-batch as the
  trainer plans them (`rl.report_policies`; run on the planner's worker, off the dispatch thread)."""
  loads = {}
  for policy in POLICIES:
    cfg = dataclasses.replace(plan_cfg, policy=policy)
    loads[policy] = np.concatenate([plan_step(chunk, cfg, history=hist).device_load(chunk)
                                    for chunk, hist in minibatches(counts_MxLxDxE, num_minibatches, history)])
  return loads


def imbalance_report(loads: dict[str, np.ndarray]) -> dict:
  """The record's imbalance entries from policy -> device load `[M, L, D]`: `imbalance` (sum over (m, l) of
  the max load / of the mean load), its two sums (`imbalance_sums`, what `summarize` adds over steps) and
  `imbalance_per_micro_step` ([M] per policy, what `metrics.plot_run` draws)."""
  sums = {p: (float(x.max(-1).sum()), float(x.mean(-1).sum())) for p, x in loads.items()}
  return {"imbalance": {p: a / b if b > 0 else 1.0 for p, (a, b) in sums.items()}, "imbalance_sums": sums,
          "imbalance_per_micro_step": {p: (x.max(-1).sum(-1) / np.maximum(x.mean(-1).sum(-1), 1e-9)).tolist()
                                       for p, x in loads.items()}}


def moe_flop_share(model_cfg) -> float:
  """Share of the model's matmul FLOPs per token spent in the MoE experts (their top-k SwiGLU FFNs).

  Analytic, from the `ModelConfig` alone, not measured: the weight matmuls of attention (q, k, v, o), the
  router, the experts, the dense FFNs and the LM head. Attention's score and value products (which grow
  with the context) are left out; the backward pass scales every term alike, so the share holds for the
  update as for the forward."""
  c = model_cfg
  attention = c.d_model * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
  experts = c.moe.top_k * 3 * c.d_model * c.moe.d_ff_expert
  num_moe = len(c.moe_layer_ids)
  total = (c.num_layers * attention + num_moe * (experts + c.d_model * c.moe.num_experts)
           + (c.num_layers - num_moe) * 3 * c.d_model * c.d_ff_dense + c.d_model * c.vocab_size)
  return num_moe * experts / total


def throughput(seconds: dict, real_tokens: int, ppo_epochs: int, model_cfg) -> dict:
  """The step's speed from its stage seconds: `step_s` (their sum), `tokens_per_s` (real tokens, padding
  excluded, per step second), `train_tokens_per_s` (real tokens x ppo_epochs per update second),
  `plan_wait_share` (plan_wait / step_s) and `moe_flop_share`."""
  step_s = float(sum(seconds.values()))
  return {"step_s": step_s, "real_tokens": int(real_tokens), "tokens_per_s": real_tokens / max(step_s, 1e-9),
          "train_tokens_per_s": real_tokens * ppo_epochs / max(seconds["update"], 1e-9),
          "plan_wait_share": seconds["plan_wait"] / max(step_s, 1e-9), "moe_flop_share": moe_flop_share(model_cfg)}


def _si(x: float) -> str:
  return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}"


def format_record(step: int, record: dict, policy: str) -> str:
  """The step's log line: reward, KL, speed, seconds per stage, planner time, imbalance (running policy
  starred)."""
  secs = record["seconds"]
  stages = " ".join(f"{k} {secs[k]:.2f}s" for k in STAGES)
  imb = " ".join(f"{p}{'*' if p == policy else ''} {v:.3f}" for p, v in record["imbalance"].items())
  compiled = (f" | compiled for new padded capacities {record['new_capacities']}"
              if record.get("new_capacities") else "")
  return (f"rl step {step}: reward {record['reward']:.3f} kl {record['kl']:.4f} | {record['step_s']:.2f}s "
          f"{_si(record['tokens_per_s'])} tok/s (train {_si(record['train_tokens_per_s'])}) MoE "
          f"{record['moe_flop_share']:.0%} | {stages} (planner {record['planner_ms']:.1f} ms, wait "
          f"{record['plan_wait_share']:.1%}) | imbalance {imb}{compiled}")


def summarize(records: list[dict], policy: str) -> dict:
  """Run-level numbers: imbalance per policy over the whole run (sum of max / sum of mean loads; the
  policies every record reports), and the means over steps of the stage seconds and throughput."""
  reported = [p for p in records[0]["imbalance_sums"] if all(p in r["imbalance_sums"] for r in records)]
  sums = {p: np.sum([r["imbalance_sums"][p] for r in records], axis=0) for p in reported}
  return {"steps": len(records), "reward_first": records[0]["reward"], "reward_last": records[-1]["reward"],
          "imbalance": {p: float(a / b) if b > 0 else 1.0 for p, (a, b) in sums.items()},
          "seconds_per_stage": {k: float(np.mean([r["seconds"][k] for r in records])) for k in STAGES},
          **{k: float(np.mean([r[k] for r in records])) for k in THROUGHPUT},
          "planner_ms": float(np.mean([r["planner_ms"] for r in records])), "policy": policy}
