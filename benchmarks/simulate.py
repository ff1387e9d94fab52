"""Cost-model simulator: calibrated on the measured GPU runs, validated on them, projected to EP 8-64.

Model of one optimizer step (M micro-steps x L MoE layers), per policy:
  t = sum_(m,l) maxload(m,l) * t_pair  +  M*L * (other(D) + beta(D) * D * C)       GEMMs + dispatch
      + 2 * moved rows * t_expert_move                  home->base + per-micro-step fills, gradients back
      + (live only) M * planner ms on the critical path
t_pair = forward+backward FLOPs of one (token, expert) pair / the measured grouped-GEMM rate; C = the
policy's padded capacity (rows per source-destination pair; each micro-step has its own, C is their
mean), so D*C rows arrive at every device and the all-to-alls, sorts and gathers scale with it;
t_expert_move = the measured time to ppermute one 9.4 MB expert; moved rows = the rows the exchange ships
(measured runs: the remote base moves and filled slots; projection: the all_to_all exchange's K rows to
every peer, see shipped_rows).
Calibration (per measured EP size): other(D) and beta(D) solve two policies on the same real routes
with different capacities (static, eplb_step; eplb_step's base moves are charged by the transfer
term); the other policies are predictions: their error is the validation. (`ideal` is not used: its
synthetic routes change the cost of the combine's fused gathers, so it is not the same step at a
smaller capacity; measured on 4 x H200, BENCHMARKS.md.)
Projection (EP 8-64): other and beta = means of the fits; beyond one node (8 GPUs) the all-to-all part
of the capacity cost and the expert moves are slowed from the measured rates to --ib-gbs (assumptions,
not measurements); the planners get a CostModel with these rates. Counts from the traces (the 64 -> 128
rule of moe_step.py), Qwen3-30B-A3B's 48 MoE layers replayed from the 26 trace layers cyclically. A
second, bytes-exact variant replaces D*C by each (m, l)'s busiest receiver's rows and the padded
cross-device volume by the busiest sender's or receiver's own rows, and charges a transfer only for
the experts it moves (a ragged exchange at the padded one's bandwidth: an assumption); foremoe then
plans with CostModel(dispatch="ragged").

    python benchmarks/simulate.py   # reads benchmarks/results/{moe_step_sim_inputs,transfer}.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from foremoe_jax.planner import CostModel, PlanConfig, plan_step, traces  # noqa: E402
from foremoe_jax.planner.pairs import micro_capacities  # noqa: E402
from foremoe_jax.transfer import home_to_base_moves  # noqa: E402
from common import E, K, map_routes_64_to_128  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
CALIBRATE = ("static", "eplb_step")
SETTINGS = ("ep", "tokens", "micro_steps", "layers", "a2a_gbs", "ib_gbs")  # the projection's arguments in its report


def pair_s(hidden, expert_hidden, tflops):
  return 3 * 2 * 3 * hidden * expert_hidden / (tflops * 1e12)


def rates(transfer: dict, d: int) -> dict:
  run = transfer["runs"].get(f"D{d}") or next(iter(transfer["runs"].values()))
  return dict(tflops=run["compute"]["tflops"], move_ms=run["links"]["expert"]["ms"],
              link_gbs=run["links"]["big"]["gbytes_per_s"], a2a_gbs=run["links"]["all_to_all"]["gbytes_per_s"])


def a2a_ms(d, capacity, hidden, gbs):
  """Padded all_to_all: dispatch + combine, forward + backward, D*capacity rows of bf16 each."""
  return 4 * (d - 1) / d * d * capacity * hidden * 2 / (gbs * 1e9) * 1e3


def capacity(policy_row: dict) -> float:
  """A measured row's mean capacity over its micro-steps (runs before per-micro-step capacities had one)."""
  return policy_row.get("capacity_mean", policy_row["capacity"])


