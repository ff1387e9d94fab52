"""Benchmark of pallas_kernels on one GPU: grouped matmul fwd and fwd+bwd, permute/combine.

Shapes: Qwen3-30B-A3B at EP=8 (17 slots per device): M rows in {32K, 64K, 80K}; gate+up K=2048,
N=1536; down K=768, N=2048; balanced and skewed groups. Anchors measured in the same run: XLA dense
matmul of the same FLOPs, XLA batched einsum over the groups (padded to the largest group),
jax.lax.ragged_dot, and JAX's shipped Mosaic GPU example kernels (best of a small block sweep).
Usage: python benchmarks/kernels.py --out DIR [--sweep] [--rows 65536] [--skip-slow]
  [--dispatch-only] [--dispatch-backends xla,triton] [--tokens 8192] [--hidden 2048]
permute/combine run per backend (default xla and the Pallas Triton kernels) next to a device copy;
CPU smoke run: --dispatch-only --dispatch-backends xla,interpret --tokens 64 --hidden 256 [--sweep].
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
# The example's best forward blocks per shape in every sweep so far (H100 run 1, H200 runs 2-4): the
# anchor of a run without --sweep.
EXAMPLE_BEST = {"gate_up": EXAMPLE_FWD_CONFIGS[1], "down": EXAMPLE_FWD_CONFIGS[0]}
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
  tokamax_anchor(rec, res, lhs, rhs, gs, dout, ref)
  if not skip_slow:
    rec("lax.ragged_dot fwd", timeit(ref, lhs, rhs, gs, budget_s=2.0))
    rec("lax.ragged_dot fwd+bwd", timeit(fwd_bwd(ref), lhs, rhs, gs, dout, budget_s=3.0), 3)
  res["vs_dense"] = vs_dense(res["tflops"])
  print(f"  {m:>6} {name:<8} {skew:<8} ours / xla dense: fwd {res['vs_dense']['fwd']:.3f} "
        f"(target {TARGETS[name]:.2f}), fwd+bwd {res['vs_dense']['fwd+bwd']:.3f} (target {TARGETS['fwd+bwd']:.2f})",
        flush=True)
  rows.append(res)


# Issue targets: our rate over XLA's dense matmul of the same FLOPs in the same run (fwd+bwd: three of them).
TARGETS = {"gate_up": 0.90, "down": 0.85, "fwd+bwd": 0.85}


def vs_dense(tflops: dict) -> dict:
  """Our forward and fwd+bwd rates over the dense matmul's (fwd+bwd rates already count 3 x 2MKN)."""
  dense = tflops["xla dense"]
  return {"fwd": tflops["ours fwd"] / dense, "fwd+bwd": tflops["ours fwd+bwd"] / dense}


def tokamax_anchor(rec, res, lhs, rhs, gs, dout, ref):
  """tokamax.ragged_dot's Mosaic GPU implementation, if tokamax imports (wheels carried to the GPU)."""
  try:
    import tokamax  # pylint: disable=g-import-not-at-top
  except Exception as e:  # pylint: disable=broad-except
    res["tokamax"] = f"unavailable: {type(e).__name__}: {str(e)[:160]}"
    return
  for impl in ("mosaic", "mosaic_gpu"):
    tk = lambda a, b, g, impl=impl: tokamax.ragged_dot(a, b, g, implementation=impl)  # noqa: E731
    try:
      res["rel_err_tokamax"] = rel_err(jax.jit(tk)(lhs, rhs, gs), ref(lhs, rhs, gs))
    except Exception as e:  # pylint: disable=broad-except
      res["tokamax"] = f"implementation={impl!r} failed: {type(e).__name__}: {str(e)[:200]}"
      continue
    res["tokamax"] = f"tokamax {getattr(tokamax, '__version__', '?')} implementation={impl!r}"
    rec("tokamax fwd", timeit(jax.jit(tk), lhs, rhs, gs))
    rec("tokamax fwd+bwd", timeit(fwd_bwd(tk), lhs, rhs, gs, dout), 3)
    return


