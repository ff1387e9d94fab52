"""Grouped matmul on the group sizes the MoE-step plans hand each GPU (one GPU).

The MoE step's grouped GEMMs see the busiest device's slot loads of each (micro-step, layer): groups
that are not multiples of the 128-row tile. This times the six grouped matmuls of a layer (gate+up
and down forward, their d(lhs) with the weights transposed, and the weight gradients) on those exact sizes with
`mosaic_gmm.tuned()`, beside the `ideal` routes' tile-aligned sizes, with the row tiles each costs:
what unaligned groups cost the kernel.

    python benchmarks/moe_step.py --make-data --ep 2 4          # host: .bench_data routes
    python benchmarks/gmm_plan_groups.py --ep 2 4 --out $OUT/gmm_plan_groups.json   # one Hopper GPU
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from foremoe_jax.planner import PlanConfig, plan_step  # noqa: E402
from common import E, F, H, K, PLAN_RATES, counts_of, plan_cost, route_file  # noqa: E402

# (name, K, N, transpose_rhs): the layer's four grouped matmuls with [rows, K] x [G, K, N] (or [G, N, K]).
MATMULS = (("gate_up fwd", H, 2 * F, False), ("down fwd", F, H, False),
           ("down d(lhs)", H, F, True), ("gate_up d(lhs)", 2 * F, H, True))
# (name, K, N): the weight gradients, tgmm of lhs [rows, K] and the output gradient [rows, N].
TGMMS = (("gate_up d(w)", H, 2 * F), ("down d(w)", F, H))


def busiest_group_sizes(num_devices: int, policy: str, args) -> np.ndarray:
  """int64 [M*L, S]: the slot loads of the busiest device of each (m, l) under `policy`'s plan."""
  data = np.load(route_file(args.data, num_devices, args.tokens))
  slots = E // num_devices + 1
  if policy == "ideal":
    per_slot = np.where(np.arange(slots) < E // num_devices, num_devices * args.tokens * K // E, 0)
    return per_slot[None].repeat(data["routes"].shape[0] * data["routes"].shape[2], 0)
  counts = counts_of(data["routes"], num_devices)
  plan = plan_step(counts, PlanConfig(E, num_devices, slots, policy=policy, cost=plan_cost(*PLAN_RATES)),
                   history=data["history_counts"])
  per_slot = plan.slot_pairs(counts).sum(2)  # [M, L, G]
  per_slot = per_slot.reshape(-1, num_devices, slots)
  return per_slot[np.arange(len(per_slot)), per_slot.sum(-1).argmax(-1)]


def tile_visits(sizes_BxS: np.ndarray, block_m: int = 128, align: int = 8) -> float:
  """Mean over (m, l) of the row tiles the kernel computes (`tiling.row_tiles`): a group of rows
  [s, e) costs ceil((e - s + s % align) / block_m); blocks aligned to the array would add one per
  boundary inside a block."""
  ends = np.cumsum(sizes_BxS, -1)
  starts = ends - sizes_BxS
  tiles = np.where(sizes_BxS > 0, -(-(ends - starts // align * align) // block_m), 0)
  return float(tiles.sum(-1).mean())


def layer_matmuls(num_groups: int, rows: int):
  """(name, K, N, rhs shape, fn(lhs, rhs, group_sizes)) of the layer's six grouped matmuls."""
  from pallas_kernels import mosaic_gmm, mosaic_tgmm
  out = []
  for name, k, n, transpose in MATMULS:
    cfg = mosaic_gmm.tuned()[(k, n)]
    out.append((name, k, n, (num_groups, n, k) if transpose else (num_groups, k, n),
                functools.partial(mosaic_gmm.gmm, transpose_rhs=transpose, config=cfg)))
  for name, k, n in TGMMS:
    out.append((name, k, n, (rows, n), functools.partial(mosaic_tgmm.tgmm, config=mosaic_tgmm.tuned()[(k, n)])))
  return out


def run(args) -> dict:
  import jax
  import jax.numpy as jnp

  from kernels import timeit

  out = dict(meta=dict(card=jax.devices()[0].device_kind, jax=jax.__version__,
                       date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       command="python benchmarks/gmm_plan_groups.py " + " ".join(sys.argv[1:])),
             rows=[])
  key = jax.random.key(0)
  for d in args.ep:
    for policy in args.policies:
      sizes_BxS = busiest_group_sizes(d, policy, args)[:args.max_sets]
      rows = int(-(-sizes_BxS.sum(-1).max() // 128) * 128)
      for name, k, n, rhs_shape, call in layer_matmuls(sizes_BxS.shape[1], rows):
        lhs = jax.random.normal(key, (rows, k), jnp.bfloat16)
        rhs = jax.random.normal(key, rhs_shape, jnp.bfloat16)
        fn = jax.jit(call)
        ms = [timeit(fn, lhs, rhs, jnp.asarray(s, jnp.int32)) * 1e3 for s in sizes_BxS]
        flops = 2 * sizes_BxS.sum(-1) * k * n
        row = dict(D=d, policy=policy, matmul=name, ms=float(np.sum(ms)),
                   tflops=float(flops.sum() / (np.sum(ms) / 1e3) / 1e12), sets=len(sizes_BxS),
                   mean_rows=float(sizes_BxS.sum(-1).mean()), tile_visits=tile_visits(sizes_BxS))
        out["rows"].append(row)
        print(f"D={d} {policy:9s} {name:15s} {row['ms']:8.3f} ms  {row['tflops']:6.1f} TFLOP/s  "
              f"tiles {row['tile_visits']:.1f}", flush=True)
  return out


def table(out: dict) -> str:
  """Per EP size and matmul: each policy's time over (m, l) sets, and against ideal's."""
  ideal = {(r["D"], r["matmul"]): r["ms"] for r in out["rows"] if r["policy"] == "ideal"}
  lines = ["| D | policy | matmul | ms | TFLOP/s | vs ideal % | tile visits per (m, l) |",
           "|---|---|---|---|---|---|---|"]
  for r in out["rows"]:
    base = ideal.get((r["D"], r["matmul"]))
    vs = f"{100 * (r['ms'] / base - 1):+.1f}" if base else "n/a"
    lines.append(f"| {r['D']} | {r['policy']} | {r['matmul']} | {r['ms']:.3f} | {r['tflops']:.0f} | {vs} | "
                 f"{r['tile_visits']:.1f} |")
  return "\n".join(lines)


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--ep", type=int, nargs="+", default=[2, 4])
  ap.add_argument("--policies", nargs="+", default=["foremoe", "static", "ideal"])
  ap.add_argument("--tokens", type=int, default=4096)
  ap.add_argument("--max-sets", type=int, default=8, help="(m, l) group-size sets timed per policy")
  ap.add_argument("--data", default=".bench_data")
  ap.add_argument("--out", default=None)
  args = ap.parse_args()
  out = run(args)
  print(table(out))
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
