"""MoE-step benchmark: one optimizer step of a Qwen3-30B-A3B-shaped MoE stack under each balancing policy.

Model: `MoEStack` of L residual MoE layers (hidden 2048, expert hidden 768, 128 experts, top-8, bf16
params and matmuls), EP over D devices (mesh data=1, expert=D), S = E/D + 1 slots per device.

Routes (fixed by replay, so every policy does the same math): DeepSeek-V2-Lite ESFT routes (64 experts,
top-6, `../shared/traces`), sequences drawn with replacement from all four tasks and packed to `--tokens`
per device per micro-step (`traces.sample_micro_steps`); benchmark layer i replays trace layer
`--trace-layers[i]`, mapped 64 -> 128 experts and top-6 -> top-8 by a fixed rule that keeps each trace
expert's load (`common.map_routes_64_to_128`). `eplb_history` plans from a second, independently drawn
step. `ideal`: the same token count with routes that give every expert the same load from every source
(perfect balance, `common.ideal_routes`), a token's experts spread over devices as real routes do.
`ideal_round_robin`: each token's 8 experts consecutive, all on one device (measured slower than the
permuted routes on 4 x H200; kept to show it).

Policies: static, eplb_history, eplb_step, foremoe (planned ahead, host planning not timed; each refill
right before its micro-step, the executor's default), foremoe_prefetch (the same plan, each refill inside
the previous micro-step's program: what overlap is worth), and live (no foresight: before each micro-step the
host waits for the device, plans that
micro-step alone with eplb_microstep, builds its tables, moves home -> placement, computes and sends the
gradients home; all of it timed). Every policy runs as the library runs it: `prepare_step`'s tables and
each micro-step's padded capacity, its exact need per (source, destination) bucketed
(`pairs.micro_capacities`), so a balanced micro-step also ships a smaller all-to-all (live too: it plans
from that micro-step's routes). `--trace-dir` adds a profiler trace of one
step per policy, summarised per GPU kernel (`trace_summary.py`).

    python benchmarks/moe_step.py --make-data --ep 2 4          # CPU, needs ../shared/traces
    python benchmarks/moe_step.py --ep 4 --out benchmarks/results/moe_step.json   # on the GPUs
    XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_cpu_enable_concurrency_optimized_scheduler=false" \
      JAX_PLATFORMS=cpu python benchmarks/moe_step.py --smoke
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from common import (E, F, H, K, MICRO_STEPS, PLAN_RATES, SEED, TRACE_LAYERS, counts_of, ideal_routes,  # noqa: E402
                    map_routes_64_to_128, plan_cost, route_file, save, stack_setup)
from foremoe_jax.planner import PlanConfig, plan_step, traces  # noqa: E402

SMOKE = dict(hidden=64, expert_hidden=64, tokens=64, micro_steps=2, layers=2, warmup=1, repeats=1)
POLICIES = ("static", "ideal", "foremoe", "eplb_step", "live", "foremoe_prefetch", "eplb_history",
            "ideal_round_robin")  # most needed first
IDEALS = ("ideal", "ideal_round_robin")


def data_path(args, num_devices):
  return route_file(args.data, num_devices, args.tokens, args.micro_steps, args.trace_layers, args.seed)


def make_data(args):
  """Host: trace routes -> compact npz per EP size (routes of the timed step, counts of the history step)."""
  root = pathlib.Path(args.traces)
  pools = {task: traces.load_esft_task(root, task) for task in traces.ESFT_TASKS}
  sequences = [seq[:, [l - 1 for l in args.trace_layers]] for task in traces.ESFT_TASKS for seq in pools[task]]
  for num_devices in args.ep:
    rng = np.random.default_rng(args.seed)
    steps = []
    for _ in range(2):  # history step, timed step
      routes = [traces.sample_micro_steps(sequences, 1, num_devices, args.tokens, rng)[0]
                for _ in range(args.micro_steps)]
      steps.append(np.stack([map_routes_64_to_128(r) for r in routes]))  # [M, D*T, L, 8]
    path = data_path(args, num_devices)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, routes=steps[1], history_counts=counts_of(steps[0], num_devices))
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")


def median_ms(samples):
  return float(np.median(samples) * 1e3)


def run(args, num_devices: int) -> dict:
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from foremoe_jax.executor import Executor
  from foremoe_jax.step_tables import prepare_step, table_rows
  from foremoe_jax.step_tables import gradient_rows
  from foremoe_jax.moe_stack import MoEStack
  from foremoe_jax.transfer import home_to_base_moves, local_copies_needed, moves_needed

  data = np.load(data_path(args, num_devices))
  routes, history = data["routes"], data["history_counts"]
  num_micro, num_tokens, num_layers, _ = routes.shape
  tokens = num_tokens // num_devices
  slots = E // num_devices + 1
  mesh, cfg, loss_fn = stack_setup(args, num_devices)
  executors = {}  # exchange -> (executor, [params, opt_state]): made when first needed, each its own state
  shard = NamedSharding(mesh, P(("data", "expert")))
  keys = jax.random.split(jax.random.key(1), 2 * num_micro)

  def batches_for(routes_MxNxLxK):
    out = []
    for m in range(num_micro):  # one row of `tokens` tokens per device
      x = jax.random.normal(keys[2 * m], (num_devices, tokens, args.hidden), jnp.bfloat16)
      t = jax.random.normal(keys[2 * m + 1], (num_devices, tokens, args.hidden), jnp.bfloat16)
      r = routes_MxNxLxK[m].reshape(num_devices, tokens, num_layers, K).astype(np.int32)
      out.append({"x": jax.device_put(x, shard), "target": jax.device_put(t, shard),
                  "replay": jax.device_put(r, shard)})
    return out

  counts = counts_of(routes, num_devices)
  ideal_sets = {name: ideal_routes(num_micro, num_tokens, num_layers, permute=name == "ideal") for name in IDEALS}
  ideal_counts = {name: counts_of(r, num_devices) for name, r in ideal_sets.items()}
  cost = plan_cost(*args.plan_rates, hidden=args.hidden, expert_hidden=args.expert_hidden)
  pcfg = lambda policy: PlanConfig(E, num_devices, slots, policy=policy, cost=cost)  # noqa: E731

  # Plans (host). Planning ahead is off the critical path; its time is reported, not added.
  plans, plan_ms = {}, {}
  for policy in ("static", "eplb_history", "eplb_step", "foremoe"):
    start = time.perf_counter()
    plans[policy] = plan_step(counts, pcfg(policy), history=history)
    plan_ms[policy] = (time.perf_counter() - start) * 1e3
  for name in IDEALS:
    plans[name] = plan_step(ideal_counts[name], pcfg("static"))
  live_plans = [plan_step(counts[m:m + 1], pcfg("eplb_microstep")) for m in range(num_micro)]
  step_counts = {p: ideal_counts.get(p, counts) for p in plans}

  # Live sizes each micro-step's exchange to its need, as the others do (it plans from that micro-step's
  # routes); its move tables get one size over all micro-steps, so new plans never recompile.
  live_loose = [prepare_step(p, counts[m:m + 1], E) for m, p in enumerate(live_plans)]
  live_capacity_M = [s.capacity for s in live_loose]
  live_base_moves = [home_to_base_moves(p.base[l], E) for p in live_plans for l in range(num_layers)]
  live_caps = dict(fill_capacity=max(s.fill_moves_M[0].send_DxRxK.shape[-1] for s in live_loose),
                   held_capacity=max(s.held_rows for s in live_loose),
                   base_capacity=table_rows(moves_needed, live_base_moves, num_devices),
                   base_local_capacity=table_rows(local_copies_needed, live_base_moves, num_devices))

  def remote_base_moves(plan):
    return sum(1 for l in range(num_layers) for s, _, d, _ in home_to_base_moves(plan.base[l], E) if s != d)

  batches = batches_for(routes)
  ideal_batches = {name: batches_for(r) for name, r in ideal_sets.items()}
  update = jax.jit(lambda p, o, g: (lambda u, o2: (optax.apply_updates(p, u), o2))(*ex.tx.update(g, o, p)),
                   donate_argnums=(0, 1))

  def live_step():
    """No foresight: wait for the device, plan this micro-step, move, compute, send gradients home."""
    total, ms = None, 0.0
    for m, batch in enumerate(batches):
      if total is not None:
        jax.block_until_ready(total)
      start = time.perf_counter()
      plan = plan_step(counts[m:m + 1], pcfg("eplb_microstep"))
      ms += (time.perf_counter() - start) * 1e3
      grads = ex.gradients(state[0], [batch], prepare_step(plan, counts[m:m + 1], E, mesh=mesh, **live_caps))
      total = grads if total is None else jax.tree.map(jnp.add, total, grads)
    state[:] = update(*state, total)
    jax.block_until_ready(state[0])
    return ms

  def train(step, batches_, prefetch, **kw):
    """One optimizer step from the current executor's state, which it replaces; returns its metrics."""
    state[0], state[1], out = ex.train_step(*state, batches_, step, prefetch=prefetch, **kw)
    return out

  def profile(step, batches_, prefetch):
    """Stage times of one step with a sync after each stage (ms): begin, micro-steps, finish."""
    t = [time.perf_counter()]

    def stage_done(name, value):
      jax.block_until_ready(value)
      t.append(time.perf_counter())
    train(step, batches_, prefetch, stage_done=stage_done)
    d = np.diff(t) * 1e3
    return {"begin_ms": float(d[0]), "micro_ms": [float(x) for x in d[1:-1]], "finish_ms": float(d[-1])}

  def traced(name, step, batches_, prefetch):
    """One step under the profiler -> per-kernel GPU time summary (never fails the benchmark)."""
    try:
      import trace_summary
      directory = pathlib.Path(args.trace_dir) / f"D{num_devices}_{name}"
      with jax.profiler.trace(str(directory), create_perfetto_trace=True):
        train(step, batches_, prefetch)
        jax.block_until_ready(state[0])
      summary = trace_summary.summarize(directory)
    except Exception as err:  # the timing rows matter more than the trace
      return {"error": repr(err)[:300]}
    print(f"D={num_devices} {name} trace:\n{trace_summary.format_summary(summary)}", flush=True)
    return summary

  jobs = {p: (prepare_step(plans[p], step_counts[p], E, mesh=mesh), ideal_batches.get(p, batches), False)
          for p in plans}
  jobs["foremoe_prefetch"] = (jobs["foremoe"][0], batches, True)
  order = [p for p in args.policies if p in jobs or p == "live"]
  # Rows: every policy under the first exchange, then --exchange-policies under each other one
  # ("policy@exchange"), so one call compares exchanges against baselines measured beside them.
  runs = [(name, args.exchange[0]) for name in order] + [
      (name, x) for x in args.exchange[1:] for name in order if name in args.exchange_policies]

  result = dict(D=num_devices, S=slots, E=E, k=K, hidden=args.hidden, expert_hidden=args.expert_hidden,
                layers=num_layers, micro_steps=num_micro, tokens_per_device=tokens, trace_layers=args.trace_layers,
                live_capacity_M=live_capacity_M, exchange=args.exchange[0],
                gmm_backend=args.gmm_backend or "default", dispatch_backend=args.dispatch_backend or "default",
                plan_rates=dict(zip(("tflops", "link_gbs", "a2a_gbs"), args.plan_rates)),
                warmup=args.warmup, repeats=args.repeats, policies={})
  deadline = time.time() + args.deadline_s
  for name, exchange in runs:
    key = name if exchange == args.exchange[0] else f"{name}@{exchange}"
    if time.time() > deadline:
      print(f"deadline reached: skipping {key}", flush=True)
      continue
    if exchange not in executors:
      model = MoEStack(cfg, num_layers, mesh=mesh, rngs=nnx.Rngs(0))
      executor = Executor(model, optax.sgd(1e-4), loss_fn, mesh, exchange=exchange)
      executors[exchange] = executor, list(executor.init(model))
    ex, state = executors[exchange]
    t0 = time.perf_counter()
    if name == "live":
      for _ in range(args.warmup):
        live_step()
      samples, live_plan_ms = [], []
      for _ in range(args.repeats):
        start = time.perf_counter()
        live_plan_ms.append(live_step())
        samples.append(time.perf_counter() - start)
      lp = live_plans
      row = dict(imbalance=float(np.sum([p.device_load(counts[m:m + 1]).max(-1).sum() for m, p in enumerate(lp)])
                                 / np.sum([p.device_load(counts[m:m + 1]).mean(-1).sum() for m, p in enumerate(lp)])),
                 planner_ms=float(np.median(live_plan_ms)), planner_on_critical_path=True,
                 max_load_sum=float(sum(p.device_load(counts[m:m + 1]).max(-1).sum() for m, p in enumerate(lp))),
                 base_moves_remote=int(sum(remote_base_moves(p) for p in lp)), capacity=max(live_capacity_M),
                 capacity_mean=float(np.mean(live_capacity_M)))
    else:
      step, batches_, prefetch = jobs[name]
      for _ in range(args.warmup):
        out = train(step, batches_, prefetch)
      samples = []
      for _ in range(args.repeats):
        start = time.perf_counter()
        out = train(step, batches_, prefetch)
        samples.append(time.perf_counter() - start)
      policy = "foremoe" if name == "foremoe_prefetch" else name
      plan, c = plans[policy], step_counts[policy]
      load = plan.device_load(c)
      row = dict(imbalance=plan.imbalance(c), planner_ms=plan_ms.get(policy, 0.0), planner_on_critical_path=False,
                 max_load_sum=float(load.max(-1).sum()), moved_slots=int(step.moved_slots),
                 refilled_slots=int(step.refilled_slots), base_moves_remote=remote_base_moves(plan),
                 grad_rows=gradient_rows(plan, E),
                 capacity=step.capacity, capacity_mean=float(np.mean(step.capacity_M)), prefetch=prefetch,
                 dropped=int(np.sum(out["metrics"]["dropped"])), loss=out["loss"],
                 profile=profile(step, batches_, prefetch))
      if args.trace_dir and key in args.trace_policies:
        row["trace"] = traced(key, step, batches_, prefetch)
    row.update(step_ms=median_ms(samples), samples_ms=[s * 1e3 for s in samples], exchange=exchange,
               wall_incl_compile_s=time.perf_counter() - t0)
    result["policies"][key] = row
    print(f"D={num_devices} {key:18s} step {row['step_ms']:8.2f} ms  imbalance {row['imbalance']:.4f}  "
          f"(incl. warm-up/compile {row['wall_incl_compile_s']:.1f} s)", flush=True)
    save(args, result)
  return result


