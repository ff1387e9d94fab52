"""Memory per device of the RL update, per EP size: an analytic table checked against XLA's memory analysis.

For a preset (plus `--set` overrides, as train.py's) and each EP size D, per device:
- analytic: weights (replicated dense parts + experts / D), Adam moments (`rl.adam_dtype`), float32 gradient
  accumulators (dense + base slots + the held replica gradients, H rows per device and layer with H the
  synthetic plan's `StepTables.held_rows`; every parameter at EP 1, where the step is plain), base + working slot
  copies, the micro-batch (`rl.rows_per_shard` rows of `--seq-len` tokens), the plan tables, and an
  activation estimate of one micro-step under the preset's remat (`activations`);
- compiled: the executor's programs for that step, lowered for abstract inputs (`nnx.eval_shape` model,
  ShapeDtypeStructs with shardings on a mesh of D devices: no weight is allocated) and compiled, with
  `compiled.memory_analysis()` (argument, output, alias, temp, code bytes; per device) and each state
  part's argument bytes read from the compiled program's input shardings (arguments XLA prunes as unused
  count 0 there, but stay resident). Programs: "first" (builds the base and the working slots), "micro"
  (a middle micro-step), "last" (the last micro-step and the optimizer update), "forward" (recompute).
A program's peak = the state alive during it (parameters, Adam, batch, tables, and slots and accumulators
but in "first") + its non-aliased outputs + its temp. On CPU the temp sizes are the CPU backend's
(other fusion and scheduling than a GPU's); the argument bytes are backend-independent.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu python benchmarks/memory.py \\
      --preset qwen3_30b_a3b_L8 --ep 1 2 4 8 --set model.scan_layers=true --set model.remat=block \\
      --out benchmarks/results/memory_cpu.json
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from common import abstract_model, expert_mesh, memory_stats, shard_bytes, with_shardings  # noqa: E402

PROGRAMS = ("first", "micro", "last", "forward")
PARTS = ("weights", "adam", "acc", "slots", "batch", "tables")
# Positional arguments of each executor program (StepPrograms._micro_fn, _last_fn, _forward_fn), by state part.
ARG_PARTS = {"micro": ("weights", "slots", "slots", "acc", "batch") + ("tables",) * 7,
             "last": ("weights", "adam", "slots", "slots", "acc", "batch") + ("tables",) * 7,
             "forward": ("weights", "slots", "slots", "batch") + ("tables",) * 4}
ARG_PARTS["first"] = ARG_PARTS["micro"]


def ep_config(preset: str, ep: int, overrides: list[str]):
  """The preset at EP `ep` (one redundant slot per device when ep > 1, as the qwen3 presets), then `--set`."""
  from configs import apply_overrides, get_config
  cfg = get_config(preset)
  slots = cfg.model.moe.num_experts // ep + (ep > 1)
  moe = dataclasses.replace(cfg.model.moe, slots_per_device=slots)
  cfg = dataclasses.replace(cfg, mesh_data=1, mesh_expert=ep, model=dataclasses.replace(cfg.model, moe=moe))
  cfg = apply_overrides(cfg, overrides)
  cfg.model.validate(ep)
  return cfg


# --- analytic ------------------------------------------------------------------------------------------
def param_counts(m) -> dict[str, int]:
  """dense (replicated: embedding, LM head, attention, norms, routers, dense FFNs) and expert parameters."""
  h, n, kv, d = m.d_model, m.num_heads, m.num_kv_heads, m.head_dim
  qk = 0 if not m.qk_norm else (2 * d if m.qk_norm_scope == "head" else (n + kv) * d)
  block = 2 * h + h * (n + 2 * kv) * d + n * d * h + qk
  num_moe = len(m.moe_layer_ids)
  dense = 2 * m.vocab_size * h + h + m.num_layers * block + num_moe * h * m.moe.num_experts
  dense += (m.num_layers - num_moe) * 3 * h * m.d_ff_dense
  return {"dense": dense, "expert": num_moe * m.moe.num_experts * 3 * h * m.moe.d_ff_expert,
          "one_expert": 3 * h * m.moe.d_ff_expert, "moe_layers": num_moe}


def analytic(cfg, ep: int, rows: int, seq_len: int, capacity: int, tables_bytes: int, held_rows: int) -> dict:
  """Bytes per device of every state part, the activation estimate's components and the peak; `held_rows`:
  H, the held replica gradients' rows per device and layer (`StepTables.held_rows`)."""
  m, rl = cfg.model, cfg.rl
  pc = param_counts(m)
  pb, ab = np.dtype(m.param_dtype).itemsize, np.dtype(rl.adam_dtype).itemsize
  plain = ep == 1  # S = E: the base is home and never left, nothing moves (executor.PLAIN)
  local = pc["dense"] + pc["expert"] // ep
  slot_params = pc["moe_layers"] * m.moe.slots_per_device * pc["one_expert"]
  n = rows * seq_len
  batch = n * (4 + 4 + 4 + 4 * pc["moe_layers"] * m.moe.top_k) + 4 * rows + 4  # tokens, mask, logp_old, replay; adv
  held = 0 if plain else 4 * pc["moe_layers"] * held_rows * pc["one_expert"]  # H float32 rows per layer
  parts = {"weights": pb * local,
           "adam": 2 * ab * local + 4,  # m and v, and optax's int32 step count
           # float32: dense + base slots, and the held replica gradients (a step that fills)
           "acc": 4 * (local if plain else pc["dense"] + slot_params) + held,
           "slots": 0 if plain else 2 * pb * slot_params,  # the base and the working slots
           "batch": batch, "tables": tables_bytes}
  if rl.kl_coef > 0:
    parts["reference"] = pb * local  # the frozen KL reference's weights
  act = activations(m, rows, seq_len, ep, capacity, pb * (local if plain else pc["dense"] + slot_params))
  state = sum(parts.values())
  peaks = {"train": state + act["train"], "forward": state + act["forward"]}
  return {"params_per_device": local, "slot_params": slot_params, "parts": parts, "held": held, "activations": act,
          "peak": max(peaks.values()), "peaks": peaks}


