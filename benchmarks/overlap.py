"""Overlap benchmark (one device): how much of a per-micro-step replica fetch hides behind its compute.

A micro-step's compute: `--layers` MoE layers of Qwen3-30B-A3B shape (hidden 2048, expert 768) on one
device, forward + backward, `--tokens` tokens x top-8 = 32,768 routed rows per layer through a grouped
SwiGLU of `--local-experts` even groups. The grouped GEMM is a batched einsum over the groups (a dense
stand-in with the FLOPs of `pallas_kernels.gmm` on even group sizes). The fetch: per layer,
`moves_per_layer` experts (3 x 2048 x 768 bf16 = 9.4 MB each) written into that layer's working slots
(donated buffers), by traced rows:
  host: from a pinned-host copy (`foremoe_jax.host_transfer`; every mechanism that lowers is timed,
        the fastest correct one is reported);
  hbm:  from a home copy in the same device's HBM (a row gather, the baseline).
Timed: compute alone, fetch alone (isolated), both in one program; exposed = both - compute,
hidden_fraction = 1 - exposed / isolated. Median of `--repeats` calls after two warm-ups.

    python benchmarks/overlap.py --out benchmarks/results/overlap_<card>.json --calibrate
    JAX_PLATFORMS=cpu python benchmarks/overlap.py --smoke

--calibrate also writes the planner's calibration (`foremoe_jax/planner/calibration/<card>.json`, or
--calibrate-out): the measured exposed ms per moved expert-layer of the host path (the largest over the
move counts) and, until it is measured again, the NVLink path's from BENCHMARKS.md (4 x H200).
"""
from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import shlex
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

TOP_K = 8
SMOKE = dict(hidden=32, expert=16, tokens=16, layers=1, local_experts=2, home_experts=8, moves=[1], repeats=1)
# The NVLink path's exposed cost per moved expert-layer, weights in and gradient back: BENCHMARKS.md,
# "Measured: transfers", 4 x H200, JAX 0.11.2, 1 move per device and layer, prefetched: +2.07 ms per
# micro-step of 2 layers.
LINK_EXPOSED_MS = 2.07 / 2
LINK_SOURCE = "BENCHMARKS.md 'Measured: transfers' (4 x H200, JAX 0.11.2, 1 move/device/layer, prefetch)"


def card_name(device) -> str:
  """'h100', 'h200', 'cpu', ...: the short card name results and calibrations are filed under."""
  kind = device.device_kind.lower()
  for name in ("h200", "h100", "a100", "b200", "gh200"):
    if name in kind:
      return name
  return "cpu" if device.platform == "cpu" else kind.split()[-1].replace("/", "_")


def timed(fn, *args, repeats: int, donate_first: bool = False):
  """Median seconds of fn(*args) after two warm-up calls; with donate_first, the first argument is
  donated and replaced by the call's output slots (the second warm-up compiles again: the donated
  output is committed, the first input was not)."""
  import jax
  times = []
  for i in range(repeats + 2):
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
    if donate_first:
      args = (out[1] if isinstance(out, tuple) else out, *args[1:])
  return float(np.median(times[2:])), out


def build(args):
  """Arrays and the jitted programs: compute, fetch per path and mechanism, both."""
  import jax
  import jax.numpy as jnp
  from foremoe_jax.host_transfer import fetch_rows_local, host_copy
  from foremoe_jax.mesh import make_mesh
  dt, layers, g = jnp.bfloat16, args.layers, args.local_experts
  rows = args.tokens * TOP_K // g
  keys = jax.random.split(jax.random.key(0), 5)
  params = dict(gu=(jax.random.normal(keys[0], (layers, g, args.hidden, 2 * args.expert)) * 0.02).astype(dt),
                down=(jax.random.normal(keys[1], (layers, g, args.expert, args.hidden)) * 0.02).astype(dt))
  x = jax.random.normal(keys[2], (g, rows, args.hidden)).astype(dt)
  expert_shape = (3, args.hidden, args.expert)
  home = (jax.random.normal(keys[3], (layers, args.home_experts, *expert_shape)) * 0.02).astype(dt)
  slots = jnp.zeros((layers, g + max(args.moves), *expert_shape), dt)
  host = host_copy(home, make_mesh(1, 1))

  def loss(p, x):
    for l in range(layers):
      gate, up = jnp.split(jnp.einsum("gnh,ghf->gnf", x, p["gu"][l]), 2, axis=-1)
      x = jnp.einsum("gnf,gfh->gnh", jax.nn.silu(gate) * up, p["down"][l])
    return jnp.mean(jnp.square(x.astype(jnp.float32)))

  grad = jax.grad(loss, argnums=(0, 1))

  def fetch(src, slots, expert_LxK, slot_LxK, path, mechanism):
    for l in range(layers):
      got = fetch_rows_local(src[l], expert_LxK[l], mechanism) if path == "host" else src[l][expert_LxK[l]]
      slots = slots.at[l, slot_LxK[l]].set(got)
    return slots

  programs = {"compute": jax.jit(grad)}
  for path, mechanisms in (("host", args.mechanisms), ("hbm", ["gather"])):
    for mech in mechanisms:
      programs[path, mech, "fetch"] = jax.jit(
          lambda slots, src, e, s, path=path, mech=mech: fetch(src, slots, e, s, path, mech), donate_argnums=0)
      programs[path, mech, "both"] = jax.jit(
          lambda slots, src, e, s, p, x, path=path, mech=mech: (grad(p, x), fetch(src, slots, e, s, path, mech)),
          donate_argnums=0)
  flops = 3 * 2 * layers * g * rows * args.hidden * 3 * args.expert
  return dict(params=params, x=x, home=home, host=host, slots=slots, programs=programs, flops=flops)