def summary_rows(result: dict) -> list[dict]:
  pol = result["policies"]
  ms = {k: v["step_ms"] for k, v in pol.items()}
  st, eq, idl = ms.get("static"), ms.get("eplb_step"), ms.get("ideal")
  rows = []
  for name, t in ms.items():
    rows.append(dict(policy=name, step_ms=t, imbalance=pol[name]["imbalance"],
                     vs_static=st / t if st else np.nan, vs_eplb_step=eq / t if eq else np.nan,
                     to_ideal_pct=100 * (t / idl - 1) if idl else np.nan,
                     excess_removed_pct=100 * (st - t) / (st - idl) if st and idl and st != idl else np.nan,
                     planner_ms=pol[name]["planner_ms"], grad_rows=pol[name].get("grad_rows"),
                     capacity=pol[name].get("capacity_mean", pol[name].get("capacity", 0))))
  return rows


def grad_rows_cell(rows: dict | None) -> str:
  """Expert-gradient rows sent to the base per step, each off-base slot after every micro-step (the
  schedule before deferred gradients) against once per tenure (now); in parentheses the remote ones."""
  if rows is None:  # live: every micro-step is its own step
    return ""
  return (f"{rows['per_micro_step']} -> {rows['per_tenure']} "
          f"({rows['per_micro_step_remote']} -> {rows['per_tenure_remote']})")


