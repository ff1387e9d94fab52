"""Attention paths on one device: dense vs blockwise vs cuDNN, forward and forward + backward.

Default shapes: Qwen3-30B-A3B's attention (32 q heads, 4 kv heads, head_dim 128), T = 8192, bf16, one row
(dense at 4 rows would hold 4 x 8 GiB float32 score buffers). Per path and block size: median ms of the
forward and of forward + backward (gradients of q, k, v), their TFLOP/s (causal FLOPs: 2 T^2 N D forward,
2.5 x that backward, halved for causality), the compiled program's temp bytes, and the largest difference
to the dense (or, where dense is not run, the blockwise) output. `--packed`: rows of random segments
(cuDNN has no segment mask: reported as not applicable). A path that fails is reported, not dropped.

    python benchmarks/attention.py --out benchmarks/results/attention_h100.json          # one H100
    JAX_PLATFORMS=cpu python benchmarks/attention.py --seq-len 256 --heads 4 --kv-heads 2 --head-dim 16 \\
      --dtype float32 --blocks 64 128                                                   # CPU smoke run
"""
import argparse
import datetime
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from foremoe_jax.attention import blockwise_attention, cudnn_attention, gqa_attention  # noqa: E402


def timeit(fn, *args, reps=10):
  """Median seconds per call after a warm-up call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def segments(rng, b, t):
  """Rows of back-to-back segments of 1-4K tokens (the last one cut at T)."""
  seg = np.zeros((b, t), np.int32)
  for r in range(b):
    start, s = 0, 1
    while start < t:
      n = int(rng.integers(1024, 4097))
      seg[r, start:start + n], start, s = s, start + n, s + 1
  return seg


def paths(block_sizes):
  """name -> fn(q, k, v, segment_ids) per path (and block size)."""
  def dense(q, k, v, seg):
    return gqa_attention(q, k, v, jnp.broadcast_to(jnp.arange(q.shape[1]), q.shape[:2]), seg)
  out = {"dense": dense}
  for c in block_sizes:
    out[f"blockwise/{c}"] = lambda q, k, v, seg, c=c: blockwise_attention(q, k, v, seg, block=c)
  out["cudnn"] = cudnn_attention
  return out


def measure(name, fn, q, k, v, seg, flops_fwd):
  """One path's row; errors (unsupported, out of memory) are recorded as such."""
  row = {"path": name}
  fwd = jax.jit(lambda q, k, v: fn(q, k, v, seg))
  grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v, seg).astype(jnp.float32)), argnums=(0, 1, 2)))
  try:
    compiled = grad.lower(q, k, v).compile()
    stats = compiled.memory_analysis()
    row["temp_bytes_fwd_bwd"] = None if stats is None else int(stats.temp_size_in_bytes)
    row["fwd_ms"] = 1e3 * timeit(fwd, q, k, v)
    row["fwd_bwd_ms"] = 1e3 * timeit(grad, q, k, v)
    row["fwd_tflops"] = flops_fwd / row["fwd_ms"] / 1e9
    row["fwd_bwd_tflops"] = 3.5 * flops_fwd / row["fwd_bwd_ms"] / 1e9
    row["out"] = fwd(q, k, v)
  except Exception as e:  # noqa: BLE001  (a path that does not run is a result)
    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
  return row


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--seq-len", type=int, default=8192)
  ap.add_argument("--heads", type=int, default=32)
  ap.add_argument("--kv-heads", type=int, default=4)
  ap.add_argument("--head-dim", type=int, default=128)
  ap.add_argument("--dtype", default="bfloat16")
  ap.add_argument("--blocks", type=int, nargs="+", default=[256, 512, 1024], help="blockwise block sizes")
  ap.add_argument("--paths", nargs="+", default=["dense", "blockwise", "cudnn"])
  ap.add_argument("--packed", action="store_true", help="rows of random segments (segment_ids)")
  ap.add_argument("--out", default=None, help="JSON to write")
  args = ap.parse_args(argv)
  b, t, n, kv, d, dt = args.batch, args.seq_len, args.heads, args.kv_heads, args.head_dim, jnp.dtype(args.dtype)
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (b, t, n, d), dt)
  k, v = (jax.random.normal(key, (b, t, kv, d), dt) for key in keys[1:])
  seg = jnp.asarray(segments(np.random.default_rng(0), b, t)) if args.packed else None
  flops_fwd = 2 * 2 * b * n * t * t * d / 2  # QK^T and PV, causal half
  rows = []
  for name, fn in paths(args.blocks).items():
    if name.split("/")[0] not in args.paths:
      continue
    rows.append(measure(name, fn, q, k, v, seg, flops_fwd))
    print(f"  {name}: {rows[-1].get('error') or '%.2f ms fwd + bwd' % rows[-1]['fwd_bwd_ms']}", flush=True)
  ref = next((r["out"] for r in rows if "out" in r and r["path"] == "dense"), None)
  ref = ref if ref is not None else next((r["out"] for r in rows if "out" in r), None)
  for r in rows:
    if "out" in r:
      r["max_abs_diff"] = float(jnp.max(jnp.abs(r.pop("out").astype(jnp.float32) - ref.astype(jnp.float32))))
  out = {"card": jax.devices()[0].device_kind, "backend": jax.default_backend(), "jax": jax.__version__,
         "date": datetime.date.today().isoformat(), "command": "python " + " ".join(sys.argv),
         "shapes": dict(batch=b, seq_len=t, heads=n, kv_heads=kv, head_dim=d, dtype=args.dtype, packed=args.packed),
         "rows": rows}
  print(f"\n{out['card']} ({out['backend']}), jax {out['jax']}: B={b} T={t} heads={n}/{kv} head_dim={d} {args.dtype}"
        f"{' packed' if args.packed else ''}")
  print("| path | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | temp GiB (fwd+bwd) | max abs diff |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    if "error" in r:
      print(f"| {r['path']} | {r['error']} | | | | | |")
      continue
    temp = "n/a" if r["temp_bytes_fwd_bwd"] is None else f"{r['temp_bytes_fwd_bwd'] / 2**30:.2f}"
    print(f"| {r['path']} | {r['fwd_ms']:.2f} | {r['fwd_tflops']:.1f} | {r['fwd_bwd_ms']:.2f} | "
          f"{r['fwd_bwd_tflops']:.1f} | {temp} | {r['max_abs_diff']:.2e} |")
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(out, f, indent=1)
  return out


if __name__ == "__main__":
  main()