def sweep(m, out_rows):
  """Block sweep at m rows, both shapes: our gmm/tgmm configs and the example's.

  Each of our configs runs on balanced and on skewed groups and is scored by the two times' sum (the MoE
  step meets both; a tile order that wins on balanced groups lost 17% on skewed ones on H100, run 7).
  The winners become the tuned defaults (this card's `mosaic_gmm.tuned()`, `mosaic_tgmm.tuned()`) for the
  rest of the run, and are printed in the form to commit.
  """
  best = {}
  for name, (k, n) in SHAPES.items():
    lhs, rhs, dout, gs = inputs(m, k, n, "balanced")
    gs_skewed = group_sizes(m, "skewed")
    flops = 2 * m * k * n
    for label, fn, configs, args, table, key in [
        ("gmm", lambda c: jax.jit(lambda a, b, g: mosaic_gmm.gmm(a, b, g, config=c)),
         GMM_SWEEP, (lhs, rhs), mosaic_gmm.tuned(), (k, n)),
        ("gmm_t", lambda c: jax.jit(lambda a, b, g: mosaic_gmm.gmm(a, b, g, transpose_rhs=True,
                                                                   config=c)),
         GMM_SWEEP, (dout, rhs), mosaic_gmm.tuned(), (n, k)),
        ("tgmm", lambda c: jax.jit(lambda a, b, g: mosaic_tgmm.tgmm(a, b, g, config=c)),
         TGMM_SWEEP, (lhs, dout), mosaic_tgmm.tuned(), (k, n))]:
      winner = (np.inf, None)
      for cfg in configs:
        try:
          f = fn(cfg)
          t_bal, t_skew = timeit(f, *args, gs, reps=5), timeit(f, *args, gs_skewed, reps=5)
        except Exception as e:  # pylint: disable=broad-except
          print(f"  sweep {name} {label} {cfg} failed: {type(e).__name__}: {str(e)[:160]}")
          continue
        rates = {"balanced": flops / t_bal / 1e12, "skewed": flops / t_skew / 1e12}
        print(f"  sweep {name:<8} {label:<6} {rates['balanced']:7.1f} / {rates['skewed']:7.1f} TFLOP/s "
              f"(balanced / skewed)  {cfg}", flush=True)
        out_rows.append({"shape": name, "op": label, "tflops": rates["balanced"], "tflops_skewed": rates["skewed"],
                         "config": str(cfg)})
        winner = min(winner, (t_bal + t_skew, cfg), key=lambda x: x[0])
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
    mosaic_gmm.GmmConfig(delay_release=1, grid_block_n=4),
    mosaic_gmm.GmmConfig(epi_split=2, max_concurrent_steps=4, delay_release=1),
    mosaic_gmm.GmmConfig(block_n=64, max_concurrent_steps=5, delay_release=1),
    # Warpgroups split the rows: 64 x 256 (or 64 x 192, the example's CTA tile) wgmmas per warpgroup.
    mosaic_gmm.GmmConfig(block_n=256, split_m=True, delay_release=1),
    mosaic_gmm.GmmConfig(block_n=256, split_m=True, max_concurrent_steps=4, epi_split=2, delay_release=1),
    mosaic_gmm.GmmConfig(block_n=192, split_m=True, max_concurrent_steps=4, delay_release=1),
    mosaic_gmm.GmmConfig(block_m=256, split_m=True, delay_release=1),
    # Deeper pipelines and finer epilogues for K=768 (12 k-steps: the per-tile epilogue weighs most there).
    mosaic_gmm.GmmConfig(block_n=256, split_m=True, max_concurrent_steps=5, epi_split=4, delay_release=1),
    mosaic_gmm.GmmConfig(block_n=256, split_m=True, max_concurrent_steps=4, epi_split=2, delay_release=2),
    mosaic_gmm.GmmConfig(block_n=256, split_m=True, max_concurrent_steps=4, epi_split=2, delay_release=1,
                         grid_block_n=4),
]
TGMM_SWEEP = [
    mosaic_tgmm.TgmmConfig(),
    mosaic_tgmm.TgmmConfig(max_concurrent_steps=6),
]


def dispatch_inputs(t_tok, k, d):
  """x[T, D], expert-sorted slots idx_R (token = slot // k), y[T*k, D], the inverse map idx_TxK
  (unique rows) and softmax gate weights."""
  x = jax.random.normal(jax.random.key(1), (t_tok, d), jnp.bfloat16)
  idx_R = jnp.argsort(jax.random.randint(jax.random.key(2), (t_tok * k,), 0, 128)) // k
  inv = jnp.argsort(jnp.argsort(jax.random.randint(jax.random.key(3), (t_tok * k,), 0, 128)))
  idx_TxK = inv.reshape(t_tok, k).astype(jnp.int32)
  y = jax.random.normal(jax.random.key(4), (t_tok * k, d), jnp.bfloat16)
  w = jax.nn.softmax(jax.random.normal(jax.random.key(5), (t_tok, k)), axis=-1)
  return x, idx_R.astype(jnp.int32), y, idx_TxK, w


