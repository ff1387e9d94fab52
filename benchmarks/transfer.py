"""Transfer benchmark: expert moves vs link bandwidth, and how much of a per-micro-step fill is hidden.

For each EP size D (a mesh over the first D devices; no process restart):
1. links: one Qwen3-30B-A3B expert (3 x 2048 x 768 bf16 = 9.4 MB) sent d -> d+1 by `lax.ppermute`,
   `--chain` times in one jitted function (a dependent chain amortizes launch); the same with 256 MB
   (link bandwidth); an even `all_to_all` of 256 MB per device (dispatch bandwidth).
2. compute: the SwiGLU expert FFN forward+backward (`swiglu_experts`, default kernel backend) over
   `tokens * 8` rows in E/D + 1 balanced groups on one device: grouped-GEMM TFLOP/s.
3. overlap: `Executor` steps (forward+backward of `--layers` MoE layers, uniform routes, base = home)
   with the static placement vs placements that fill 1, 2, 4 redundant slots per device per layer from
   other devices, alternating between two such placements so every micro-step refills them (zero token
   share: the math is unchanged, only the transfers differ); each with the refill prefetched behind the
   previous micro-step's compute and without (right before its micro-step).
   hidden % = 1 - (t(fill) - t(static)) / isolated, isolated = the measured time of one micro-step's
   transfers alone (every layer's refill of weights in and fill transpose of gradients back, as the
   executor runs them with `--exchange`).

    python benchmarks/transfer.py --ep 2 4 --out benchmarks/results/transfer.json
    XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_cpu_enable_concurrency_optimized_scheduler=false" \
      JAX_PLATFORMS=cpu python benchmarks/transfer.py --smoke
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

from common import save  # one results file per benchmark, one entry per EP size

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

E, K, H, F = 128, 8, 2048, 768
SMOKE = dict(hidden=64, expert_hidden=64, tokens=64, big_mb=4, chain=2, micro_steps=2, layers=1, repeats=2,
             moves=[1, 2])


def bench(fn, *args, repeats=5):
  """Median seconds of fn(*args) after one warm-up call (compile)."""
  import jax
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def links(args, mesh, num_devices):
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P
  ring = [(d, (d + 1) % num_devices) for d in range(num_devices)]
  spec = P("expert")

  def chain(x):
    for _ in range(args.chain):
      x = jax.lax.ppermute(x, "expert", ring) * 1  # dependent chain: no overlap between sends
    return x

  def a2a(x):
    return jax.lax.all_to_all(x, "expert", 0, 0, tiled=True)

  out = {}
  expert_elems = 3 * args.hidden * args.expert_hidden
  for name, elems, fn, count in (("expert", expert_elems, chain, args.chain),
                                 ("big", args.big_mb * 2 ** 20 // 2, chain, args.chain),
                                 ("all_to_all", args.big_mb * 2 ** 20 // 2, a2a, 1)):
    elems = elems // num_devices * num_devices
    x = jax.device_put(jax.random.normal(jax.random.key(0), (num_devices * elems,), jnp.bfloat16),
                       NamedSharding(mesh, spec))
    f = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=spec, out_specs=spec))
    seconds = bench(f, x, repeats=args.repeats) / count
    moved = elems * 2 * ((num_devices - 1) / num_devices if name == "all_to_all" else 1)
    out[name] = dict(mbytes=elems * 2 / 1e6, ms=seconds * 1e3, gbytes_per_s=moved / seconds / 1e9)
  return out


def exchanges(args, mesh, num_devices):
  """Every device sends n experts to every other device (n in --moves), three ways: D - 1 ppermute
  rounds of n rows, one all_to_all of n rows per peer (its own block is sent too), and one
  ragged_all_to_all of exactly n rows per other peer (GPU/TPU only). ms per exchange."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P
  row = 3 * args.hidden * args.expert_hidden
  spec = P("expert")

  def rounds(x_DNxR):
    me = jax.lax.axis_index("expert")
    blocks = x_DNxR.reshape(num_devices, -1, row)
    out = blocks
    for r in range(1, num_devices):
      got = jax.lax.ppermute(blocks[(me + r) % num_devices], "expert",
                             [(d, (d + r) % num_devices) for d in range(num_devices)])
      out = out.at[(me - r) % num_devices].set(got)
    return out.reshape(x_DNxR.shape)

  def a2a(x_DNxR):
    blocks = x_DNxR.reshape(num_devices, -1, row)
    return jax.lax.all_to_all(blocks, "expert", 0, 0, tiled=True).reshape(x_DNxR.shape)

  def ragged(x_DNxR):
    n = x_DNxR.shape[0] // num_devices
    me = jax.lax.axis_index("expert")
    peers = jnp.arange(num_devices, dtype=jnp.int32)
    sizes = jnp.where(peers == me, 0, n).astype(jnp.int32)
    offsets = (peers * n).astype(jnp.int32)
    into_peer = jnp.full((num_devices,), me * n, jnp.int32)  # my block in every peer's output
    return jax.lax.ragged_all_to_all(x_DNxR, jnp.zeros_like(x_DNxR), offsets, sizes, into_peer, sizes,
                                     axis_name="expert")

  out = {}
  ways = (("ppermute_rounds", rounds), ("all_to_all", a2a)) + (
      (("ragged_all_to_all", ragged),) if jax.devices()[0].platform != "cpu" else ())
  for n in args.moves:
    x = jax.device_put(jnp.ones((num_devices * num_devices * n, row), jnp.bfloat16), NamedSharding(mesh, spec))
    for name, fn in ways:
      f = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=spec, out_specs=spec))
      try:
        out[f"{name}_{n}"] = dict(experts_per_peer=n, ms=bench(f, x, repeats=args.repeats) * 1e3)
      except Exception as err:  # a collective this backend lacks: say so in the results
        out[f"{name}_{n}"] = dict(experts_per_peer=n, error=repr(err)[:200])
  return out


