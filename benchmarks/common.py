"""What the benchmarks share (add here; other benchmarks import them).

The Qwen3-30B-A3B-shaped MoE layer stack of `moe_step.py` (`stack_setup`) and its routes (the trace mapping,
ideal routes, counts, route files), the planners' cost model at given rates (`plan_cost`), results files
(`save`) and the `--smoke` switch (`parse_with_smoke`); and:
`expert_mesh(d)`: a (data=1, expert=d) mesh over the first d devices (several EP sizes in one process).
`abstract_model(cfg, mesh)`: the model with shapes and dtypes only (`nnx.eval_shape`; it drops the shardings
the model's `device_put`s give); `with_shardings(tree, like)` puts back those of a same-structure tree.
`memory_stats(compiled)`: `compiled.memory_analysis()` as a dict of bytes (per device for a sharded program).
`shard_bytes(tree)`: bytes one device holds of a tree of arrays / ShapeDtypeStructs with shardings.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import pathlib
import shlex
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from foremoe_jax.planner import CostModel, traces  # noqa: E402

E, K, H, F = 128, 8, 2048, 768  # experts, top-k, hidden, expert hidden (Qwen3-30B-A3B)
MICRO_STEPS, TRACE_LAYERS, SEED = 8, (4, 10, 16, 22), 0  # the defaults that name the route files
PLAN_RATES = (600.0, 130.0, 175.0)  # grouped GEMM TFLOP/s, GB/s per move, all_to_all GB/s (4 x H200)
MEMORY_FIELDS = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
                 "generated_code_size_in_bytes")


def plan_cost(tflops: float, link_gbs: float, a2a_gbs: float, hidden: int = H, expert_hidden: int = F) -> CostModel:
  """The planners' cost model at these rates (see moe_step.py --plan-rates)."""
  return CostModel(hidden=hidden, expert_intermediate=expert_hidden, matmul_flops_per_s=tflops * 1e12,
                   link_bytes_per_s=link_gbs * 1e9, a2a_bytes_per_s=a2a_gbs * 1e9)


def map_routes_64_to_128(routes_NxLx6: np.ndarray) -> np.ndarray:
  """uint8 [N, L, 8]: DeepSeek-V2-Lite routes (64 experts, top-6) as 128 experts, top-8, by a fixed rule.

  Trace expert e becomes experts 2e and 2e+1; a token's first two listed choices take both halves
  (4 experts), each of its other four choices j takes one half, 2e + (n + j) % 2 by the token's index n.
  This keeps each trace expert's load (split over its two halves) and gives 8 distinct experts per token.
  """
  e = routes_NxLx6.astype(np.int16)
  n = np.arange(e.shape[0])[:, None, None]
  both = np.stack([2 * e[..., :2], 2 * e[..., :2] + 1], axis=-1).reshape(*e.shape[:2], 4)
  rest = 2 * e[..., 2:] + (n + np.arange(2, 6)) % 2
  return np.concatenate([both, rest], axis=-1).astype(np.uint8)


def route_file(data_dir, num_devices, tokens, micro_steps=MICRO_STEPS, trace_layers=TRACE_LAYERS, seed=SEED):
  """The npz `moe_step.py --make-data` writes for these settings."""
  return pathlib.Path(data_dir) / (f"moe_routes_D{num_devices}_T{tokens}_M{micro_steps}"
                                   f"_L{'-'.join(map(str, trace_layers))}_s{seed}.npz")


