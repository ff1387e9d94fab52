"""Benchmark of pallas_kernels on one GPU: grouped matmul fwd and fwd+bwd, permute/combine.

Shapes: Qwen3-30B-A3B at EP=8 (17 slots per device): M rows in {32K, 64K, 80K}; gate+up K=2048,
N=1536; down K=768, N=2048; balanced and skewed groups. Anchors measured in the same run: XLA dense
matmul of the same FLOPs, XLA batched einsum over the groups (padded to the largest group),
jax.lax.ragged_dot, and JAX's shipped Mosaic GPU example kernels (best of a small block sweep).
Usage: python benchmarks/kernels.py --out DIR [--sweep] [--rows 65536] [--skip-slow]
Prints a table last; writes kernels.json and kernels.md under --out.
"""
import argparse
import datetime
import functools
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import pallas_kernels as pk  # pylint: disable=g-import-not-at-top,wrong-import-position
from pallas_kernels import mosaic_gmm, mosaic_tgmm  # pylint: disable=g-import-not-at-top,wrong-import-position

G = 17
SHAPES = {"gate_up": (2048, 1536), "down": (768, 2048)}


def timeit(fn, *args, reps=20, inner=5, budget_s=3.0):
  """Median seconds per call over `reps` batches of `inner` back-to-back calls, after warm-up."""
  jax.block_until_ready(fn(*args))
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  once = time.perf_counter() - t0
  if once * reps * inner > budget_s:  # slow anchors (ragged_dot): fewer repetitions
    reps, inner = max(3, int(budget_s / max(once, 1e-9) / 2)), 1
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    for _ in range(inner):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / inner)
  return statistics.median(times)


def group_sizes(m, skew):
  """Balanced: m split evenly. Skewed: half the rows on 2 groups, 3 empty, the rest spread."""
  if skew == "balanced":
    sizes = np.full(G, m // G)
    sizes[: m % G] += 1
  else:
    sizes = np.zeros(G, np.int64)
    sizes[[3, 11]] = m // 4
    rest = m - sizes.sum()
    others = [g for g in range(G) if g not in (3, 11, 0, 7, 16)]  # 0, 7, 16 stay empty
    sizes[others] = rest // len(others)
    sizes[others[: rest % len(others)]] += 1
  assert sizes.sum() == m
  return jnp.asarray(sizes, jnp.int32)


def example_kernels():
  from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu, transposed_ragged_dot_mgpu  # pylint: disable=g-import-not-at-top
  return ragged_dot_mgpu.ragged_dot, transposed_ragged_dot_mgpu.transposed_ragged_dot


EXAMPLE_FWD_CONFIGS = [dict(block_m=128, block_n=bn, block_k=64, max_concurrent_steps=s,
                            grid_block_n=gb) for bn, s, gb in
                       [(128, 4, 16), (192, 4, 8)]]
EXAMPLE_T_CONFIG = dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=4, grid_block_n=1)


def best_example_fwd(lhs, rhs, gs, transpose_rhs=False):
  fwd, _ = example_kernels()
  best = (float("inf"), None)
  for cfg in EXAMPLE_FWD_CONFIGS:
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    if n % (cfg["block_n"] * cfg["grid_block_n"]):
      continue
    f = jax.jit(functools.partial(fwd, transpose_rhs=transpose_rhs, **cfg))
    try:
      t = timeit(lambda a, b, g: f(a, b, group_sizes=g), lhs, rhs, gs, reps=5)
    except Exception as e:  # pylint: disable=broad-except
      print(f"  example fwd {cfg} failed: {type(e).__name__}: {str(e)[:200]}")
      continue
    best = min(best, (t, cfg), key=lambda x: x[0])
  return best