def activations(m, rows: int, seq_len: int, ep: int, capacity: int, grad_bytes: int) -> dict:
  """Estimated live temporaries of one micro-step (per device), by their largest arrays:
  attention's scores (float32, probs in the activation dtype, a float32 gradient in the backward) are
  [rows, heads, T, T] on the dense path, [rows, heads, c, c] on the blockwise one (c = attention_block,
  plus float32 dK / dV accumulators) and cuDNN's own on the cudnn one (counted 0); the MoE exchange holds
  D x capacity rows of H (sent, received, out, back) and the grouped matmul's 3F; the LM head
  (`chunked_token_logprobs`) float32 logits, softmax and gradient of one [rows, logprob_chunk, V] chunk and
  the head's float32 gradient [H, V]; remat="block" keeps each layer's input, remat="none" each layer's
  attention probabilities (dense) or logsumexp (blockwise) and MoE rows.
  train = kept residuals + the parameter-dtype gradients before accumulation + max(one block, the head)."""
  from foremoe_jax.attention import attention_path
  a, n, h = np.dtype(m.dtype).itemsize, rows * seq_len, m.d_model
  path = attention_path(m.attention, seq_len, cached=False)
  c = {"dense": seq_len, "blockwise": min(m.attention_block, seq_len), "cudnn": 0}[path]
  scores = rows * m.num_heads * c * c
  flash_acc = 2 * n * m.num_kv_heads * m.head_dim * 4 if path == "blockwise" else 0
  exchanged = ep * capacity
  attention = scores * (4 + a + 4) + 6 * n * h * a + flash_acc
  moe = 2 * exchanged * (4 * h + 3 * m.moe.d_ff_expert) * a + n * m.moe.num_experts * 4
  chunk = rows * min(m.logprob_chunk, seq_len) * m.vocab_size
  head = chunk * (4 + 4 + 4 + a) + 4 * h * m.vocab_size
  routes = m.num_layers * n * m.moe.top_k * 4
  kept_attention = scores * a if path == "dense" else n * m.num_heads * 4
  kept_block = kept_attention + exchanged * (2 * h + 3 * m.moe.d_ff_expert) * a + 6 * n * h * a
  per_layer = n * h * a if m.remat == "block" else kept_block
  saved = m.num_layers * per_layer + routes
  block = max(attention, moe)
  forward = max(scores * (4 + a) + 6 * n * h * a, moe // 2, chunk * 8)
  return {"saved": saved, "grads": grad_bytes, "block": block, "head": head,
          "train": saved + grad_bytes + max(block, head), "forward": forward}


# --- compiled ------------------------------------------------------------------------------------------
def abstract_executor(m, mesh, tx, loss_fn):
  """An Executor of the full model built on its abstract form (`nnx.eval_shape`: no weight allocated); its
  `abstract_state` is what the programs lower for. `nnx.eval_shape` drops shardings, so the parameters
  take those of the same model at tiny widths (same layers, experts, slots, tree structure and shardings)."""
  import jax
  from flax import nnx

  from foremoe_jax.executor import Executor
  from foremoe_jax.model import Model
  tiny_cfg = dataclasses.replace(m, vocab_size=8, d_model=8, num_heads=m.num_heads // m.num_kv_heads,
                                 num_kv_heads=1, head_dim=2, d_ff_dense=4,
                                 moe=dataclasses.replace(m.moe, d_ff_expert=2))
  tiny = nnx.state(Model(tiny_cfg, mesh=mesh, rngs=nnx.Rngs(0)), nnx.Param)
  graphdef, params, rest = nnx.split(abstract_model(m, mesh), nnx.Param, ...)
  if jax.tree.leaves(rest):
    raise ValueError("the model has non-parameter state; abstract_executor does not handle it")
  return Executor(nnx.merge(graphdef, with_shardings(params, tiny), rest), tx, loss_fn, mesh)


def step_tables(cfg, mesh, ep: int, rows: int, seq_len: int, micro_steps: int, skew: float, seed: int = 0):
  """StepTables of one step of skewed routed counts (expert popularity log-normal with sigma `skew`, drawn
  per micro-step and layer): the "static" plan at
  EP 1 (the plain step), "foremoe" beyond, whose base leaves home and whose micro-steps leave the base
  (base and working slots both in memory: the larger layout). Capacities as the executor sizes them
  (each micro-step's need, bucketed)."""
  from foremoe_jax.executor import Executor
  from foremoe_jax.step_programs import PLAIN
  from foremoe_jax.step_tables import prepare_step
  from foremoe_jax.planner import CostModel, PlanConfig, plan_step
  m = cfg.model
  e, num_moe = m.moe.num_experts, len(m.moe_layer_ids)
  rng = np.random.default_rng(seed)
  popularity = rng.lognormal(0.0, skew, (micro_steps, num_moe, 1, e))
  popularity = np.broadcast_to(popularity / popularity.sum(-1, keepdims=True), (micro_steps, num_moe, ep, e))
  counts = rng.multinomial(rows * seq_len * m.moe.top_k, popularity.reshape(-1, e)).reshape(popularity.shape)
  # A slow matmul makes every move pay, whatever the shapes: the plan leaves home and the base.
  cost = CostModel(hidden=m.d_model, expert_intermediate=m.moe.d_ff_expert,
                   bytes_per_param=np.dtype(m.param_dtype).itemsize, matmul_flops_per_s=1e9)
  plan_cfg = PlanConfig(e, ep, m.moe.slots_per_device, policy="static" if ep == 1 else "foremoe", cost=cost,
                        capacity_buckets=cfg.rl.capacity_buckets)
  step = prepare_step(plan_step(counts, plan_cfg), counts, e, mesh=mesh)
  want = PLAIN if ep == 1 else (False, True)
  if Executor.layout(step) != want:
    raise RuntimeError(f"EP {ep}: the synthetic plan's layout is {Executor.layout(step)}, expected {want}; "
                       "a larger --skew makes moves pay")
  return step


def abstract_batch(m, mesh, rows: int, seq_len: int) -> dict:
  """One micro-batch of the GRPO update (trainer.grpo_objective's keys), ShapeDtypeStructs."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from foremoe_jax.mesh import batch_sharding, batch_shards
  b, shard = rows * batch_shards(mesh), batch_sharding(mesh)

  def sds(shape, dtype, sharding=shard):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  return {"tokens": sds((b, seq_len), jnp.int32), "mask": sds((b, seq_len), jnp.int32),
          "replay": sds((b, seq_len, len(m.moe_layer_ids), m.moe.top_k), jnp.int32),
          "adv": sds((b,), jnp.float32), "logp_old": sds((b, seq_len), jnp.float32),
          "num_tokens": sds((), jnp.float32, NamedSharding(mesh, P()))}


def lower_program(executor, step, batch, name: str):
  """(lowered, positional args, whether it reads `held`) of one executor program, as `Executor.precompile`
  lowers it. A micro-step that holds no slot and flushes nothing never reads `held`: XLA prunes it."""
  num = step.num_micro_steps
  m = {"first": 0, "micro": 1, "last": num - 1, "forward": 1}[name]
  tables, kw = executor._micro_args(step, m, None)
  base, working, acc = ((), (), ()) if kw["first"] else executor.programs.state(kw["layout"], step.held_rows)
  reads_held = not kw["first"] and (kw["filled"] or kw["flushed"])
  params, opt_state = executor.abstract_state
  if name == "forward":
    forward_tables, kw = executor.forward_args(tables, kw)
    args = (params, base, working, batch, *forward_tables)
    return executor.programs.forward.lower(*args, **kw), args, False
  last = name == "last"
  args = (params, *((opt_state,) if last else ()), base, working, acc, batch, *tables)
  return (executor.programs.last if last else executor.programs.micro).lower(*args, **kw), args, reads_held


def compiled_program(executor, step, batch, name: str, state_bytes: dict) -> dict:
  """Memory analysis of one program, its arguments' bytes by state part (0 where XLA pruned an unused
  argument) and its peak: the state alive during it + non-aliased outputs + temp."""
  import jax
  tic = time.perf_counter()
  lowered, args, reads_held = lower_program(executor, step, batch, name)
  compiled = lowered.compile()
  stats = memory_stats(compiled)
  used = dict.fromkeys(PARTS, 0)
  for arg, shardings, part in zip(args, compiled.input_shardings[0], ARG_PARTS[name], strict=True):
    leaves = jax.tree.leaves(arg)
    found = jax.tree.leaves(shardings, is_leaf=lambda x: x is None)
    kept = [(a, s) for a, s in zip(leaves, found, strict=True) if s is not None]
    used[part] += shard_bytes([a for a, _ in kept], [s for _, s in kept])
  alive = {k: v for k, v in state_bytes.items() if name != "first" or k not in ("acc", "slots")}
  peak = sum(alive.values()) + stats["output"] - stats["alias"] + stats["temp"]
  return {"memory": stats, "argument_parts": used, "reads_held": reads_held, "peak": peak,
          "seconds": time.perf_counter() - tic}


def measure(cfg, ep: int, rows: int, seq_len: int, programs, skew: float, micro_steps: int = 3) -> dict:
  """Analytic and compiled numbers of one EP size."""
  import jax

  from foremoe_jax.rl.optim import rl_optimizer
  from foremoe_jax.rl.trainer import grpo_objective
  mesh = expert_mesh(ep)
  step = step_tables(cfg, mesh, ep, rows, seq_len, micro_steps, skew)
  # micro-step 1's tables, as `Executor._micro_args` passes them (its refill's where it has one)
  tables = (step.tables_M[1], step.hold_tables_M[1], step.direct_moves_M[1], step.flush_moves_M[1],
            step.refill_moves_M[1], step.base_moves, step.refill_moves_M[0])
  result = {"ep": ep, "slots_per_device": cfg.model.moe.slots_per_device, "capacity": step.capacity_M[1],
            "held_rows": step.held_rows, "layout": "plain" if ep == 1 else "base + working slots",
            "analytic": analytic(cfg, ep, rows, seq_len, step.capacity_M[1], shard_bytes(tables), step.held_rows),
            "programs": {}}
  if not programs:
    return result
  loss = functools.partial(grpo_objective, clip_eps=cfg.rl.clip_eps, kl_coef=0.0)
  executor = abstract_executor(cfg.model, mesh, rl_optimizer(cfg.rl.lr, cfg.rl.adam_dtype), loss)
  batch = abstract_batch(cfg.model, mesh, rows, seq_len)
  base, working, acc = executor.programs.state(executor.layout(step), step.held_rows)
  params, opt_state = executor.abstract_state
  state_bytes = {"weights": shard_bytes(params), "adam": shard_bytes(opt_state),
                 "acc": shard_bytes(acc), "slots": shard_bytes((base, working)), "batch": shard_bytes(batch),
                 "tables": shard_bytes(tables)}
  result["state_bytes"] = state_bytes
  for name in programs:
    result["programs"][name] = compiled_program(executor, step, batch, name, state_bytes)
    print(f"  EP {ep} {name}: {result['programs'][name]['seconds']:.1f} s", flush=True)
  jax.clear_caches()
  return result


def checks(result: dict) -> list[dict]:
  """Analytic vs compiled, per part: each state part against the largest argument bytes any program
  reads of it, activations against the train ("micro") and "forward" temps, the peak against the
  programs' largest."""
  an, progs = result["analytic"], result["programs"]
  rows = []

  def add(part, analytic_bytes, compiled_bytes, where):
    rel = (compiled_bytes - analytic_bytes) / analytic_bytes if analytic_bytes else float(compiled_bytes != 0)
    rows.append({"part": part, "analytic": analytic_bytes, "compiled": compiled_bytes, "rel_diff": rel,
                 "where": where})
  def read(name, part):  # a program that reads no held row gets `held` pruned: it stays resident
    return progs[name]["argument_parts"][part] + (part == "acc" and not progs[name]["reads_held"]) * an["held"]
  for part in PARTS:
    if progs:
      name = max(progs, key=lambda p: read(p, part))
      add(part, an["parts"][part], read(name, part), f"{name} argument")
  for name, key in (("micro", "train"), ("forward", "forward")):
    if name in progs:
      add(f"activations ({key})", an["activations"][key], progs[name]["memory"]["temp"], f"{name} temp")
  if progs:
    name = max(progs, key=lambda p: progs[p]["peak"])
    add("peak", an["peak"], progs[name]["peak"], f"{name} peak")
  return rows


