"""Planner benchmark: every policy on DeepSeek-V2-Lite ESFT routes, plus a planning-speed mode.

Quality (default): builds steps of M micro-steps from whole sequences of the traces (single task or all
four mixed), for several EP sizes and token budgets, plans each with every policy (eplb_history gets the
previous step's counts) and prints a table; saves a plot of per-micro-step imbalance per policy.

    python benchmarks/planner.py [--traces ../shared/traces] [--ep 8 16] [--tokens 1024 4096]
    python benchmarks/planner.py --speed        # E=128, D=64, S=3, synthetic skewed counts, one core

Planning time is CPU time of the calling process (time.process_time), which a busy shared machine
disturbs less than wall time.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
  os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from foremoe_jax.planner import POLICIES, CostModel, PlanConfig, plan_step, traces  # noqa: E402
from foremoe_jax.planner import metrics  # noqa: E402

COLUMNS = (("task", "{}"), ("D", "{}"), ("S", "{}"), ("tok/dev", "{}"), ("policy", "{}"), ("imbalance", "{:.4f}"),
           ("base off home", "{:.1f}"), ("off base /(m,l)", "{:.2f}"), ("max off base /dev", "{}"),
           ("changed /(m,l)", "{:.2f}"), ("changed /dev", "{:.3f}"), ("host /(m,l)", "{:.2f}"),
           ("remote %", "{:.1f}"), ("a2a MB /(m,l)", "{:.1f}"),
           ("pair need", "{}"), ("est ms /step", "{:.2f}"), ("plan ms /(m,l)", "{:.3f}"))


def timed_plan(counts, cfg, history=None, repeats=1):
  """(plan, CPU ms per (m, l), the best of `repeats`)."""
  best = np.inf
  for _ in range(repeats):
    start = time.process_time()
    plan = plan_step(counts, cfg, history=history)
    best = min(best, time.process_time() - start)
  return plan, 1e3 * best / (counts.shape[0] * counts.shape[1])


def pair_need(plan, counts):
  """The padded all_to_all's exact capacity: max over (m, l, source, destination device) of the pairs."""
  pairs = plan.slot_pairs(counts)
  return int(pairs.reshape(*pairs.shape[:3], plan.config.num_devices, -1).sum(-1).max())