def run(args) -> dict:
  import jax
  import jax.numpy as jnp
  b = build(args)
  programs, reps = b["programs"], args.repeats
  compute_s, _ = timed(programs["compute"], b["params"], b["x"], repeats=reps)
  rng = np.random.default_rng(0)
  rows, attempts = [], []
  for path, src in (("host", b["host"].weights), ("hbm", b["home"])):
    mechanisms = args.mechanisms if path == "host" else ["gather"]
    for moves in args.moves:
      expert = np.stack([rng.choice(args.home_experts, moves, replace=False) for _ in range(args.layers)])
      slot = np.broadcast_to(args.local_experts + np.arange(moves), expert.shape)
      expert_j, slot_j = jnp.asarray(expert, jnp.int32), jnp.asarray(slot, jnp.int32)
      best = None
      for mech in mechanisms:
        try:
          fetch_s, out = timed(programs[path, mech, "fetch"], jnp.zeros_like(b["slots"]), src, expert_j, slot_j,
                               repeats=reps, donate_first=True)
          want = np.asarray(b["home"], np.float32)[np.arange(args.layers)[:, None], expert]
          got = np.asarray(out, np.float32)[np.arange(args.layers)[:, None], slot]
          if not np.array_equal(got, want):
            raise ValueError("fetched rows differ from the home copy")
          both_s, _ = timed(programs[path, mech, "both"], jnp.zeros_like(b["slots"]), src, expert_j, slot_j,
                            b["params"], b["x"], repeats=reps, donate_first=True)
        except Exception as e:  # a mechanism that does not lower here is recorded, the others still run
          attempts.append(dict(path=path, mechanism=mech, moves_per_layer=moves,
                               error=f"{type(e).__name__}: {e}"[:400]))
          print(f"{path}/{mech} moves={moves}: FAILED {attempts[-1]['error'][:200]}", flush=True)
          continue
        attempts.append(dict(path=path, mechanism=mech, moves_per_layer=moves, isolated_ms=1e3 * fetch_s,
                             both_ms=1e3 * both_s))
        if best is None or both_s < best[2]:
          best = (mech, fetch_s, both_s)
      if best is None:
        continue
      mech, fetch_s, both_s = best
      exposed_s = both_s - compute_s
      rows.append(dict(path=path, mechanism=mech, moves_per_layer=moves, tokens=args.tokens, layers=args.layers,
                       compute_ms=1e3 * compute_s, isolated_ms=1e3 * fetch_s, both_ms=1e3 * both_s,
                       exposed_ms_per_expert_layer=1e3 * exposed_s / (moves * args.layers),
                       hidden_fraction=1.0 - exposed_s / fetch_s,
                       fetch_gb_per_s=moves * args.layers * 3 * args.hidden * args.expert * 2 / fetch_s / 1e9,
                       card=card_name(jax.devices()[0]), host_path_real=b["host"].real if path == "host" else None))
  dev = jax.devices()[0]
  meta = dict(card=card_name(dev), device=dev.device_kind, jax=jax.__version__, smoke=args.smoke,
              date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              command=shlex.join(["python", *sys.argv]), compute_ms=1e3 * compute_s,
              compute_tflops=b["flops"] / compute_s / 1e12,
              compute="batched einsum over even groups (grouped-GEMM stand-in), bf16, forward + backward",
              shapes=dict(hidden=args.hidden, expert=args.expert, tokens=args.tokens, top_k=TOP_K, layers=args.layers,
                          local_experts=args.local_experts, home_experts=args.home_experts,
                          expert_mb=3 * args.hidden * args.expert * 2 / 1e6))
  return dict(meta=meta, rows=rows, attempts=attempts)


