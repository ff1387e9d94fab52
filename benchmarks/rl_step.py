"""The RL step of train.py (rollout -> plan -> recompute -> update) per placement policy, seconds per stage.

Every policy runs the same step from the same parameters (reset after each run), so the rollout, its
routes and the math are identical; only placements differ. One warm-up pass over all policies compiles
every program (one per padded capacity a micro-step meets: each policy's exchange is sized to its own
micro-steps' needs), then `--repeats` measured passes; the table reports medians.

`--routes traces[:ROOT]` replaces the rollout's routes with a trained model's (the DeepSeek-V2-Lite ESFT
traces, mapped onto this model's layers and experts by `foremoe_jax/rl/trace_routes.py`) before packing,
so the counts, the plans and the replayed routes all see real routing instead of a random router's. ROOT
defaults to $FOREMOE_TRACES, else <repo>/../shared/traces; without traces there the run uses live routes
and says so (the JSON's "routes").

  python benchmarks/rl_step.py --config gpu_4 --out $OUT/rl_step.json
  python benchmarks/rl_step.py --config cpu_tiny --set rl.prompts_per_step=16   # CPU smoke run
  python benchmarks/rl_step.py --config cpu_tiny --routes traces --repeats 1   # CPU, trace routes
"""
import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

POLICIES = ("static", "eplb_history", "eplb_step", "foremoe")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="cpu_tiny")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  p.add_argument("--policies", default=",".join(POLICIES))
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--out", default=None, help="JSON results path")
  p.add_argument("--routes", default="live", help="live | traces | traces:ROOT (see above)")
  p.add_argument("--trace-tasks", default=None, help="ESFT tasks replayed, comma-separated (default: all four)")
  p.add_argument("--profile", action="store_true",
                 help="after the timed passes, one more step per policy under the profiler: device kernels by time")
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  if os.environ.get("JAX_PLATFORMS", "") in ("", "cpu") and args.config == "cpu_tiny":
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  import jax
  import numpy as np
  from flax import nnx

  import configs
  from foremoe_jax.mesh import make_mesh
  from foremoe_jax.model import Model
  from foremoe_jax.rl import trace_routes
  from foremoe_jax.rl.trainer import GRPOTrainer
  from foremoe_jax.sft import make_task

  trace_root, routes_note = trace_routes.resolve(args.routes)  # a bad --routes fails before the model is built
  cfg = configs.apply_overrides(configs.get_config(args.config), args.set).validate()
  mesh = make_mesh(cfg.mesh_data, cfg.mesh_expert)
  model = Model(cfg.model, mesh=mesh, rngs=nnx.Rngs(cfg.seed))
  trainer = GRPOTrainer(cfg, model, mesh, make_task(cfg), f"/tmp/rl_step_bench_{os.getpid()}")
  if trace_root is not None:
    trainer.route_hook = trace_routes.esft_trace_routes(
        trace_root, num_experts=cfg.model.moe.num_experts, num_layers=len(cfg.model.moe_layer_ids),
        top_k=cfg.model.moe.top_k, group_size=cfg.rl.group_size, seed=cfg.seed,
        tasks=args.trace_tasks.split(",") if args.trace_tasks else trace_routes.traces.ESFT_TASKS)
    routes_note = f"traces ({trainer.route_hook.source}, {trace_root})"
  print(f"routes: {routes_note}", flush=True)
  initial = jax.tree.map(lambda a: a.copy(), (trainer.params, trainer.opt_state))
  policies = args.policies.split(",")
  runs = {p: [] for p in policies}
  for repeat in range(args.repeats + 1):  # pass 0 compiles
    for policy in policies:
      trainer.plan_cfg = dataclasses.replace(trainer.plan_cfg, policy=policy)
      trainer.params, trainer.opt_state = jax.tree.map(lambda a: a.copy(), initial)
      trainer.history = None
      tic = time.perf_counter()
      record = trainer.step(0)
      jax.block_until_ready(trainer.params)
      record["seconds"]["total"] = time.perf_counter() - tic
      print(f"pass {repeat} {policy}: " + " ".join(f"{k} {v:.3f}s" for k, v in record["seconds"].items()),
            flush=True)  # partial results survive a time limit
      if repeat:
        runs[policy].append(record)
  profiles = profile_steps(trainer, initial, policies) if args.profile else {}
  rows = []
  for policy, records in runs.items():
    med = {k: float(np.median([r["seconds"][k] for r in records])) for k in records[0]["seconds"]}
    rows.append({"policy": policy, "seconds": med, "imbalance": records[0]["imbalance"][policy],
                 "planner_ms": float(np.median([r["planner_ms"] for r in records])),
                 "micro_steps": records[0]["micro_steps"], "capacity_mean": records[0]["capacity_mean"],
                 **profiles.get(policy, {})})
  result = {"config": args.config, "overrides": args.set, "routes": routes_note, "devices": jax.device_count(),
            "device_kind": jax.devices()[0].device_kind, "jax": jax.__version__, "repeats": args.repeats,
            "capacities_compiled": len(trainer.ahead.capacities), "rows": rows, "date": time.strftime("%Y-%m-%d")}
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)
  print(f"\nRL step, {args.config}, {result['devices']} x {result['device_kind']}, jax {jax.__version__}, "
        f"median of {args.repeats}, {rows[0]['micro_steps']} micro-steps, "
        f"{len(trainer.ahead.capacities)} padded capacities compiled, routes: {routes_note}")
  print(f"{'policy':<14}{'imbalance':>10}{'capacity':>10}{'planner ms':>12}{'rollout s':>11}{'plan wait s':>13}"
        f"{'recompute s':>13}{'update s':>10}{'total s':>9}")
  for r in rows:
    s = r["seconds"]
    print(f"{r['policy']:<14}{r['imbalance']:>10.3f}{r['capacity_mean']:>10.0f}{r['planner_ms']:>12.1f}"
          f"{s['rollout']:>11.3f}{s['plan_wait']:>13.3f}{s['recompute']:>13.3f}{s['update']:>10.3f}{s['total']:>9.3f}")
  return result


def profile_steps(trainer, initial, policies) -> dict[str, dict]:
  """One step per policy under the profiler (compiled and warm by now): {policy: device ms, top kernels}."""
  import jax
  from kernel_profile import device_ms, kernel_table, print_table

  def step():
    trainer.params, trainer.opt_state = jax.tree.map(lambda a: a.copy(), initial)
    trainer.history = None
    trainer.step(0)
    return trainer.params

  out = {}
  for policy in policies:
    trainer.plan_cfg = dataclasses.replace(trainer.plan_cfg, policy=policy)
    kernels = kernel_table(step, (), repeats=1)
    print_table(f"{policy} step", kernels, top=25)
    out[policy] = {"device_ms": device_ms(kernels), "kernels": kernels[:40]}
  return out


if __name__ == "__main__":
  main(sys.argv[1:])