def inputs(m, k, n, skew, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  lhs = jax.random.normal(keys[0], (m, k), jnp.bfloat16)
  rhs = (jax.random.normal(keys[1], (G, k, n), jnp.float32) / np.sqrt(k)).astype(jnp.bfloat16)
  dout = jax.random.normal(keys[2], (m, n), jnp.bfloat16)
  return lhs, rhs, dout, group_sizes(m, skew)


def fwd_bwd(gmm_fn):
  def f(lhs, rhs, gs, dout):
    out, vjp = jax.vjp(lambda a, b: gmm_fn(a, b, gs), lhs, rhs)
    return (out, *vjp(dout.astype(out.dtype)))
  return jax.jit(f)


def rel_err(x, ref):
  x, ref = np.float32(x.astype(jnp.float32)), np.float32(ref.astype(jnp.float32))
  return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def bench_gmm_case(m, name, skew, rows, skip_slow, example_cfg):
  k, n = SHAPES[name]
  lhs, rhs, dout, gs = inputs(m, k, n, skew)
  flops = 2 * m * k * n
  res = {"rows": m, "shape": name, "K": k, "N": n, "skew": skew, "ms": {}, "tflops": {}}

  def rec(label, seconds, mult=1):
    res["ms"][label] = seconds * 1e3
    res["tflops"][label] = mult * flops / seconds / 1e12
    print(f"  {m:>6} {name:<8} {skew:<8} {label:<22} {seconds * 1e3:8.3f} ms "
          f"{mult * flops / seconds / 1e12:7.1f} TFLOP/s", flush=True)

  ours = jax.jit(lambda a, b, g: pk.gmm(a, b, g, backend="mosaic_gpu"))
  ref = jax.jit(lambda a, b, g: jax.lax.ragged_dot(a, b, g, preferred_element_type=jnp.float32))
  res["rel_err_fwd"] = rel_err(ours(lhs, rhs, gs), ref(lhs, rhs, gs))
  rec("ours fwd", timeit(ours, lhs, rhs, gs))
  ours_fb = fwd_bwd(lambda a, b, g: pk.gmm(a, b, g, backend="mosaic_gpu"))
  rec("ours fwd+bwd", timeit(ours_fb, lhs, rhs, gs, dout), 3)
  dense_b = rhs[0]
  rec("xla dense", timeit(jax.jit(lambda a, b: a @ b), lhs, dense_b))
  cap = int(np.max(np.asarray(gs)))
  lhs_pad = jnp.zeros((G, cap, k), lhs.dtype)
  rec("xla einsum (padded)", timeit(jax.jit(lambda a, b: jnp.einsum("gck,gkn->gcn", a, b)),
                                    lhs_pad, rhs))
  if example_cfg is not None:
    fwd, tfn = example_kernels()
    ex = jax.jit(lambda a, b, g: fwd(a, b, group_sizes=g, **example_cfg["fwd"]))
    res["rel_err_example"] = rel_err(ex(lhs, rhs, gs), ref(lhs, rhs, gs))
    rec("jax example fwd", timeit(ex, lhs, rhs, gs))
    ex_fb = jax.jit(lambda a, b, g, d: (
        fwd(a, b, group_sizes=g, **example_cfg["fwd"]),
        fwd(d, b, group_sizes=g, transpose_rhs=True, **example_cfg["dlhs"]),
        tfn(a, d, group_sizes=g, **example_cfg["t"])))
    rec("jax example fwd+bwd", timeit(ex_fb, lhs, rhs, gs, dout), 3)
  if not skip_slow:
    rec("lax.ragged_dot fwd", timeit(ref, lhs, rhs, gs, budget_s=2.0))
    rec("lax.ragged_dot fwd+bwd", timeit(fwd_bwd(ref), lhs, rhs, gs, dout, budget_s=3.0), 3)
  rows.append(res)


def sweep(m, out_rows):
  """Block sweep at m rows, balanced, both shapes: our gmm/tgmm configs and the example's.

  The winners become the tuned defaults (mosaic_gmm.TUNED, mosaic_tgmm.TUNED) for the rest of
  the run, and are printed in the form to commit.
  """
  best = {}
  for name, (k, n) in SHAPES.items():
    lhs, rhs, dout, gs = inputs(m, k, n, "balanced")
    flops = 2 * m * k * n
    for label, fn, configs, args, table, key in [
        ("gmm", lambda c: jax.jit(lambda a, b, g: mosaic_gmm.gmm(a, b, g, config=c)),
         GMM_SWEEP, (lhs, rhs, gs), mosaic_gmm.TUNED, (k, n)),
        ("gmm_t", lambda c: jax.jit(lambda a, b, g: mosaic_gmm.gmm(a, b, g, transpose_rhs=True,
                                                                   config=c)),
         GMM_SWEEP, (dout, rhs, gs), mosaic_gmm.TUNED, (n, k)),
        ("tgmm", lambda c: jax.jit(lambda a, b, g: mosaic_tgmm.tgmm(a, b, g, config=c)),
         TGMM_SWEEP, (lhs, dout, gs), mosaic_tgmm.TUNED, (k, n))]:
      winner = (0.0, None)
      for cfg in configs:
        try:
          t = timeit(fn(cfg), *args, reps=5)
        except Exception as e:  # pylint: disable=broad-except
          print(f"  sweep {name} {label} {cfg} failed: {type(e).__name__}: {str(e)[:160]}")
          continue
        print(f"  sweep {name:<8} {label:<6} {flops / t / 1e12:7.1f} TFLOP/s  {cfg}", flush=True)
        out_rows.append({"shape": name, "op": label, "tflops": flops / t / 1e12, "config": str(cfg)})
        winner = max(winner, (flops / t / 1e12, cfg), key=lambda x: x[0])
      if winner[1] is not None:
        table[key] = winner[1]
        print(f"  TUNED {label} {key}: {winner[1]}", flush=True)
    t, cfg = best_example_fwd(lhs, rhs, gs)
    print(f"  sweep {name:<8} example fwd {flops / t / 1e12:7.1f} TFLOP/s  {cfg}", flush=True)
    out_rows.append({"shape": name, "op": "example fwd", "tflops": flops / t / 1e12,
                     "config": str(cfg)})
    # The fwd+bwd anchor reuses the best forward blocks for d(lhs) and fixed ones for d(rhs).
    best[name] = {"fwd": cfg, "dlhs": cfg, "t": EXAMPLE_T_CONFIG}
  return best


GMM_SWEEP = [
    mosaic_gmm.GmmConfig(),
    mosaic_gmm.GmmConfig(delay_release=1),
    mosaic_gmm.GmmConfig(epi_split=2, max_concurrent_steps=4, delay_release=1),
    mosaic_gmm.GmmConfig(num_compute_wgs=1, block_n=192, max_concurrent_steps=4),
]
TGMM_SWEEP = [
    mosaic_tgmm.TgmmConfig(),
    mosaic_tgmm.TgmmConfig(max_concurrent_steps=6),
]


def bench_dispatch(rows):
  """permute x[T, D] -> [T*k, D] and combine back, D=2048 bf16, T*k = 65,536, against a copy."""
  t_tok, k, d = 8192, 8, 2048
  x = jax.random.normal(jax.random.key(1), (t_tok, d), jnp.bfloat16)
  idx_R = jnp.argsort(jax.random.randint(jax.random.key(2), (t_tok * k,), 0, 128)) // k
  inv = jnp.argsort(jnp.argsort(jax.random.randint(jax.random.key(3), (t_tok * k,), 0, 128)))
  idx_TxK = inv.reshape(t_tok, k).astype(jnp.int32)
  y = jax.random.normal(jax.random.key(4), (t_tok * k, d), jnp.bfloat16)
  w = jax.nn.softmax(jax.random.normal(jax.random.key(5), (t_tok, k)), axis=-1)
  big = jax.random.normal(jax.random.key(6), (t_tok * k, d), jnp.bfloat16)
  row_bytes = d * 2
  cases = [
      ("device copy (x + s)", jax.jit(lambda a, s: a + s), (big, jnp.bfloat16(1)),
       2 * t_tok * k * row_bytes),
      ("permute", jax.jit(pk.permute), (x, idx_R), (t_tok + t_tok * k) * row_bytes),
      ("combine", jax.jit(pk.combine), (y, idx_TxK, w), (t_tok * k + t_tok) * row_bytes),
      ("permute fwd+bwd", jax.jit(jax.value_and_grad(lambda a, i: jnp.sum(
          pk.permute(a, i).astype(jnp.float32)))), (x, idx_R), 2 * (t_tok + t_tok * k) * row_bytes),
      ("combine fwd+bwd", jax.jit(jax.grad(lambda a, i, b: jnp.sum(
          pk.combine(a, i, b).astype(jnp.float32)), argnums=(0, 2))), (y, idx_TxK, w),
       2 * (t_tok * k + t_tok) * row_bytes + t_tok * k * row_bytes),
      ("combine fwd+bwd unique", jax.jit(jax.grad(lambda a, i, b: jnp.sum(
          pk.combine(a, i, b, unique_rows=True).astype(jnp.float32)), argnums=(0, 2))),
       (y, idx_TxK, w), 2 * (t_tok * k + t_tok) * row_bytes + t_tok * k * row_bytes),
  ]
  for label, fn, args, nbytes in cases:
    t = timeit(fn, *args)
    rows.append({"op": label, "ms": t * 1e3, "TB/s": nbytes / t / 1e12})
    print(f"  {label:<22} {t * 1e3:8.3f} ms {nbytes / t / 1e12:6.2f} TB/s", flush=True)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/kernels_bench"))
  parser.add_argument("--rows", default="32768,65536,81920")
  parser.add_argument("--sweep", action="store_true")
  parser.add_argument("--skip-slow", action="store_true", help="skip the slow lax.ragged_dot anchor")
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  dev = jax.devices()[0]
  meta = {"device": dev.device_kind, "jax": jax.__version__, "date": datetime.datetime.now(
      datetime.timezone.utc).isoformat(timespec="minutes"), "groups": G}
  print(meta, flush=True)
  result = {"meta": meta, "sweep": [], "gmm": [], "dispatch": []}
  save = lambda: json.dump(result, open(os.path.join(args.out, "kernels.json"), "w"), indent=1)
  rows_list = [int(r) for r in args.rows.split(",")]
  example_cfg = {name: {"fwd": EXAMPLE_FWD_CONFIGS[0], "dlhs": EXAMPLE_FWD_CONFIGS[0],
                        "t": EXAMPLE_T_CONFIG} for name in SHAPES}
  if args.sweep:
    example_cfg = sweep(65536, result["sweep"])
    save()
  print("== permute / combine", flush=True)
  bench_dispatch(result["dispatch"])
  save()
  print("== grouped matmul", flush=True)
  for m in rows_list:
    for name in SHAPES:
      for skew in ("balanced", "skewed"):
        try:
          bench_gmm_case(m, name, skew, result["gmm"], args.skip_slow or m != 65536,
                         example_cfg[name])
        except Exception as e:  # pylint: disable=broad-except
          print(f"  {m} {name} {skew} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
        save()
  table = markdown(result)
  open(os.path.join(args.out, "kernels.md"), "w").write(table)
  print(table)


def markdown(result):
  meta = result["meta"]
  lines = [f"{meta['device']}, jax {meta['jax']}, {meta['date']}, {meta['groups']} groups, bf16",
           "", "| rows | shape | skew | op | ms | TFLOP/s |", "| --- | --- | --- | --- | --- | --- |"]
  for r in result["gmm"]:
    for label, ms in r["ms"].items():
      lines.append(f"| {r['rows']} | {r['shape']} K={r['K']} N={r['N']} | {r['skew']} | {label} "
                   f"| {ms:.3f} | {r['tflops'][label]:.1f} |")
  lines += ["", "| op | ms | TB/s |", "| --- | --- | --- |"]
  lines += [f"| {r['op']} | {r['ms']:.3f} | {r['TB/s']:.2f} |" for r in result["dispatch"]]
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  main()