def markdown_table(rows):
  lines = ["| " + " | ".join(name for name, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
  lines += ["| " + " | ".join(fmt.format(row[name]) for name, fmt in COLUMNS) + " |" for row in rows]
  return "\n".join(lines)


def run_quality(args, cost):
  root = pathlib.Path(args.traces)
  if not (root / traces.ESFT_DIR).is_dir():
    raise SystemExit(f"no ESFT traces under {root}: pass --traces or set FOREMOE_TRACES")
  pools = {task: traces.load_esft_task(root, task) for task in traces.ESFT_TASKS}
  rows, curves = [], {}
  for task in args.tasks:
    tasks = traces.ESFT_TASKS if task == "mixed" else (task,)
    for num_devices in args.ep:
      slots_per_device = traces.ESFT_EXPERTS // num_devices + args.redundant
      for tokens in args.tokens:
        rng = np.random.default_rng(args.seed)
        history = traces.esft_step_counts(pools, tasks, args.micro_steps, num_devices, tokens, rng)
        counts = traces.esft_step_counts(pools, tasks, args.micro_steps, num_devices, tokens, rng)
        for policy in POLICIES:
          cfg = PlanConfig(traces.ESFT_EXPERTS, num_devices, slots_per_device, policy=policy, cost=cost)
          plan, ms = timed_plan(counts, cfg, history=history)
          plan.validate()
          row = dict(task=task, D=num_devices, S=slots_per_device, policy=policy, **metrics.summary(plan, counts))
          row["tok/dev"] = tokens
          row.update({"base off home": row["base_off_home"], "off base /(m,l)": row["off_base"],
                      "max off base /dev": row["off_base_max_per_device"], "changed /(m,l)": row["changed"],
                      "changed /dev": row["changed_per_device"], "host /(m,l)": row["host_path"],
                      "remote %": 100 * row["remote_fraction"], "a2a MB /(m,l)": row["a2a_mb_per_ml"],
                      "est ms /step": row["est_ms_per_step"], "plan ms /(m,l)": ms,
                      "pair need": pair_need(plan, counts)})
          rows.append(row)
          if (task, num_devices, tokens) == (args.tasks[0], args.ep[0], args.tokens[0]):
            curves[policy] = metrics.per_micro_step_imbalance(plan, counts)
          print(f"{task:11s} D={num_devices:<3d} tok={tokens:<5d} {policy:15s} imbalance {row['imbalance']:.4f}"
                f"  pair need {row['pair need']}  plan {ms:.3f} ms/(m,l)", flush=True)
  save_plot(curves, args)
  return rows


def save_plot(curves, args):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import matplotlib.ticker
  fig, ax = plt.subplots(figsize=(7.6, 3.6), dpi=100)
  for policy, curve in curves.items():
    # The excess over a perfect balance, on a log scale, separates 1.001 from 1.007.
    ax.plot(np.arange(len(curve)), 100 * np.maximum(curve - 1, 1e-4), marker="o", markersize=3, label=policy)
  ax.set_yscale("log")
  ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
  ax.set_xlabel("micro-step")
  ax.set_ylabel("imbalance - 1 (%, over layers)")
  ax.set_title(f"ESFT {args.tasks[0]}, E=64, D={args.ep[0]}, {args.tokens[0]} tokens/device, "
               f"{args.redundant} redundant slot(s)/device", fontsize=9)
  ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
  ax.grid(alpha=0.3, which="both")
  fig.tight_layout()
  pathlib.Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(args.plot)
  print(f"saved {args.plot}")


def synthetic_counts(rng, num_micro, num_layers, num_devices, num_experts, pairs_per_device):
  """Skewed counts: per-layer Zipf expert popularity (clipped), perturbed per micro-step and device."""
  popularity = rng.zipf(1.5, size=(num_layers, num_experts)).clip(max=50).astype(float)
  p = popularity[None, :, None, :] * rng.gamma(2.0, size=(num_micro, num_layers, num_devices, num_experts))
  p /= p.sum(-1, keepdims=True)
  flat = p.reshape(-1, num_experts)
  return np.stack([rng.multinomial(pairs_per_device, row) for row in flat]).reshape(p.shape)


def run_speed(args, cost):
  os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
  num_experts, num_devices, slots_per_device = 128, 64, 3
  rng = np.random.default_rng(args.seed)
  counts = synthetic_counts(rng, args.micro_steps, args.layers, num_devices, num_experts, args.speed_pairs)
  rows = []
  for policy in POLICIES:
    cfg = PlanConfig(num_experts, num_devices, slots_per_device, policy=policy, cost=cost)
    plan, batched_ms = timed_plan(counts, cfg, history=counts, repeats=args.repeats)
    _, micro_step_ms = timed_plan(counts[:1], cfg, history=counts[:1], repeats=args.repeats)
    _, single_ms = timed_plan(counts[:1, :1], cfg, history=counts[:1, :1], repeats=args.repeats)
    rows.append((policy, plan.imbalance(counts), batched_ms, micro_step_ms, single_ms))
    print(f"{policy:15s} done", flush=True)
  print(f"\nE={num_experts} D={num_devices} S={slots_per_device}, M={args.micro_steps} L={args.layers}, "
        f"{args.speed_pairs} pairs/device, one core, best of {args.repeats}")
  print("| policy | imbalance | plan ms /(m,l), whole step | ... one micro-step (all layers) | ... one (m,l) alone |")
  print("|---|---|---|---|---|")
  for policy, imbalance, batched_ms, micro_step_ms, single_ms in rows:
    print(f"| {policy} | {imbalance:.4f} | {batched_ms:.3f} | {micro_step_ms:.3f} | {single_ms:.3f} |")


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--traces", default=str(traces.traces_root()), help="traces root (holds esft_deepseek_v2_lite/)")
  parser.add_argument("--ep", type=int, nargs="+", default=[8, 16], help="EP sizes D (divide 64)")
  parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096], help="tokens per device per micro-step")
  parser.add_argument("--tasks", nargs="+", default=["mixed", *traces.ESFT_TASKS], help="'mixed' or ESFT task names")
  parser.add_argument("--redundant", type=int, default=1, help="redundant slots per device")
  parser.add_argument("--micro-steps", type=int, default=16)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--plot", default="benchmarks/results/planner_imbalance.png")
  parser.add_argument("--speed", action="store_true", help="planning speed at E=128, D=64, S=3 on one core")
  parser.add_argument("--layers", type=int, default=48, help="speed mode: layers per step")
  parser.add_argument("--speed-pairs", type=int, default=8192, help="speed mode: pairs per device (1024 tokens, top-8)")
  parser.add_argument("--repeats", type=int, default=3, help="speed mode: best of this many runs")
  # Cost model calibration (defaults: H100, DeepSeek-V2-Lite expert for the traces).
  parser.add_argument("--hidden", type=int, default=2048)
  parser.add_argument("--expert-intermediate", type=int, default=1408)
  parser.add_argument("--flops", type=float, default=CostModel.matmul_flops_per_s, help="grouped GEMM FLOP/s")
  parser.add_argument("--link", type=float, default=CostModel.link_bytes_per_s, help="ppermute bytes/s per device")
  parser.add_argument("--a2a", type=float, default=CostModel.a2a_bytes_per_s, help="all_to_all bytes/s per device")
  parser.add_argument("--overlap", type=float, default=CostModel.overlap_fraction)
  parser.add_argument("--calibrated", default="", metavar="CARD",
                      help="measured exposed move costs of this card (foremoe_jax/planner/calibration/CARD.json)")
  args = parser.parse_args()
  fields = dict(hidden=args.hidden, expert_intermediate=args.expert_intermediate, matmul_flops_per_s=args.flops,
                link_bytes_per_s=args.link, a2a_bytes_per_s=args.a2a, overlap_fraction=args.overlap)
  cost = CostModel.calibrated(args.calibrated, **fields) if args.calibrated else CostModel(**fields)
  print(f"cost model: {cost.calibration or 'bandwidth estimates'}; link {cost.link_exposed_s}, host "
        f"{cost.host_exposed_s} s per moved expert-layer")
  if args.speed:
    run_speed(args, cost)
    return
  rows = run_quality(args, cost)
  print("\n" + markdown_table(rows))


if __name__ == "__main__":
  main()