UNITS = {"GiB": 2 ** 30, "MiB": 2 ** 20}


def print_tables(out: dict, unit: str = "GiB") -> None:
  def gib(x: float) -> str:
    return f"{x / UNITS[unit]:.2f}"
  adam = out["shapes"]["adam_dtype"]
  print(f"\n{out['preset']} {' '.join('--set ' + s for s in out['overrides'])}: {out['shapes']['rows']} rows x "
        f"{out['shapes']['seq_len']} tokens per device, remat {out['shapes']['remat']}, scan_layers "
        f"{out['shapes']['scan_layers']}; {unit} per device; HBM {out['hbm_gb']} GB")
  print(f"| EP | slots / device | held rows (H) | params / device | weights | Adam ({adam}) | grad acc. f32 | "
        "base + working slots | batch | tables | state | activations (est.) | total | fits |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
  for r in out["results"]:
    a = r["analytic"]
    p = a["parts"]
    fits = "yes" if a["peak"] <= out["hbm_gb"] * 1e9 else "no"
    print(f"| {r['ep']} | {r['slots_per_device']} | {r.get('held_rows', '-')} | {a['params_per_device'] / 1e9:.3f}B | "
          f"{gib(p['weights'])} | "
          f"{gib(p['adam'])} | {gib(p['acc'])} | {gib(p['slots'])} | {gib(p['batch'])} | {gib(p['tables'])} | "
          f"{gib(sum(p.values()))} | "
          f"{gib(max(a['activations']['train'], a['activations']['forward']))} | **{gib(a['peak'])}** | {fits} |")
  if not any(r["programs"] for r in out["results"]):
    return
  print(f"\nanalytic vs compiled ({out['backend']}, jax {out['jax']}; temp sizes are this backend's)")
  print(f"| EP | part | analytic {unit} | compiled {unit} | rel. diff | compiled from |")
  print("|---|---|---|---|---|---|")
  for r in out["results"]:
    for c in r["checks"]:
      print(f"| {r['ep']} | {c['part']} | {gib(c['analytic'])} | {gib(c['compiled'])} | {100 * c['rel_diff']:+.2f}% | "
            f"{c['where']} |")
  print("\n| EP | program | argument | output | alias | temp | code | peak | lower + compile s |")
  print("|---|---|---|---|---|---|---|---|---|")
  for r in out["results"]:
    for name, p in r["programs"].items():
      s = p["memory"]
      print(f"| {r['ep']} | {name} | {gib(s['argument'])} | {gib(s['output'])} | {gib(s['alias'])} | "
            f"{gib(s['temp'])} | {s['generated_code'] / 2**20:.1f} MiB | {gib(p['peak'])} | {p['seconds']:.1f} |")


def run(args) -> dict:
  import flax
  import jax
  base = ep_config(args.preset, args.ep[0], args.set)
  m = base.model
  seq_len = args.seq_len or m.max_seq_len
  rows = args.rows or base.rl.rows_per_shard
  out = {"preset": args.preset, "overrides": args.set, "eps": args.ep, "hbm_gb": args.hbm_gb,
         "card": jax.devices()[0].device_kind, "backend": jax.default_backend(), "jax": jax.__version__,
         "flax": flax.__version__, "date": datetime.date.today().isoformat(),
         "command": "python " + " ".join(sys.argv), "programs": args.programs,
         "shapes": {"model": dataclasses.asdict(m), "rows": rows, "seq_len": seq_len, "remat": m.remat,
                    "scan_layers": m.scan_layers, "adam_dtype": base.rl.adam_dtype,
                    "skew": args.skew},
         "note": ("compiled numbers are per device; temp sizes are the " + jax.default_backend() + " backend's"),
         "results": []}
  for ep in args.ep:
    result = measure(ep_config(args.preset, ep, args.set), ep, rows, seq_len, args.programs, args.skew)
    result["checks"] = checks(result)
    out["results"].append(result)
    if args.out:
      pathlib.Path(args.out).write_text(json.dumps(out, indent=1))
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--preset", default="qwen3_30b_a3b_L8")
  ap.add_argument("--ep", type=int, nargs="+", default=[1, 2, 4, 8], help="EP sizes (devices on the mesh)")
  ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, as train.py's")
  ap.add_argument("--seq-len", type=int, default=None, help="tokens per row (default: model.max_seq_len)")
  ap.add_argument("--rows", type=int, default=None, help="rows per device per micro-step (default: rl.rows_per_shard)")
  ap.add_argument("--programs", nargs="*", default=list(PROGRAMS), choices=PROGRAMS,
                  help="executor programs to compile (none: the analytic table only)")
  ap.add_argument("--hbm-gb", type=float, default=80.0, help="the card's HBM in GB (H100 80, H200 141)")
  ap.add_argument("--skew", type=float, default=1.0,
                  help="sigma of the log-normal expert popularity of the synthetic routes (sets the capacities)")
  ap.add_argument("--unit", default="GiB", choices=tuple(UNITS))
  ap.add_argument("--out", default=None, help="JSON to write")
  args = ap.parse_args(argv)
  out = run(args)
  print_tables(out, args.unit)
  return out


if __name__ == "__main__":
  main()