def calibrate(moe: dict, transfer: dict):
  """Per measured EP size: other, beta per (m, l); and the validation table."""
  fits, rows = {}, []
  for key, run in sorted(moe["runs"].items()):
    d, pol = run["D"], run["policies"]
    r = rates(transfer, d)
    tp = pair_s(run["hidden"], run["expert_hidden"], r["tflops"]) * 1e3  # ms
    ml = run["micro_steps"] * run["layers"]
    if key != f"D{d}" or not all(p in pol for p in CALIBRATE):
      continue  # one calibration per EP size: its main run
    def transfer_ms(p):  # rows over all devices, weights in and gradients back
      return 2 * (p.get("base_moves_remote", 0) + p.get("moved_slots", 0)) / d * r["move_ms"]

    # Two equations (static, eplb_step), two unknowns (other, beta):
    # t - GEMMs - transfers = M*L*(other + beta*D*C).
    a = np.array([[ml, ml * d * capacity(pol[p])] for p in CALIBRATE])
    other, beta = np.linalg.solve(a, [pol[p]["step_ms"] - pol[p]["max_load_sum"] * tp - transfer_ms(pol[p])
                                      for p in CALIBRATE])
    fits[d] = dict(other_ms=other, beta_ms_per_row=beta, tp_ms=tp, ml=ml, rates=r)
    for name, p in pol.items():
      pred = p["max_load_sum"] * tp + ml * (other + beta * d * capacity(p)) + transfer_ms(p)
      if name == "live":
        pred += p["planner_ms"]
      rows.append(dict(D=d, policy=name, measured_ms=p["step_ms"], predicted_ms=pred,
                       error_pct=100 * (pred / p["step_ms"] - 1),
                       role="calibration" if name in CALIBRATE else "validation"))
  return fits, rows


def trace_counts(pools, num_devices, tokens, micro_steps, layers, rng):
  """int64 [M, layers, D, 128] from trace sequences (all tasks), trace layer l % 26 for layer l."""
  sequences = [s for task in traces.ESFT_TASKS for s in pools[task]]
  trace_layer = np.arange(layers) % 26
  out = np.zeros((micro_steps, layers, num_devices, E), np.int64)
  for m in range(micro_steps):
    routes, _, device = traces.sample_micro_steps(sequences, 1, num_devices, tokens, rng)
    mapped = map_routes_64_to_128(routes)  # [N, 26, 8]
    for l, tl in enumerate(trace_layer):
      idx = device[:, None] * E + mapped[:, tl].astype(np.int64)
      out[m, l] = np.bincount(idx.ravel(), minlength=num_devices * E).reshape(num_devices, E)
  return out


def exchange_rows(plans, c_list, d):
  """From each plan's (source, destination) pair counts [M, L, D, D], summed over the plans: (the padded
  capacities: each micro-step's largest pair, bucketed, over its layers; the busiest receiver's rows;
  the largest rows one device sends or receives across devices), each summed over (m, l)."""
  padded, received, remote = 0, 0, 0
  eye = np.eye(d, dtype=bool)
  for p, c in zip(plans, c_list):
    sp = p.slot_pairs(c)
    pair = sp.reshape(*sp.shape[:3], d, -1).sum(-1)  # [M, L, src, dst]
    padded += int(micro_capacities(pair.max((2, 3))).sum()) * pair.shape[1]
    received += int(pair.sum(2).max(-1).sum())
    off = np.where(eye, 0, pair)
    remote += int(np.maximum(off.sum(3), off.sum(2)).max(-1).sum())
  return padded, received, remote