def counts_of(routes_MxNxLxK: np.ndarray, num_devices: int) -> np.ndarray:
  """int64 [M, L, D, E]; token n of a micro-step lives on device n // tokens_per_device."""
  m, n, l, _ = routes_MxNxLxK.shape
  device = np.repeat(np.arange(num_devices), n // num_devices)
  return np.concatenate([traces.counts_from_routes(r, np.zeros(n, np.int32), device, 1, num_devices, E)
                         for r in routes_MxNxLxK])


def ideal_routes(m: int, n: int, l: int, permute: bool = True) -> np.ndarray:
  """uint8 [m, n, l, K]: every expert gets the same pairs from every source (perfect balance).

  Token n takes experts pi_l((K*n + j) % E), j < K, with pi_l a fixed random permutation per layer, so a
  token's experts spread over devices as real routes do; `permute=False` drops pi_l (each token's K
  experts consecutive, all on one device).
  """
  routes = (K * np.arange(n)[:, None] + np.arange(K)[None, :]) % E
  perms = [np.random.default_rng(seed).permutation(E) if permute else np.arange(E) for seed in range(l)]
  routes_NxLxK = np.stack([perm[routes] for perm in perms], axis=1)
  return np.broadcast_to(routes_NxLxK[None], (m, n, l, K)).astype(np.uint8)


def stack_setup(args, num_devices: int):
  """(mesh, MoEConfig, loss_fn) of the benchmark's layer stack on a (data=1, expert=D) mesh: E experts,
  top-K, S = E/D + 1 slots per device, bf16; the loss is the mean squared error to batch["target"]."""
  import jax.numpy as jnp

  from foremoe_jax import MoEConfig

  mesh = expert_mesh(num_devices)
  cfg = MoEConfig(d_model=args.hidden, d_ff_expert=args.expert_hidden, num_experts=E, top_k=K,
                  slots_per_device=E // num_devices + 1, dispatch="padded", dtype=jnp.bfloat16,
                  param_dtype=jnp.bfloat16, gmm_backend=args.gmm_backend, dispatch_backend=args.dispatch_backend)

  def loss_fn(model, batch, *, tables, working, capacity):
    out = model(batch["x"], tables, batch["replay"], capacity=capacity, working=working)
    err = out.y.astype(jnp.float32) - batch["target"].astype(jnp.float32)
    return jnp.mean(err * err), {"dropped": out.dropped}
  return mesh, cfg, loss_fn


def save(args, result: dict) -> None:
  """Merges one EP size's result (`result["D"]`, `result["exchange"]`) into the JSON at --out."""
  if not args.out:
    return
  import jax
  path = pathlib.Path(args.out)
  doc = json.loads(path.read_text()) if path.exists() else {"runs": {}}
  suffix = "" if result.get("exchange", "all_to_all") == "all_to_all" else f"_{result['exchange']}"
  doc["runs"][f"D{result['D']}{suffix}"] = result
  doc["meta"] = dict(card=jax.devices()[0].device_kind, gpus_visible=jax.device_count(), jax=jax.__version__,
                     date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                     command=shlex.join(["python", *sys.argv]))
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(doc, indent=1))


def parse_with_smoke(ap: argparse.ArgumentParser, smoke: dict, help: str = "tiny shapes (CPU)") -> argparse.Namespace:
  """Adds `--smoke` and parses; with it, `smoke`'s values replace the parsed arguments."""
  ap.add_argument("--smoke", action="store_true", help=help)
  args = ap.parse_args()
  if args.smoke:
    for key, value in smoke.items():
      setattr(args, key, value)
  return args


def expert_mesh(expert: int):
  """Auto axes, as `foremoe_jax.mesh.make_mesh`, but over the first `expert` devices of a larger box."""
  import jax
  from jax.sharding import AxisType

  from foremoe_jax.mesh import AXES
  if expert > jax.device_count():
    raise ValueError(f"EP {expert} needs {expert} devices, JAX sees {jax.device_count()} "
                     "(on CPU: XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  return jax.make_mesh((1, expert), AXES, axis_types=(AxisType.Auto,) * 2, devices=jax.devices()[:expert])


def abstract_model(cfg, mesh):
  from flax import nnx

  from foremoe_jax.model import Model
  return nnx.eval_shape(lambda: Model(cfg, mesh=mesh, rngs=nnx.Rngs(0)))


def with_shardings(tree, like):
  """ShapeDtypeStructs of `tree`'s shapes and dtypes with the shardings of `like`'s leaves (same structure)."""
  import jax
  return jax.tree.map(lambda a, b: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=b.sharding), tree, like)


def memory_stats(compiled) -> dict[str, int]:
  stats = compiled.memory_analysis()
  if stats is None:
    raise RuntimeError("this backend's compiled program has no memory analysis")
  return {name.removesuffix("_size_in_bytes"): int(getattr(stats, name)) for name in MEMORY_FIELDS}


def shard_bytes(tree, shardings=None) -> int:
  """Bytes of one device's shard of every leaf (the largest shard where shards differ in size);
  `shardings`: a matching tree of shardings to use instead of the leaves' own."""
  import jax
  leaves = jax.tree.leaves(tree)
  found = [a.sharding for a in leaves] if shardings is None else jax.tree.leaves(shardings)
  if len(found) != len(leaves):
    raise ValueError(f"{len(leaves)} leaves but {len(found)} shardings")
  return sum(math.prod(s.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize for a, s in zip(leaves, found))
