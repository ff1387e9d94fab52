"""Long-run soak on CPU: many GRPO steps of the tiny preset with a checkpoint every few steps; resident
memory must stay flat and nothing may compile once the capacities have been met.

  python scripts/soak.py --steps 200 --ckpt-every 10 --out benchmarks/results/soak_cpu.json

Prints one line per checkpoint (RSS, compiles so far) and a verdict: RSS growth after warm-up (the
first `--warmup` steps) and the compiles after warm-up, each named (step, program, the padded
capacities the step met first). Exits 1 when either target is missed.
"""
import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from foremoe_jax import distributed  # noqa: E402


def rss_mib() -> float:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--steps", type=int, default=200)
  p.add_argument("--ckpt-every", type=int, default=10)
  p.add_argument("--warmup", type=int, default=20, help="steps before the RSS baseline is taken")
  p.add_argument("--out", default=None, help="JSON result file")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, as train.py's")
  args = p.parse_args(argv)
  distributed.setup_cpu_devices()
  import jax

  import configs
  from foremoe_jax.rl.trainer import GRPOTrainer
  from foremoe_jax.sft import run_sft
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
  from compile_count import BACKEND_COMPILE, count_compiles

  overrides = [f"rl.steps={args.steps}", f"rl.ckpt_every={args.ckpt_every}", *args.set]
  cfg = configs.apply_overrides(configs.get_config("cpu_tiny"), overrides).validate()
  run_dir = tempfile.mkdtemp(prefix="soak_")
  state = run_sft(cfg, run_dir)
  trainer = GRPOTrainer(cfg, state.model, state.mesh, state.task, run_dir)
  rows, baseline, tic, named, step = [], None, time.perf_counter(), [], 0

  def name(event, duration_s, fun_name="?", **_):
    if event == BACKEND_COMPILE:
      named.append((step, fun_name))
  jax.monitoring.register_event_duration_secs_listener(name)
  late = []
  with count_compiles() as compiles:
    for step in range(args.steps):
      record = trainer.step(step)
      if (step + 1) % args.ckpt_every == 0:
        trainer.save(step + 1, {"reward": record["reward"]})
      if step >= args.warmup:
        late += [{"step": s, "program": f, "new_capacities": record["new_capacities"]} for s, f in named if s == step]
      if step + 1 == args.warmup:
        baseline = (rss_mib(), len(compiles))
      if (step + 1) % args.ckpt_every == 0:
        rows.append({"step": step + 1, "rss_mib": rss_mib(), "compiles": len(compiles),
                     "reward": record["reward"], "seconds": time.perf_counter() - tic})
        print(f"step {step + 1:4d}  rss {rows[-1]['rss_mib']:8.1f} MiB  compiles {len(compiles):4d}  "
              f"reward {record['reward']:.3f}", flush=True)
  growth = rows[-1]["rss_mib"] / baseline[0] - 1
  late_compiles = rows[-1]["compiles"] - baseline[1]
  jax.monitoring.unregister_event_duration_listener(name)
  result = {"steps": args.steps, "ckpt_every": args.ckpt_every, "warmup": args.warmup, "rows": rows,
            "rss_growth_after_warmup": growth, "compiles_after_warmup": late_compiles, "late_compiles": late,
            "overrides": args.set, "jax": jax.__version__, "backend": jax.default_backend(),
            "devices": jax.device_count()}
  print(f"RSS growth after step {args.warmup}: {100 * growth:+.1f}% (target < 5%); compiles after it: "
        f"{late_compiles} (target 0){''.join(f'; step {c}' for c in late)}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)
  return int(growth >= 0.05 or late_compiles > 0)


if __name__ == "__main__":
  sys.exit(main())