def project(args, fits):
  pools = {task: traces.load_esft_task(pathlib.Path(args.traces), task) for task in traces.ESFT_TASKS}
  other = float(np.mean([f["other_ms"] for f in fits.values()]))
  beta = float(np.mean([f["beta_ms_per_row"] for f in fits.values()]))
  r = next(iter(fits.values()))["rates"]
  tp = pair_s(2048, 768, r["tflops"]) * 1e3
  rows = []
  for d in args.ep:
    rng = np.random.default_rng(args.seed)
    history = trace_counts(pools, d, args.tokens, args.micro_steps, args.layers, rng)
    counts = trace_counts(pools, d, args.tokens, args.micro_steps, args.layers, rng)
    ideal = np.full_like(counts, args.tokens * K // E)
    slots = E // d + 1
    gbs = args.a2a_gbs if d <= 8 else args.ib_gbs
    move_ms = r["move_ms"] * (1 if d <= 8 else r["link_gbs"] / args.ib_gbs)
    # The planners price moves, compute and the all-to-all at the simulated machine's rates, and
    # foremoe plans the bytes-exact variant for a ragged exchange (no padded capacity).
    cost = CostModel(matmul_flops_per_s=r["tflops"] * 1e12, link_bytes_per_s=CostModel().expert_bytes / move_ms * 1e3,
                     a2a_bytes_per_s=gbs * 1e9)
    ragged = dataclasses.replace(cost, dispatch="ragged")

    def times(plans, c_list):
      """(imbalance, padded ms, bytes-exact ms, capacity, remote base moves, shipped rows) of a step."""
      max_load = sum(p.device_load(c).max(-1).sum() for p, c in zip(plans, c_list))
      mean_load = sum(p.device_load(c).mean(-1).sum() for p, c in zip(plans, c_list))
      padded, received, remote = exchange_rows(plans, c_list, d)
      shipped, exact, moves = shipped_rows(plans, d, args.layers)
      # Fills: the all_to_all exchange sends K = 1 row to every peer, in every layer of a micro-step
      # whose placement differs from the base somewhere (weights in; gradients back: the factor 2 below).
      shipped += int(np.sum(sum(p.moved_mask().any((1, 2, 3)) for p in plans))) * args.layers * (d - 1)
      exact += int((sum(p.moved_mask().sum(-1) for p in plans) > 0).any(-1).sum())
      ml = args.micro_steps * args.layers
      cap = padded / ml  # the mean capacity
      slower_a2a = a2a_ms(d, cap, 2048, gbs) - a2a_ms(d, cap, 2048, args.a2a_gbs)  # 0 inside a node
      t = max_load * tp + ml * (other + beta * d * cap + slower_a2a) + 2 * shipped * move_ms
      # Bytes-exact exchange: each (m, l) waits for its busiest receiver's rows and busiest cross-device
      # sender or receiver, and a transfer moves only its own rows.
      slower_exact = 4 * remote * 2048 * 2 * (1 / gbs - 1 / args.a2a_gbs) / 1e6
      t_exact = max_load * tp + ml * other + beta * received + slower_exact + 2 * exact * move_ms
      return max_load / mean_load, t, t_exact, cap, moves, shipped

    for policy in ("static", "eplb_history", "eplb_step", "foremoe", "live", "ideal"):
      start = time.perf_counter()
      if policy == "live":  # each micro-step planned alone, on the critical path
        plans = [plan_step(counts[m:m + 1], PlanConfig(E, d, slots, policy="eplb_microstep", cost=cost))
                 for m in range(args.micro_steps)]
      else:
        c = ideal if policy == "ideal" else counts
        plans = [plan_step(c, PlanConfig(E, d, slots, policy="static" if policy == "ideal" else policy, cost=cost),
                           history=history)]
      plan_ms = (time.perf_counter() - start) * 1e3
      c_list = [counts[m:m + 1] for m in range(args.micro_steps)] if policy == "live" else \
          [ideal if policy == "ideal" else counts]
      imbalance, t, t_exact, cap, moves, shipped = times(plans, c_list)
      exact_imbalance = imbalance
      if policy == "foremoe":
        exact_imbalance, _, t_exact, _, _, _ = times([plan_step(counts, PlanConfig(E, d, slots, cost=ragged))],
                                                     c_list)
      if policy == "live":
        t, t_exact = t + plan_ms, t_exact + plan_ms
      rows.append(dict(D=d, policy=policy, imbalance=imbalance, step_ms=t, exact_ms=t_exact,
                       exact_imbalance=exact_imbalance, capacity=cap, base_moves_remote=moves,
                       shipped_rows=shipped, planner_ms=plan_ms))
      print(f"projected D={d:<3d} {policy:13s} imbalance {imbalance:.4f} / {exact_imbalance:.4f}  step {t:9.1f} ms  "
            f"exact {t_exact:9.1f} ms  plan {plan_ms:8.1f} ms", flush=True)
  return rows


def shipped_rows(plans, d, layers):
  """(rows the all_to_all exchange ships per device: K rows to each of the D - 1 peers in every layer,
  K the most rows one device sends another; rows a bytes-exact transfer moves to the busiest device;
  remote moves), summed over the plans' layers."""
  shipped = exact = moves = 0
  for p in plans:
    per_layer = [[mv for mv in home_to_base_moves(p.base[l], E) if mv[0] != mv[2]] for l in range(layers)]
    pairs = np.zeros((layers, d, d), np.int64)
    for l, mvs in enumerate(per_layer):
      for s, _, t, _ in mvs:
        pairs[l, s, t] += 1
    shipped += int(pairs.max(initial=0)) * (d - 1) * layers
    exact += int(pairs.sum(1).max(-1).sum())
    moves += sum(len(m) for m in per_layer)
  return shipped, exact, moves


def speedups(rows, key="step_ms", prefix=""):
  """Adds {prefix}vs_static, vs_eplb_step and to_ideal_pct of each row's `key` time."""
  by = {(r["D"], r["policy"]): r[key] for r in rows}
  for r in rows:
    st, eq, idl = by.get((r["D"], "static")), by.get((r["D"], "eplb_step")), by.get((r["D"], "ideal"))
    r.update({f"{prefix}vs_static": st / r[key], f"{prefix}vs_eplb_step": eq / r[key] if eq else np.nan,
              f"{prefix}to_ideal_pct": 100 * (r[key] / idl - 1) if idl else np.nan})
  return rows


def plot(rows, measured, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  panels = ((axes[0], "vs_static", "speed-up over static"), (axes[1], "vs_eplb_step", "speed-up over eplb_step"))
  for ax, key, title in panels:
    styles = (("foremoe", "o-"), ("eplb_step", "s--"), ("eplb_history", "^--"), ("live", "x:"), ("ideal", "k-"))
    for policy, style in styles:
      for src, fill in ((measured, "measured"), (rows, "projected")):
        pts = sorted((r["D"], r[key]) for r in src if r["policy"] == policy)
        if pts:
          ax.plot(*zip(*pts), style, alpha=1.0 if fill == "projected" else 0.5,
                  mfc="none" if fill == "measured" else None, label=f"{policy} ({fill})")
      if policy in ("foremoe", "eplb_step", "ideal"):  # the bytes-exact projection, lighter
        pts = sorted((r["D"], r[f"exact_{key}"]) for r in rows if r["policy"] == policy)
        ax.plot(*zip(*pts), style, alpha=0.35, lw=3, label=f"{policy} (projected, bytes-exact)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("EP size (GPUs)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
  axes[1].legend(fontsize=6, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=80)


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--moe", default=str(RESULTS / "moe_step_sim_inputs.json"))
  ap.add_argument("--transfer", default=str(RESULTS / "transfer.json"))
  ap.add_argument("--traces", default=str(traces.traces_root()))
  ap.add_argument("--ep", type=int, nargs="+", default=[8, 16, 32, 64])
  ap.add_argument("--tokens", type=int, default=4096, help="tokens per device per micro-step")
  ap.add_argument("--micro-steps", type=int, default=8)
  ap.add_argument("--layers", type=int, default=48, help="Qwen3-30B-A3B has 48 MoE layers")
  ap.add_argument("--a2a-gbs", type=float, default=None, help="all_to_all GB/s inside a node (default: measured)")
  ap.add_argument("--ib-gbs", type=float, default=50.0, help="assumed per-GPU GB/s across nodes (400 Gb/s NIC)")
  ap.add_argument("--seed", type=int, default=1)
  ap.add_argument("--out", default=str(RESULTS / "simulate.json"))
  args = ap.parse_args()
  moe, transfer = json.loads(pathlib.Path(args.moe).read_text()), json.loads(pathlib.Path(args.transfer).read_text())
  fits, validation = calibrate(moe, transfer)
  args.a2a_gbs = args.a2a_gbs or float(np.mean([f["rates"]["a2a_gbs"] for f in fits.values()]))
  print(f"MEASURED (GPU runs) vs MODEL: calibration on {'+'.join(CALIBRATE)}, the rest are predictions")
  print("| D | policy | measured ms | predicted ms | error % | role |\n|---|---|---|---|---|---|")
  for r in validation:
    print(f"| {r['D']} | {r['policy']} | {r['measured_ms']:.1f} | {r['predicted_ms']:.1f} | "
          f"{r['error_pct']:+.1f} | {r['role']} |")
  errs = [abs(r["error_pct"]) for r in validation if r["role"] == "validation" and r["policy"] != "live"]
  print(f"validation (planned-ahead policies and ideals; live's programs are not modelled): mean |error| "
        f"{np.mean(errs):.1f}%, max {np.max(errs):.1f}% over {len(errs)} predictions")
  rows = speedups(speedups(project(args, fits)), "exact_ms", "exact_")
  measured = speedups([dict(D=r["D"], policy=r["policy"], step_ms=r["measured_ms"]) for r in validation
                       if not r["policy"].endswith("_shipped")])
  print(f"\nPROJECTED (cost model, not measured): Qwen3-30B-A3B MoE layers x{args.layers}, M={args.micro_steps}, "
        f"{args.tokens} tok/GPU/micro-step, a2a {args.a2a_gbs:.0f} GB/s (<=8 GPUs), {args.ib_gbs:.0f} GB/s beyond")
  print(projection_table(rows))
  doc = dict(note="validation rows: measured on GPUs vs model; projection rows: cost model only (not measured)",
             measured_meta=moe.get("meta"), measured_file=pathlib.Path(args.moe).name,
             fits={str(k): {kk: vv for kk, vv in v.items()} for k, v in fits.items()},
             validation=validation, projection=rows, args=vars(args))
  out = pathlib.Path(args.out)
  out.write_text(json.dumps(doc, indent=1, default=float))
  out.with_suffix(".md").write_text(markdown(doc, errs))
  plot(rows, measured, out.with_suffix(".png"))
  print(f"wrote {out} and its .md and .png")


def projection_table(rows) -> str:
  lines = ["| D | policy | imbalance | padded ms | x static | x eplb_step | vs ideal % | bytes-exact ms | x static | "
           "x eplb_step | vs ideal % | mean capacity | planner ms (host, step) |", "|" + "---|" * 13]
  imbalance = lambda r: f"{r['imbalance']:.4f}" + (  # noqa: E731
      f" / {r['exact_imbalance']:.4f}" if abs(r.get("exact_imbalance", r["imbalance"]) - r["imbalance"]) > 1e-9 else "")
  lines += [f"| {r['D']} | {r['policy']} | {imbalance(r)} | {r['step_ms']:.0f} | {r['vs_static']:.3f} | "
            f"{r['vs_eplb_step']:.3f} | {r['to_ideal_pct']:+.1f} | {r['exact_ms']:.0f} | {r['exact_vs_static']:.3f} | "
            f"{r['exact_vs_eplb_step']:.3f} | {r['exact_to_ideal_pct']:+.1f} | {r['capacity']:.0f} | "
            f"{r['planner_ms']:.0f} |"
            for r in rows]
  return "\n".join(lines)


def markdown(doc: dict, errs: list[float]) -> str:
  """The fits, the validation (measured vs model) and the projection (model only) as markdown."""
  meta = doc["measured_meta"] or {}
  sources = "; ".join(f"{k}: {v}" for k, v in meta.get("sources", {}).items()) or f"`{meta.get('command', '')}`"
  lines = ["# Simulator: validation (measured vs model) and projection (model only)", "",
           f"Measured inputs: `{doc['measured_file']}` ({meta.get('card', '?')}, JAX {meta.get('jax', '?')}, "
           f"{meta.get('date', '?')}; {sources}) and `transfer.json` (links and GEMM rate).",
           "Command: `python benchmarks/simulate.py`. Model: this script's docstring.", "", "## Fits", "",
           "| D | other ms per (m, l) | beta ms per received row per (m, l) | GEMM TFLOP/s |", "|---|---|---|---|"]
  lines += [f"| {d} | {f['other_ms']:.2f} | {f['beta_ms_per_row']:.2e} | {f['rates']['tflops']:.0f} |"
            for d, f in doc["fits"].items()]
  lines += ["", "## Validation (MEASURED step times vs model; static and eplb_step calibrate, the rest predict)", "",
            "| D | policy | measured ms | predicted ms | error % | role |", "|---|---|---|---|---|---|"]
  lines += [f"| {r['D']} | {r['policy']} | {r['measured_ms']:.1f} | {r['predicted_ms']:.1f} | {r['error_pct']:+.1f} | "
            f"{r['role']} |" for r in doc["validation"]]
  lines += ["", f"Planned-ahead policies and ideals: mean |error| {np.mean(errs):.1f}%, max {np.max(errs):.1f}% "
            f"({len(errs)} predictions). `live` is not modelled beyond its planning and transfers: its separate",
            "per-micro-step programs with a host sync between them dominate it.", "",
            "## Projection (cost model only, NOT measured)", "",
            f"Settings: `{json.dumps({k: doc['args'][k] for k in SETTINGS})}`;",
            "all-to-all at the measured rate up to 8 GPUs and the assumed `ib_gbs` beyond. Two exchanges:",
            "**padded** is what JAX runs today (token all-to-all padded to each micro-step's capacity, moved experts",
            "sent by the `all_to_all` exchange: K rows to every peer in every layer); **bytes-exact** charges",
            "only the rows that exist (a ragged token exchange at the padded one's bandwidth, experts sent to",
            "their destination only): an assumption, since XLA's `ragged_all_to_all` is 7-16x slower today.",
            "Every planner is given the simulated machine's rates; for the bytes-exact variant foremoe plans",
            "for a ragged exchange (`CostModel(dispatch=\"ragged\")`: no padded capacity), its imbalance then",
            "shown after a slash.", "", projection_table(doc["projection"])]
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  main()
