"""Compile time of the decoder's training step, layers under scan vs unrolled (`ModelConfig.scan_layers`).

The step: forward + backward (value_and_grad of next-token cross-entropy, replayed routes) of the
Qwen3-30B-A3B-shaped model (configs/qwen3_30b_a3b.py) on one device (EP 1), one micro-step of `--tokens`
tokens. Each program is lowered for abstract inputs (`nnx.eval_shape` model, ShapeDtypeStructs: no weights)
and compiled; the unrolled model is compiled at a few depths only and its 48-layer time extrapolated
linearly (labelled so). Then both 4-layer programs run with real (identical) weights: step time, and
with `--scan-unroll 2 4` the scanned one at those blocks per loop iteration too; `--profile` adds each timed
program's device kernels by time (benchmarks/kernel_profile.py), to see where a layout loses.

    python benchmarks/compile_scan.py --out benchmarks/results/compile_scan_<card>.json [--scan-unroll 2 4] [--profile]
    JAX_PLATFORMS=cpu python benchmarks/compile_scan.py --smoke   # CPU, tiny shapes
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from common import parse_with_smoke  # noqa: E402

SMOKE = dict(tokens=64, scan_depths=[2, 8], unrolled_depths=[2, 4], step_layers=2, repeats=2, scan_unroll=[2])


def model_config(args, num_layers: int, scan_layers: bool, unroll: int = 1):
  from configs import qwen3_30b_a3b
  cfg = qwen3_30b_a3b.get_config().model
  if args.smoke:
    cfg = dataclasses.replace(cfg, vocab_size=64, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8,
                              moe=dataclasses.replace(cfg.moe, num_experts=8, top_k=2, d_ff_expert=16),
                              dtype="float32", param_dtype="float32")
  return dataclasses.replace(cfg, num_layers=num_layers, scan_layers=scan_layers, scan_unroll=unroll,
                             moe=dataclasses.replace(cfg.moe, slots_per_device=None), max_seq_len=args.tokens,
                             remat=args.remat)


def step_fn(graphdef, capacity):
  import jax
  import jax.numpy as jnp
  from flax import nnx

  def loss(params, tokens_BxT, replay):
    out = nnx.merge(graphdef, params)(tokens_BxT, None, replay, capacity=capacity)
    logp = jax.nn.log_softmax(out.logits[:, :-1], axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, tokens_BxT[:, 1:, None], axis=-1)) + 0.01 * out.aux_loss
  return jax.jit(jax.value_and_grad(loss))


def compile_step(args, mesh, num_layers: int, scan_layers: bool, unroll: int = 1):
  """-> (record, compiled program, graphdef) for abstract inputs."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from foremoe_jax.mesh import batch_sharding
  from foremoe_jax.model import Model

  cfg = model_config(args, num_layers, scan_layers, unroll)
  abstract = nnx.eval_shape(lambda: Model(cfg, mesh=mesh, rngs=nnx.Rngs(0)))
  graphdef, params = nnx.split(abstract)
  capacity = abstract.no_drop_capacity(1, args.tokens)
  shard = batch_sharding(mesh)
  tokens = jax.ShapeDtypeStruct((1, args.tokens), jnp.int32, sharding=shard)
  replay = jax.ShapeDtypeStruct((1, args.tokens, num_layers, cfg.moe.top_k), jnp.int32, sharding=shard)
  start = time.perf_counter()
  lowered = step_fn(graphdef, capacity).lower(params, tokens, replay)
  lower_s = time.perf_counter() - start
  start = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  record = dict(layers=num_layers, scan_layers=scan_layers, scan_unroll=unroll, lower_s=lower_s,
                compile_s=compile_s, hlo_chars=len(lowered.as_text()))
  print(f"  {layout_name(scan_layers, unroll)} L={num_layers}: lower {lower_s:.1f} s, compile {compile_s:.1f} s",
        flush=True)
  return record, compiled, cfg


def real_inputs(cfg, mesh, tokens: int):
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from foremoe_jax.model import Model
  params = jax.jit(lambda: nnx.state(Model(cfg, mesh=mesh, rngs=nnx.Rngs(0)), nnx.Param))()
  key_t, key_r = jax.random.split(jax.random.key(1))
  x = jax.random.randint(key_t, (1, tokens), 0, cfg.vocab_size, jnp.int32)
  scores = jax.random.uniform(key_r, (1, tokens, cfg.num_layers, cfg.moe.num_experts))
  replay = jnp.argsort(scores, axis=-1)[..., :cfg.moe.top_k].astype(jnp.int32)  # distinct experts per token
  return params, x, replay


def time_step(compiled, inputs, repeats: int) -> tuple[float, float]:
  """-> (median ms, loss)."""
  import jax
  loss, _ = jax.block_until_ready(compiled(*inputs))
  samples = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*inputs))
    samples.append((time.perf_counter() - start) * 1e3)
  return float(np.median(samples)), float(loss)