def table(result: dict) -> str:
  head = (f"D={result['D']} S={result['S']} L={result['layers']} M={result['micro_steps']} "
          f"tok/dev={result['tokens_per_device']}\n")
  lines = ["| policy | step ms | imbalance | mean capacity | x static | x eplb_step | vs ideal % | "
           "static excess removed % | planner ms | grad rows / step: per micro-step -> per tenure (remote) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in summary_rows(result):
    lines.append(f"| {r['policy']} | {r['step_ms']:.2f} | {r['imbalance']:.4f} | {r['capacity']:.0f} | "
                 f"{r['vs_static']:.3f} | {r['vs_eplb_step']:.3f} | {r['to_ideal_pct']:+.2f} | "
                 f"{r['excess_removed_pct']:.1f} | "
                 f"{r['planner_ms']:.2f} | {grad_rows_cell(r['grad_rows'])} |")
  return head + "\n".join(lines)


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--ep", type=int, nargs="+", default=[2, 4])
  ap.add_argument("--tokens", type=int, default=4096, help="tokens per device per micro-step")
  ap.add_argument("--micro-steps", type=int, default=MICRO_STEPS)
  ap.add_argument("--trace-layers", type=int, nargs="+", default=list(TRACE_LAYERS), help="ESFT layers 1..26")
  ap.add_argument("--layers", type=int, default=None, help="(smoke) take the first N of --trace-layers")
  ap.add_argument("--hidden", type=int, default=H)
  ap.add_argument("--expert-hidden", type=int, default=F)
  ap.add_argument("--policies", nargs="+", default=list(POLICIES))
  ap.add_argument("--warmup", type=int, default=1)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--gmm-backend", default=None, help="pallas_kernels backend (default: by platform)")
  ap.add_argument("--plan-rates", type=float, nargs=3, default=list(PLAN_RATES),
                  metavar=("TFLOPS", "LINK_GBS", "A2A_GBS"),
                  help="planner cost model: grouped GEMM TFLOP/s, GB/s per expert move (weights in, gradients "
                       "back), all_to_all GB/s. Default: measured on 4 x H200 (BENCHMARKS.md)")
  ap.add_argument("--dispatch-backend", default=None,
                  help="pallas_kernels backend of permute/combine (default: by platform)")
  ap.add_argument("--seed", type=int, default=SEED)
  ap.add_argument("--data", default=".bench_data")
  ap.add_argument("--traces", default=str(traces.traces_root()))
  ap.add_argument("--make-data", action="store_true", help="write the route npz files from the traces and exit")
  ap.add_argument("--out", default=None, help="JSON to merge results into")
  ap.add_argument("--exchange", nargs="+", default=["all_to_all"],
                  help="how moved expert rows travel (transfer.EXCHANGES); the first runs every policy")
  ap.add_argument("--exchange-policies", nargs="+", default=["eplb_step", "foremoe"],
                  help="policies re-run under each further --exchange")
  ap.add_argument("--trace-dir", default=None, help="profile one step per --trace-policies policy here")
  ap.add_argument("--trace-policies", nargs="+", default=["static", "foremoe"])
  ap.add_argument("--deadline-s", type=float, default=1e9, help="skip policies not started by then")
  ap.add_argument("--smoke", action="store_true", help="tiny shapes on 8 CPU devices (makes its own data)")
  args = ap.parse_args()
  if args.smoke:
    for key, value in SMOKE.items():
      setattr(args, key, value if key != "layers" else (args.layers or value))
  if args.layers:
    args.trace_layers = args.trace_layers[:args.layers]
  if args.make_data or (args.smoke and not all(data_path(args, d).exists() for d in args.ep)):
    make_data(args)
    if args.make_data:
      return
  if args.smoke:  # 8 virtual CPU devices on few cores: overlapping collective programs can starve threads
    import jax
    jax.config.update("jax_cpu_enable_async_dispatch", False)
  results = [run(args, d) for d in args.ep]
  for result in results:
    print(table(result))


if __name__ == "__main__":
  main()
