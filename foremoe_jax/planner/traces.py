"""Routing traces -> counts: captured routes to per-micro-step counts, and the DeepSeek ESFT trace reader.

ESFT files (see ../shared/traces/README.md): `<task>/expert_weights_<layer>.txt.gz`, one line per
sequence, the top-k expert ids token-major before a double tab. Trace data is read in place, never copied.
"""

from __future__ import annotations

import gzip
import os
import pathlib

import numpy as np

ESFT_DIR = "esft_deepseek_v2_lite"
ESFT_TASKS = ("intent", "law", "summary", "translation")
ESFT_EXPERTS, ESFT_TOP_K = 64, 6


def traces_root() -> pathlib.Path:
  """$FOREMOE_TRACES, else ../shared/traces next to the repository."""
  override = os.environ.get("FOREMOE_TRACES")
  if override:
    return pathlib.Path(override)
  return pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "traces"


def counts_from_routes(routes_NxLxK, micro_step_N, device_N, num_micro_steps: int, num_devices: int,
                       num_experts: int) -> np.ndarray:
  """int64 [M, L, D, E]: (token, expert) pairs per micro-step, layer, source device and expert."""
  routes = np.asarray(routes_NxLxK)
  micro_step_N, device_N = np.asarray(micro_step_N), np.asarray(device_N)
  if routes.ndim != 3:
    raise ValueError(f"routes must have rank 3 [N, L, k], got shape {routes.shape}")
  num_tokens, num_layers, _ = routes.shape
  if micro_step_N.shape != (num_tokens,) or device_N.shape != (num_tokens,):
    raise ValueError(f"micro_step_N and device_N must have shape ({num_tokens},)")
  for name, values, bound in (("routes", routes, num_experts), ("micro_step_N", micro_step_N, num_micro_steps),
                              ("device_N", device_N, num_devices)):
    if values.size and (values.min() < 0 or values.max() >= bound):
      raise ValueError(f"{name} has values outside [0, {bound})")
  bin_N = (micro_step_N.astype(np.int64) * num_layers)[:, None, None] + np.arange(num_layers)[None, :, None]
  bin_N = (bin_N * num_devices + device_N[:, None, None]) * num_experts + routes.astype(np.int64)
  size = num_micro_steps * num_layers * num_devices * num_experts
  return np.bincount(bin_N.ravel(), minlength=size).reshape(num_micro_steps, num_layers, num_devices, num_experts)


def _esft_layer_files(root: pathlib.Path, task: str) -> list[pathlib.Path]:
  task_dir = pathlib.Path(root) / ESFT_DIR / task
  if not task_dir.is_dir():
    raise FileNotFoundError(f"no ESFT trace directory {task_dir}")
  return sorted(task_dir.glob("expert_weights_*.txt.gz"), key=lambda p: int(p.name.split("_")[-1].split(".")[0]))


def _read_esft_layer(path: pathlib.Path, with_weights: bool) -> list:
  """Per sequence of one layer file: int16 [N_tokens, k] ids, or (ids, float32 [N_tokens, k] gate weights)."""
  out = []
  with gzip.open(path, "rt") as f:
    for line in f:
      if not line.strip():
        continue
      ids, weights = line.rstrip("\n").split("\t\t")
      ids_NxK = np.array(ids.split("\t"), np.int16).reshape(-1, ESFT_TOP_K)
      out.append((ids_NxK, np.array(weights.split("\t"), np.float32).reshape(ids_NxK.shape)) if with_weights
                 else ids_NxK)
  return out


def load_esft_task(root: pathlib.Path, task: str) -> list[np.ndarray]:
  """Per sequence, int16 [N_tokens, L=26, k=6] routes of one ESFT task (MoE layers 1..26)."""
  per_layer = [_read_esft_layer(path, False) for path in _esft_layer_files(root, task)]
  return [np.stack([layer[i] for layer in per_layer], axis=1) for i in range(len(per_layer[0]))]


def load_esft_stream(root: pathlib.Path, tasks=ESFT_TASKS, num_layers: int = 26) -> tuple[np.ndarray, np.ndarray]:
  """The sequences of `tasks` (in order) as one token stream of MoE layers 1..num_layers:
  (int16 ids [S, num_layers, 6], float32 gate weights [S, num_layers, 6])."""
  if not 1 <= num_layers <= 26:
    raise ValueError(f"ESFT traces have MoE layers 1..26, asked for {num_layers}")
  ids, weights = [], []
  for task in tasks:
    per_layer = [_read_esft_layer(path, True) for path in _esft_layer_files(root, task)[:num_layers]]
    for part, out in ((0, ids), (1, weights)):
      out.append(np.stack([np.concatenate([seq[part] for seq in layer]) for layer in per_layer], axis=1))
  return np.concatenate(ids), np.concatenate(weights)


def sample_micro_steps(sequences: list[np.ndarray], num_micro_steps: int, num_devices: int, tokens_per_device: int,
                       rng: np.random.Generator):
  """Fills every (micro-step, device) bin with exactly tokens_per_device tokens of random whole sequences.

  Sequences are drawn with replacement (the traces hold fewer tokens than a step); the last sequence of a
  bin is cut to the budget, as a packer with a fixed token budget would. Returns (routes, micro_step_N, device_N).
  """
  routes, micro, device = [], [], []
  for m in range(num_micro_steps):
    for d in range(num_devices):
      left = tokens_per_device
      while left > 0:
        seq = sequences[rng.integers(len(sequences))][:left]
        routes.append(seq)
        left -= len(seq)
      micro.append(np.full(tokens_per_device, m, np.int32))
      device.append(np.full(tokens_per_device, d, np.int32))
  return np.concatenate(routes), np.concatenate(micro), np.concatenate(device)


def esft_step_counts(pools: dict[str, list[np.ndarray]], tasks, num_micro_steps: int, num_devices: int,
                     tokens_per_device: int, rng: np.random.Generator) -> np.ndarray:
  """int64 [M, 26, D, 64]: one step's counts from the sequences of `tasks` mixed (one task = single-task)."""
  sequences = [seq for task in tasks for seq in pools[task]]
  per_micro_step = []
  for _ in range(num_micro_steps):  # one micro-step at a time keeps the route arrays small
    routes, micro, device = sample_micro_steps(sequences, 1, num_devices, tokens_per_device, rng)
    per_micro_step.append(counts_from_routes(routes, micro, device, 1, num_devices, ESFT_EXPERTS))
  return np.concatenate(per_micro_step)