def run(args) -> dict:
  import jax

  from foremoe_jax.mesh import make_mesh
  mesh = make_mesh(1, 1)
  result = dict(card=jax.devices()[0].device_kind, jax=jax.__version__, tokens=args.tokens, remat=args.remat,
                date=datetime.date.today().isoformat(), command="python " + " ".join(sys.argv), compiles=[])
  programs = {}
  for scan_layers, depths in ((True, args.scan_depths), (False, args.unrolled_depths)):
    for depth in depths:
      record, compiled, cfg = compile_step(args, mesh, depth, scan_layers)
      result["compiles"].append(record)
      if depth == args.step_layers:
        programs[scan_layers] = (compiled, cfg)
      save(args, result)
  unrolled = [r for r in result["compiles"] if not r["scan_layers"]]
  if len(unrolled) >= 2:  # lower + compile grow linearly with unrolled depth
    depths = np.array([r["layers"] for r in unrolled], float)
    total = np.array([r["lower_s"] + r["compile_s"] for r in unrolled])
    slope, intercept = np.polyfit(depths, total, 1)
    target = max(args.scan_depths)
    result["unrolled_extrapolated"] = dict(layers=target, lower_plus_compile_s=float(intercept + slope * target),
                                           note=f"linear fit over unrolled depths {depths.astype(int).tolist()}")
  if len(programs) == 2:
    for unroll in args.scan_unroll:
      if unroll != 1:
        record, compiled, cfg = compile_step(args, mesh, args.step_layers, True, unroll)
        result["compiles"].append(record)
        programs[("scan", unroll)] = (compiled, cfg)
    inputs = real_inputs(programs[False][1], mesh, args.tokens)
    scanned_params = jax.jit(lambda: _scanned_params(programs[True][1], mesh))()
    result["steps"] = []
    for key, (compiled, _) in programs.items():
      scan_layers, unroll = (key, 1) if isinstance(key, bool) else (True, key[1])
      step_inputs = (scanned_params, *inputs[1:]) if scan_layers else inputs
      ms, loss = time_step(compiled, step_inputs, args.repeats)
      row = dict(layout=layout_name(scan_layers, unroll), scan_unroll=unroll, ms=ms, loss=loss)
      if args.profile:
        from kernel_profile import device_ms, kernel_table, print_table
        kernels = kernel_table(compiled, step_inputs)
        print_table(row["layout"], kernels)
        row.update(device_ms=device_ms(kernels), kernels=kernels[:40])
      result["steps"].append(row)
      save(args, result)
    by_layout = {r["layout"]: r for r in result["steps"]}
    unrolled, scanned = by_layout["unrolled"], by_layout["scan"]
    result["step"] = dict(layers=args.step_layers, unrolled_ms=unrolled["ms"], scanned_ms=scanned["ms"],
                          scanned_over_unrolled=scanned["ms"] / unrolled["ms"], unrolled_loss=unrolled["loss"],
                          scanned_loss=scanned["loss"])
  save(args, result)
  return result


def layout_name(scan_layers: bool, unroll: int = 1) -> str:
  return "unrolled" if not scan_layers else "scan" if unroll == 1 else f"scan_unroll{unroll}"


def _scanned_params(cfg, mesh):
  """The scanned model from the same seed: the unrolled blocks' weights, stacked."""
  from flax import nnx

  from foremoe_jax.model import Model
  return nnx.state(Model(cfg, mesh=mesh, rngs=nnx.Rngs(0)), nnx.Param)


def save(args, result):
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(result, indent=1))


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--tokens", type=int, default=4096, help="tokens of the micro-step (one sequence)")
  ap.add_argument("--scan-depths", type=int, nargs="+", default=[4, 48])
  ap.add_argument("--unrolled-depths", type=int, nargs="+", default=[4, 8])
  ap.add_argument("--step-layers", type=int, default=4, help="depth whose step time is measured (real weights)")
  ap.add_argument("--scan-unroll", type=int, nargs="+", default=[1],
                  help="blocks per scan iteration of the timed scanned step (1 always runs)")
  ap.add_argument("--profile", action="store_true", help="device kernels of each timed program, by time")
  ap.add_argument("--remat", default="none", choices=("none", "block"))
  ap.add_argument("--repeats", type=int, default=10)
  ap.add_argument("--out", default=None, help="JSON to write")
  args = parse_with_smoke(ap, SMOKE)
  result = run(args)
  print(f"card {result['card']}, jax {result['jax']}, {args.tokens} tokens, remat {args.remat}")
  print("| layers | layout | lower s | compile s | HLO chars |")
  print("|---|---|---|---|---|")
  for r in result["compiles"]:
    print(f"| {r['layers']} | {layout_name(r['scan_layers'], r.get('scan_unroll', 1))} | {r['lower_s']:.1f} | "
          f"{r['compile_s']:.1f} | {r['hlo_chars']} |")
  if "unrolled_extrapolated" in result:
    e = result["unrolled_extrapolated"]
    print(f"| {e['layers']} | unrolled (extrapolated) | {e['lower_plus_compile_s']:.1f} (lower + compile) | | |")
  for r in result.get("steps", []):
    print(f"step at {args.step_layers} layers, {r['layout']}: {r['ms']:.2f} ms, loss {r['loss']:.6f}")
  if "step" in result:
    s = result["step"]
    print(f"step at {s['layers']} layers: unrolled {s['unrolled_ms']:.2f} ms, scanned {s['scanned_ms']:.2f} ms "
          f"({s['scanned_over_unrolled']:.3f}x); loss {s['unrolled_loss']:.6f} vs {s['scanned_loss']:.6f}")


if __name__ == "__main__":
  main()
