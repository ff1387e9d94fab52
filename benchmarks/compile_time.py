"""Compile-time benchmark: how long the first optimizer step of a new set of capacities waits for XLA.

Each padded capacity a micro-step meets compiles its programs once (`executor.py`); on an H200 one
micro-step program of the 4-layer MoE step took ~50 s to lower and compile, so a step that meets three
new capacities used to wait minutes. This times, for one step whose micro-steps use `--capacities`
(cycled; ideal routes, the `moe_step.py` layer stack on `--ep` devices):
- `inline`: the step as it runs by default, each program compiled when first called (one after another);
- `precompile`: `Executor.precompile` first (lowering here, XLA in `--workers` threads), then the step.
Run one mode per process (XLA's and the kernels' in-process caches would favour whichever runs second):

    python benchmarks/compile_time.py --mode inline --out /tmp/compile.json
    python benchmarks/compile_time.py --mode precompile --workers 8 --out /tmp/compile.json
    JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=2 \\
      python benchmarks/compile_time.py --smoke --ep 2 --mode precompile   # CPU, tiny shapes
"""
from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from common import E, F, H, K, counts_of, ideal_routes, parse_with_smoke, stack_setup  # noqa: E402

SMOKE = dict(hidden=64, expert_hidden=64, tokens=32, layers=2, micro_steps=4)


def build(args):
  """(executor, (params, opt_state), micro-batches, step tables) for one step of ideal routes at the requested
  capacities."""
  import dataclasses

  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from foremoe_jax.executor import Executor
  from foremoe_jax.step_tables import prepare_step
  from foremoe_jax.moe_stack import MoEStack
  from foremoe_jax.planner import PlanConfig, plan_step

  d, m, l = args.ep, args.micro_steps, args.layers
  mesh, cfg, loss_fn = stack_setup(args, d)
  model = MoEStack(cfg, l, mesh=mesh, rngs=nnx.Rngs(0))
  executor = Executor(model, optax.sgd(1e-3), loss_fn, mesh)
  routes = ideal_routes(m, d * args.tokens, l)
  counts = counts_of(routes, d)
  step = prepare_step(plan_step(counts, PlanConfig(E, d, E // d + 1, policy="static")), counts, E, mesh=mesh)
  capacities = args.capacities or [step.capacity + i * max(8, step.capacity // 16) for i in range(3)]
  if min(capacities) < step.capacity:
    raise SystemExit(f"--capacities must cover the step's need of {step.capacity} rows per pair")
  step = dataclasses.replace(step, capacity_M=tuple(capacities[i % len(capacities)] for i in range(m)))
  shard = NamedSharding(mesh, P(("data", "expert")))
  keys = jax.random.split(jax.random.key(1), (m, 2))
  batches = [{"x": jax.device_put(jax.random.normal(keys[i, 0], (d, args.tokens, args.hidden), jnp.bfloat16), shard),
              "target": jax.device_put(jax.random.normal(keys[i, 1], (d, args.tokens, args.hidden), jnp.bfloat16),
                                       shard),
              "replay": jax.device_put(routes[i].reshape(d, args.tokens, l, K).astype(np.int32), shard)}
             for i in range(m)]
  return executor, executor.init(model), batches, step


def run(args) -> dict:
  import jax

  executor, (params, opt_state), batches, step = build(args)
  compiles = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, secs, **_: compiles.append(secs) if event == "/jax/core/compile/backend_compile_duration" else None)
  result = {"mode": args.mode, "workers": args.workers if args.mode == "precompile" else None,
            "capacities": sorted(set(step.capacity_M))}
  tic = time.perf_counter()
  if args.mode == "precompile":
    result.update(executor.precompile(batches, step, workers=args.workers))
  compiles.clear()
  start = time.perf_counter()
  params, opt_state, _ = executor.train_step(params, opt_state, batches, step)
  jax.block_until_ready(params)
  result["first_step_s"] = time.perf_counter() - start
  result["compiles_in_first_step"] = len(compiles)
  result["until_first_step_done_s"] = time.perf_counter() - tic
  samples = []
  for _ in range(args.repeats):
    start = time.perf_counter()
    params, opt_state, _ = executor.train_step(params, opt_state, batches, step)
    jax.block_until_ready(params)
    samples.append((time.perf_counter() - start) * 1e3)
  result["step_ms"] = float(np.median(samples))
  return result


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--mode", choices=("inline", "precompile"), default="precompile")
  ap.add_argument("--workers", type=int, default=8, help="compile threads (precompile)")
  ap.add_argument("--ep", type=int, default=1)
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--micro-steps", type=int, default=6)
  ap.add_argument("--tokens", type=int, default=4096, help="tokens per device per micro-step")
  ap.add_argument("--hidden", type=int, default=H)
  ap.add_argument("--expert-hidden", type=int, default=F)
  ap.add_argument("--capacities", type=int, nargs="+", default=None,
                  help="padded rows per (source, destination), cycled over the micro-steps (default: "
                       "the need and two buckets above it)")
  ap.add_argument("--gmm-backend", default=None)
  ap.add_argument("--dispatch-backend", default=None)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--out", default=None, help="JSON to append this run to")
  args = parse_with_smoke(ap, SMOKE)
  import jax
  result = run(args)
  result.update(card=jax.devices()[0].device_kind, jax=jax.__version__, ep=args.ep, layers=args.layers,
                micro_steps=args.micro_steps, tokens_per_device=args.tokens, hidden=args.hidden,
                expert_hidden=args.expert_hidden, date=datetime.date.today().isoformat(),
                command="python " + " ".join(sys.argv))
  print("| mode | workers | capacities | programs | lower s | compile s | first step s | compiles in it |"
        " until done s | step ms |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  print(f"| {result['mode']} | {result['workers'] or '-'} | {result['capacities']} | {result.get('programs', '-')} | "
        f"{result.get('lower_s', 0):.1f} | {result.get('compile_s', 0):.1f} | {result['first_step_s']:.1f} | "
        f"{result['compiles_in_first_step']} | {result['until_first_step_done_s']:.1f} | {result['step_ms']:.1f} |")
  if args.out:
    path = pathlib.Path(args.out)
    runs = json.loads(path.read_text())["runs"] if path.exists() else []
    path.write_text(json.dumps({"runs": runs + [result]}, indent=1))


if __name__ == "__main__":
  main()