def verify_host_fetch(mechanisms) -> dict:
  """`host_transfer.host_fetch` on this device (mesh 1 x 1) against the plain gather: values and the
  home weights' gradient; per mechanism, "ok" or the error."""
  import jax
  import jax.numpy as jnp
  from foremoe_jax.host_transfer import host_copy, host_fetch, host_tables
  from foremoe_jax.mesh import make_mesh
  mesh = make_mesh(1, 1)
  home, dst = jax.random.normal(jax.random.key(1), (8, 4, 3)), jax.random.normal(jax.random.key(2), (4, 4, 3))
  cot = jax.random.normal(jax.random.key(3), dst.shape)
  targets = [(0, 1, 5), (0, 3, 2)]
  host = host_copy(home, mesh)
  want, vjp = jax.vjp(lambda h, t: t.at[jnp.array([1, 3])].set(h[jnp.array([5, 2])]), home, dst)
  out = {}
  for mech in mechanisms:
    try:
      tables = host_tables(targets, 1, 8)
      fetch = jax.jit(lambda h, t, tables, mech=mech: host_fetch(host.weights, h, t, tables, mesh, mech))
      got, got_vjp = jax.vjp(lambda h, t: fetch(h, t, tables), home, dst)
      ok = all(np.allclose(a, b, atol=1e-6) for a, b in zip((got, *got_vjp(cot)), (want, *vjp(cot))))
      out[mech] = "ok" if ok else "wrong values or gradients"
    except Exception as e:  # recorded: the benchmark reports which mechanisms work on this JAX
      out[mech] = f"{type(e).__name__}: {e}"[:400]
  return out


def print_table(result: dict) -> None:
  m = result["meta"]
  print(f"\n{m['device']} ({m['card']}), JAX {m['jax']}, compute {m['compute_ms']:.3f} ms "
        f"({m['compute_tflops']:.0f} TFLOP/s), shapes {m['shapes']}")
  print("| path | mechanism | moves / layer | tokens | isolated ms | both ms | exposed ms / expert-layer | hidden "
        "| GB/s |")
  print("|---|---|---|---|---|---|---|---|---|")
  for r in result["rows"]:
    print(f"| {r['path']} | {r['mechanism']} | {r['moves_per_layer']} | {r['tokens']} | {r['isolated_ms']:.3f} | "
          f"{r['both_ms']:.3f} | {r['exposed_ms_per_expert_layer']:.4f} | {100 * r['hidden_fraction']:.0f}% | "
          f"{r['fetch_gb_per_s']:.1f} |")


def calibration(result: dict) -> dict:
  """The planner's calibration from a run: exposed ms per moved expert-layer per path (>= 0)."""
  host = [r["exposed_ms_per_expert_layer"] for r in result["rows"] if r["path"] == "host"]
  if not host:
    raise ValueError("no host-path row in the run: nothing to calibrate")
  m = result["meta"]
  return dict(card=m["card"], device=m["device"], jax=m["jax"], date=m["date"], shapes=m["shapes"],
              host_exposed_ms=max(0.0, max(host)),
              host_source=f"benchmarks/overlap.py on {m['device']} (largest over {len(host)} move counts)",
              link_exposed_ms=LINK_EXPOSED_MS, link_source=LINK_SOURCE)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU)")
  parser.add_argument("--hidden", type=int, default=2048)
  parser.add_argument("--expert", type=int, default=768)
  parser.add_argument("--tokens", type=int, default=4096)
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--local-experts", type=int, default=16, help="grouped-GEMM groups (128 experts / EP 8)")
  parser.add_argument("--home-experts", type=int, default=32, help="experts per layer in the fetch source")
  parser.add_argument("--moves", type=int, nargs="+", default=[1, 2, 4])
  parser.add_argument("--mechanisms", nargs="+", default=["slice", "gather"])
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--out", default="")
  parser.add_argument("--calibrate", action="store_true", help="also write the planner's calibration JSON")
  parser.add_argument("--calibrate-out", default="", help="default foremoe_jax/planner/calibration/<card>.json")
  args = parser.parse_args()
  if args.smoke:
    for key, value in SMOKE.items():
      setattr(args, key, value)
  result = run(args)
  result["meta"]["host_fetch_check"] = verify_host_fetch(args.mechanisms)
  print_table(result)
  print("host_fetch values and gradients vs the plain gather:", result["meta"]["host_fetch_check"])
  if args.out:
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps(result, indent=1))
  if args.calibrate:
    from foremoe_jax.planner.config import CALIBRATION_DIR
    cal = calibration(result)
    path = pathlib.Path(args.calibrate_out or CALIBRATION_DIR / f"{cal['card']}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cal, indent=1))
    print(f"calibration -> {path}: host {cal['host_exposed_ms']:.4f} ms, link {cal['link_exposed_ms']:.4f} ms "
          "per moved expert-layer")


if __name__ == "__main__":
  main()