def rel_diff(a, b):
  """Largest |a - b| over max |b|, worst leaf (outputs and gradients)."""
  return max(float(jnp.max(jnp.abs(u.astype(jnp.float32) - v.astype(jnp.float32)))
                   / jnp.maximum(jnp.max(jnp.abs(v.astype(jnp.float32))), 1e-30))
             for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def bench_dispatch(rows, backends=("xla",), t_tok=8192, d=2048):
  """permute x[T, D] -> [T*k, D] and combine back, bf16, k=8 (T*k = 65,536 at T=8192), per
  backend, against a copy; each non-XLA row records its largest relative difference from XLA's.
  fwd+bwd rows return the forward and the vjp of a random cotangent (nothing for XLA to drop or fold;
  combine's take value_and_grad of a sum, whose all-ones cotangent XLA cannot fold into a gather)."""
  k = 8
  x, idx_R, y, idx_TxK, w = dispatch_inputs(t_tok, k, d)
  # The rows reading each token (the MoE dispatch passes this map: its backward is then a k-row sum).
  inverse_TxK = jnp.argsort(jnp.argsort(jax.random.randint(jax.random.key(2), (t_tok * k,), 0, 128)))
  inverse_TxK = inverse_TxK.reshape(t_tok, k).astype(jnp.int32)
  dy_R = jax.random.normal(jax.random.key(7), (t_tok * k, d), jnp.bfloat16)

  def with_vjp(fn):
    """(fn(x, *idx), d/dx of <fn, cotangent>) for args (x, *idx, cotangent)."""
    def f(a, *rest):
      out, vjp = jax.vjp(lambda u: fn(u, *rest[:-1]), a)
      return out, vjp(rest[-1])
    return jax.jit(f)
  big = jax.random.normal(jax.random.key(6), (t_tok * k, d), jnp.bfloat16)
  row_bytes = d * 2
  copy_bytes = 2 * t_tok * k * row_bytes

  def cases(b):
    return [
        ("permute", jax.jit(lambda a, i: pk.permute(a, i, backend=b)), (x, idx_R),
         (t_tok + t_tok * k) * row_bytes),
        ("combine", jax.jit(lambda a, i, c: pk.combine(a, i, c, backend=b)), (y, idx_TxK, w),
         (t_tok * k + t_tok) * row_bytes),
        ("permute fwd+bwd", with_vjp(lambda a, i: pk.permute(a, i, backend=b)), (x, idx_R, dy_R),
         2 * (t_tok + t_tok * k) * row_bytes),
        ("permute fwd+bwd inverse", with_vjp(lambda a, i, v: pk.permute(a, i, inverse_TxK=v, backend=b)),
         (x, idx_R, inverse_TxK, dy_R), 2 * (t_tok + t_tok * k) * row_bytes),
        ("combine fwd+bwd", jax.jit(jax.value_and_grad(lambda a, i, c: jnp.sum(
            pk.combine(a, i, c, backend=b).astype(jnp.float32)), argnums=(0, 2))),
         (y, idx_TxK, w), 2 * (t_tok * k + t_tok) * row_bytes + t_tok * k * row_bytes),
        ("combine fwd+bwd unique", jax.jit(jax.value_and_grad(lambda a, i, c: jnp.sum(
            pk.combine(a, i, c, unique_rows=True, backend=b).astype(jnp.float32)),
            argnums=(0, 2))), (y, idx_TxK, w),
         2 * (t_tok * k + t_tok) * row_bytes + t_tok * k * row_bytes),
    ]

  t_copy = timeit(jax.jit(lambda a, s: a + s), big, jnp.bfloat16(1))
  copy_tbs = copy_bytes / t_copy / 1e12
  rows.append({"op": "device copy (x + s)", "ms": t_copy * 1e3, "TB/s": copy_tbs})
  print(f"  {'device copy (x + s)':<34} {t_copy * 1e3:8.3f} ms {copy_tbs:6.2f} TB/s", flush=True)
  ref = {label: fn(*args) for label, fn, args, _ in cases("xla")}
  for b in backends:
    for label, fn, args, nbytes in cases(b):
      row = {"op": f"{label} [{b}]"}
      try:
        if b != "xla":
          row["rel_diff_vs_xla"] = rel_diff(fn(*args), ref[label])
        t = timeit(fn, *args)
      except Exception as e:  # pylint: disable=broad-except
        print(f"  {row['op']} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
        continue
      row.update({"ms": t * 1e3, "TB/s": nbytes / t / 1e12, "vs copy": nbytes / t / 1e12 / copy_tbs})
      rows.append(row)
      print(f"  {row['op']:<34} {t * 1e3:8.3f} ms {row['TB/s']:6.2f} TB/s {row['vs copy']:6.1%}"
            + (f"  rel diff vs xla {row['rel_diff_vs_xla']:.2g}" if b != "xla" else ""), flush=True)


def sweep_dispatch(out_rows, interpret=False, t_tok=8192, d=2048):
  """Times the Triton permute/combine forward over triton_dispatch.SWEEP; prints the winners in
  the form to commit as PERMUTE_DEFAULT / COMBINE_DEFAULT."""
  from pallas_kernels import triton_dispatch as td  # pylint: disable=g-import-not-at-top
  k = 8
  x, idx_R, y, idx_TxK, w = dispatch_inputs(t_tok, k, d)
  nbytes = (t_tok * k + t_tok) * d * 2
  for op, fn, args in [("permute", td.gather_rows, (x, idx_R)), ("combine", td.combine, (y, idx_TxK, w))]:
    winner = (0.0, None)
    for cfg in td.SWEEP:
      try:
        t = timeit(jax.jit(functools.partial(fn, config=cfg, interpret=interpret)), *args, reps=5)
      except Exception as e:  # pylint: disable=broad-except
        print(f"  sweep {op} {cfg} failed: {type(e).__name__}: {str(e)[:160]}", flush=True)
        continue
      print(f"  sweep {op:<8} {nbytes / t / 1e12:6.2f} TB/s {t * 1e3:8.3f} ms  {cfg}", flush=True)
      out_rows.append({"op": op, "TB/s": nbytes / t / 1e12, "ms": t * 1e3, "config": str(cfg)})
      winner = max(winner, (nbytes / t / 1e12, cfg), key=lambda r: r[0])
    print(f"  BEST {op.upper()}_DEFAULT = {winner[1]}", flush=True)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/kernels_bench"))
  parser.add_argument("--rows", default="32768,65536,81920")
  parser.add_argument("--sweep", action="store_true")
  parser.add_argument("--skip-slow", action="store_true", help="skip the slow lax.ragged_dot anchor")
  parser.add_argument("--dispatch-only", action="store_true",
                      help="only permute/combine (and their block sweep with --sweep)")
  parser.add_argument("--dispatch-backends", default="xla,triton",
                      help="permute/combine backends to time; 'interpret' for a CPU smoke run")
  parser.add_argument("--tokens", type=int, default=8192, help="permute/combine tokens T (k=8)")
  parser.add_argument("--hidden", type=int, default=2048, help="permute/combine hidden size D")
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  dev = jax.devices()[0]
  meta = {"device": dev.device_kind, "jax": jax.__version__, "date": datetime.datetime.now(
      datetime.timezone.utc).isoformat(timespec="minutes"), "groups": G}
  print(meta, flush=True)
  result = {"meta": meta, "sweep": [], "gmm": [], "dispatch": [], "dispatch_sweep": []}
  save = lambda: json.dump(result, open(os.path.join(args.out, "kernels.json"), "w"), indent=1)
  rows_list = [int(r) for r in args.rows.split(",")]
  example_cfg = {name: {"fwd": EXAMPLE_BEST[name], "dlhs": EXAMPLE_BEST[name], "t": EXAMPLE_T_CONFIG}
                 for name in SHAPES}
  dispatch_backends = args.dispatch_backends.split(",")
  if args.sweep and not args.dispatch_only:
    example_cfg = sweep(65536, result["sweep"])
    save()
  if args.sweep and {"triton", "interpret"} & set(dispatch_backends):
    print("== permute / combine block sweep", flush=True)
    sweep_dispatch(result["dispatch_sweep"], "triton" not in dispatch_backends, args.tokens,
                   args.hidden)
    save()
  print("== permute / combine", flush=True)
  bench_dispatch(result["dispatch"], dispatch_backends, args.tokens, args.hidden)
  save()
  print("== grouped matmul", flush=True)
  for m in [] if args.dispatch_only else rows_list:
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
  lines += ["", "Ours over XLA's dense matmul of the same FLOPs (fwd+bwd: over three); targets: fwd "
            f"{TARGETS['gate_up']} at gate_up, {TARGETS['down']} at down, fwd+bwd {TARGETS['fwd+bwd']}.", "",
            "| rows | shape | skew | ours fwd | xla dense | fwd ratio | ours fwd+bwd | fwd+bwd ratio |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
  lines += [f"| {r['rows']} | {r['shape']} | {r['skew']} | {r['tflops']['ours fwd']:.1f} | "
            f"{r['tflops']['xla dense']:.1f} | {r['vs_dense']['fwd']:.3f} | {r['tflops']['ours fwd+bwd']:.1f} | "
            f"{r['vs_dense']['fwd+bwd']:.3f} |" for r in result["gmm"]]
  lines += ["", "| op | ms | TB/s | vs copy | rel diff vs xla |", "| --- | --- | --- | --- | --- |"]
  lines += [f"| {r['op']} | {r['ms']:.3f} | {r['TB/s']:.2f} | {r.get('vs copy', 1):.0%} | "
            f"{r.get('rel_diff_vs_xla', '-')} |" for r in result["dispatch"]]
  if result["dispatch_sweep"]:
    lines += ["", "| op | TB/s | ms | config |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['op']} | {r['TB/s']:.2f} | {r['ms']:.3f} | `{r['config']}` |"
              for r in result["dispatch_sweep"]]
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  main()
