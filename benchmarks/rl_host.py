"""Host time of the RL step on the trainer's (dispatch) thread, per policy: where the main thread spends
each step outside the device work it waits for (cProfile of that thread only; the planner's thread is
not profiled, but its GIL use shows up as slower main-thread calls).

On one device the static and foremoe plans are equal, so any difference between them is host work:
planning beside the dispatch loop, table building, plan digests, compile-ahead cache lookups.

  python benchmarks/rl_host.py --config gpu_1 --steps 3 --out $OUT/rl_host.json          # one GPU
  FOREMOE_CPU_DEVICES=1 python benchmarks/rl_host.py --set mesh_expert=1 \
      --set model.moe.slots_per_device=16 --set rl.prompts_per_step=16                        # CPU, one device
"""
import argparse
import cProfile
import dataclasses
import json
import os
import pstats
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Main-thread calls worth naming (function names as cProfile sees them; cumulative seconds per step).
CALLS = ("local_rollout", "pack_host", "build_step_batches", "gather_inputs", "gather_rows", "device_batch", "score",
         "result", "prepare_step", "home_tables", "check_same_across_processes", "true_on_every_process",
         "compile_ahead", "precompile", "attach_logprobs", "forward", "train_step", "policy_loads", "plan_step",
         "device_load")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="cpu_tiny")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  p.add_argument("--policies", default="static,foremoe")
  p.add_argument("--steps", type=int, default=3, help="profiled steps per policy, after one warm-up step")
  p.add_argument("--out", default=None, help="JSON results path")
  p.add_argument("--dump", default=None, help="directory for each policy's pstats file (snakeviz, pstats)")
  return p.parse_args(argv)


def per_call_seconds(profile: cProfile.Profile, steps: int) -> dict:
  """name -> cumulative seconds per step of the first function of that name (the outermost call)."""
  stats = pstats.Stats(profile).stats  # (file, line, name) -> (calls, prim calls, tottime, cumtime, callers)
  out = {}
  for (_, _, name), (_, _, _, cumtime, _) in stats.items():
    if name in CALLS:
      out[name] = max(out.get(name, 0.0), cumtime / steps)
  return dict(sorted(out.items()))


def main(argv=None):
  args = parse_args(argv)
  from foremoe_jax import distributed
  distributed.setup_cpu_devices()
  import jax
  from flax import nnx

  import configs
  from foremoe_jax.mesh import make_mesh
  from foremoe_jax.model import Model
  from foremoe_jax.rl.trainer import GRPOTrainer
  from foremoe_jax.sft import make_task

  cfg = configs.apply_overrides(configs.get_config(args.config), args.set).validate()
  mesh = make_mesh(cfg.mesh_data, cfg.mesh_expert)
  model = Model(cfg.model, mesh=mesh, rngs=nnx.Rngs(cfg.seed))
  trainer = GRPOTrainer(cfg, model, mesh, make_task(cfg), f"/tmp/rl_host_bench_{os.getpid()}")
  initial = jax.tree.map(lambda a: a.copy(), (trainer.params, trainer.opt_state))
  rows = []
  for policy in args.policies.split(","):
    trainer.rl = dataclasses.replace(trainer.rl, policy=policy)
    trainer.plan_cfg = dataclasses.replace(trainer.plan_cfg, policy=policy)
    trainer.params, trainer.opt_state = jax.tree.map(lambda a: a.copy(), initial)
    trainer.history = None
    trainer.step(0)  # compiles
    jax.block_until_ready(trainer.params)
    profile, walls, records = cProfile.Profile(), [], []
    for step in range(1, args.steps + 1):
      tic = time.perf_counter()
      profile.enable()
      records.append(trainer.step(step))
      jax.block_until_ready(trainer.params)
      profile.disable()
      walls.append(time.perf_counter() - tic)
    calls = per_call_seconds(profile, args.steps)
    if args.dump:
      os.makedirs(args.dump, exist_ok=True)
      profile.dump_stats(os.path.join(args.dump, f"{policy}.pstats"))
    rows.append({"policy": policy, "step_s": sum(walls) / len(walls), "calls_s": calls,
                 "seconds": {k: sum(r["seconds"][k] for r in records) / len(records) for k in records[0]["seconds"]}})
    print(f"{policy}: step {rows[-1]['step_s']:.3f} s | " + " ".join(f"{k} {v * 1e3:.1f}ms" for k, v in calls.items()),
          flush=True)
  result = {"config": args.config, "overrides": args.set, "devices": jax.device_count(),
            "device_kind": jax.devices()[0].device_kind, "jax": jax.__version__, "steps": args.steps, "rows": rows}
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