def compute(args, num_devices):
  import jax
  import jax.numpy as jnp
  from foremoe_jax.moe import swiglu_experts
  rows, groups = args.tokens * K, E // num_devices + 1
  sizes = jnp.full((groups,), rows // groups, jnp.int32).at[0].add(rows - rows // groups * groups)
  keys = jax.random.split(jax.random.key(2), 3)
  x = jax.random.normal(keys[0], (rows, args.hidden), jnp.bfloat16)
  w1 = jax.random.normal(keys[1], (groups, args.hidden, 2 * args.expert_hidden), jnp.bfloat16) * 0.02
  w2 = jax.random.normal(keys[2], (groups, args.expert_hidden, args.hidden), jnp.bfloat16) * 0.02

  def loss(x, w1, w2):
    return jnp.sum(swiglu_experts(x, sizes, w1, w2, jnp.bfloat16, None).astype(jnp.float32))

  f = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  seconds = bench(f, x, w1, w2, repeats=args.repeats)
  flops = 3 * 2 * 3 * rows * args.hidden * args.expert_hidden  # fwd + 2x bwd, 3 matmuls of h x f
  return dict(rows=rows, groups=groups, ms=seconds * 1e3, tflops=flops / seconds / 1e12)


def fill_placement(num_devices, slots, moves, variant):
  """home + `moves` redundant slots per device holding experts of other devices (zero token share);
  the two variants replicate different experts, so alternating them refills every slot."""
  from foremoe_jax.planner import home_placement
  per = E // num_devices
  placement = home_placement(E, num_devices, slots).copy()
  for d in range(num_devices):
    for i in range(moves):
      src = (d + 1 + i % (num_devices - 1)) % num_devices
      placement[d, per + i] = src * per + i // (num_devices - 1) + variant * moves
  return placement


def overlap(args, mesh, num_devices):
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from foremoe_jax import MoEConfig
  from foremoe_jax.executor import Executor
  from foremoe_jax.step_tables import prepare_step
  from foremoe_jax.moe_stack import MoEStack
  from foremoe_jax.planner import Plan, PlanConfig, home_placement
  from foremoe_jax.transfer import apply_moves, apply_moves_transpose
  from foremoe_jax.trees import index

  slots = E // num_devices + max(args.moves)
  cfg = MoEConfig(d_model=args.hidden, d_ff_expert=args.expert_hidden, num_experts=E, top_k=K, slots_per_device=slots,
                  dispatch="padded", dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)

  def loss_fn(model, batch, *, tables, working, capacity):
    out = model(batch["x"], tables, batch["replay"], capacity=capacity, working=working)
    return jnp.mean(out.y.astype(jnp.float32) ** 2), {}

  model = MoEStack(cfg, args.layers, mesh=mesh, rngs=nnx.Rngs(0))
  ex = Executor(model, optax.sgd(1e-4), loss_fn, mesh, exchange=args.exchange)
  state = list(ex.init(model))  # (params, opt_state), stepped in place below
  slot_rows = NamedSharding(mesh, P("expert"))
  weights = [(jnp.zeros((num_devices * slots, args.hidden, 2 * args.expert_hidden), jnp.bfloat16, device=slot_rows),
              jnp.zeros((num_devices * slots, args.expert_hidden, args.hidden), jnp.bfloat16, device=slot_rows))
             for _ in range(args.layers)]

  def transfers_alone(weights, refill, fill):
    """One micro-step's transfers without its compute: refill (weights in), fill transpose (gradients back)."""
    return [(apply_moves(w, w, index(refill, l), mesh, args.exchange),
             apply_moves_transpose(w, None, index(fill, l), mesh, args.exchange)) for l, w in enumerate(weights)]
  shard = NamedSharding(mesh, P(("data", "expert")))
  routes = (K * np.arange(args.tokens)[:, None] + np.arange(K)) % E  # uniform: every expert equal load
  replay = np.broadcast_to(routes[None, :, None, :], (num_devices, args.tokens, args.layers, K)).astype(np.int32)
  batch = {"x": jax.device_put(jax.random.normal(jax.random.key(3), (num_devices, args.tokens, args.hidden),
                                                 jnp.bfloat16), shard),
           "replay": jax.device_put(replay, shard)}
  batches = [batch] * args.micro_steps
  counts = np.zeros((args.micro_steps, args.layers, num_devices, E), np.int64)
  counts[:] = args.tokens * K // E
  pcfg = PlanConfig(E, num_devices, slots, policy="static")
  home = home_placement(E, num_devices, slots)
  share = np.zeros((num_devices, num_devices * slots), np.float32)
  share[:, home.reshape(-1) >= 0] = 1.0  # replicas get no tokens: identical math, transfer only
  rows = {}
  for moves in [0] + list(args.moves):
    placements = np.stack([fill_placement(num_devices, slots, moves, m % 2) for m in range(args.micro_steps)])
    plan = Plan(np.broadcast_to(placements[:, None], (args.micro_steps, args.layers, *home.shape)).astype(np.int32),
                np.broadcast_to(share, (args.micro_steps, args.layers, *share.shape)).astype(np.float32),
                np.broadcast_to(home, (args.layers, *home.shape)).astype(np.int32), "fill", pcfg)
    step = prepare_step(plan, counts, E, mesh=mesh)
    fill_k = int(step.fill_moves_M[0].send_DxRxK.shape[-1])
    rounds = int(np.asarray(step.fill_moves_M[0].active_R[0]).sum())
    isolated = bench(jax.jit(transfers_alone), weights, step.refill_moves_M[1],
                     step.fill_moves_M[1], repeats=args.repeats) * 1e3 if moves else 0.0
    for prefetch in (True, False) if moves else (True,):
      def one_step():
        state[0], state[1], _ = ex.train_step(*state, batches, step, prefetch=prefetch)
        return state[0]
      ms = bench(one_step, repeats=args.repeats) * 1e3 / args.micro_steps
      rows[f"{moves}{'' if prefetch else '_serial'}"] = dict(
          moves=moves, prefetch=prefetch, micro_ms=ms, fill_k=fill_k, active_rounds=rounds,
          isolated_transfer_ms=isolated, capacity=step.capacity, refilled_slots=step.refilled_slots)
  for row in rows.values():
    extra = row["micro_ms"] - rows["0"]["micro_ms"]
    row["extra_ms"] = extra
    row["hidden_pct"] = 100 * (1 - extra / row["isolated_transfer_ms"]) if row["moves"] else None
  return rows


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--ep", type=int, nargs="+", default=[2, 4])
  ap.add_argument("--hidden", type=int, default=H)
  ap.add_argument("--expert-hidden", type=int, default=F)
  ap.add_argument("--tokens", type=int, default=4096, help="tokens per device per micro-step")
  ap.add_argument("--layers", type=int, default=2)
  ap.add_argument("--micro-steps", type=int, default=4)
  ap.add_argument("--moves", type=int, nargs="+", default=[1, 2, 4], help="filled slots per device per layer")
  ap.add_argument("--big-mb", type=int, default=256)
  ap.add_argument("--chain", type=int, default=20)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--exchange", default="all_to_all", help="how the executor moves rows (transfer.EXCHANGES)")
  ap.add_argument("--out", default=None)
  ap.add_argument("--smoke", action="store_true")
  args = ap.parse_args()
  if args.smoke:
    for key, value in SMOKE.items():
      setattr(args, key, value)
  import jax
  from jax.sharding import AxisType
  if args.smoke:
    jax.config.update("jax_cpu_enable_async_dispatch", False)
  results = []
  for num_devices in args.ep:
    mesh = jax.make_mesh((1, num_devices), ("data", "expert"), axis_types=(AxisType.Auto,) * 2,
                         devices=jax.devices()[:num_devices])
    result = dict(D=num_devices, hidden=args.hidden, expert_hidden=args.expert_hidden, tokens=args.tokens,
                  exchange=args.exchange,
                  layers=args.layers, micro_steps=args.micro_steps)
    for part, fn in (("links", lambda: links(args, mesh, num_devices)),
                     ("exchanges", lambda: exchanges(args, mesh, num_devices)),
                     ("compute", lambda: compute(args, num_devices)),
                     ("overlap", lambda: overlap(args, mesh, num_devices))):
      start = time.perf_counter()
      try:
        result[part] = fn()
      except Exception as err:  # keep the other parts' numbers
        result[part] = {"error": repr(err)[:500]}
      print(f"D={num_devices} {part}: {time.perf_counter() - start:.1f} s  {json.dumps(result[part])[:400]}",
            flush=True)
      save(args, result)
    results.append(result)
  for r in results:
    lk = r["links"]
    if "error" not in lk:
      print(f"D={r['D']} expert {lk['expert']['mbytes']:.1f} MB ppermute {lk['expert']['ms']:.3f} ms "
            f"({lk['expert']['gbytes_per_s']:.0f} GB/s); {args.big_mb} MB ppermute "
            f"{lk['big']['gbytes_per_s']:.0f} GB/s; all_to_all {lk['all_to_all']['gbytes_per_s']:.0f} GB/s")
    if "error" not in r["exchanges"]:
      print(f"D={r['D']} n experts to every peer: " + ", ".join(
          f"{k} {v['ms']:.3f} ms" if "ms" in v else f"{k} failed" for k, v in r["exchanges"].items()))
    if "error" not in r["compute"]:
      print(f"D={r['D']} expert FFN fwd+bwd {r['compute']['ms']:.2f} ms = {r['compute']['tflops']:.0f} TFLOP/s")
    if "error" not in r["overlap"]:
      print("| D | moves/dev/layer | prefetch | micro-step ms | extra ms | isolated transfer ms | hidden % |\n"
            "|---|---|---|---|---|---|---|")
      for row in r["overlap"].values():
        hidden = "" if row["hidden_pct"] is None else f"{row['hidden_pct']:.0f}"
        print(f"| {r['D']} | {row['moves']} | {'yes' if row['prefetch'] else 'no'} | {row['micro_ms']:.2f} | "
              f"{row['extra_ms']:+.2f} | {row['isolated_transfer_ms']:.2f} | {hidden} |")


if __name__ == "__main__":
  main()
