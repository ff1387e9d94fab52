"""A trained model's routing for the RL step: trace routes (../shared/traces) mapped onto this model's experts.

A randomly initialised router spreads tokens almost evenly, so balancing policies compared on its routes
compete over an imbalance no trained model has. `TraceRoutes` replaces a rollout's captured routes with
routes read from a trace; the trainer calls it right after the rollout (`GRPOTrainer.route_hook`), so the
counts, the plans and the replayed routes all see the trace's routing. Fixed rules (numpy, deterministic):

- layers: model MoE layer l replays trace layer l mod L_t.
- experts, E_t trace experts onto E model experts: if E_t > E they fold, trace expert e becomes e mod E
  and the gate weights of experts that fold together add up; if E_t <= E they are replicated in turn:
  the i-th route to trace expert e in a layer's stream goes to replica i mod R_e of e, e + E_t, e + 2 E_t,
  ... (< E), so its R_e replicas share e's load equally and the skew is kept.
- top-k: the k distinct experts of highest (summed) weight, in that order. Where fewer than k remain
  (folding merged some, or k > k_t) the experts after the first choice, cyclically, fill in: a token
  never repeats an expert, and fillers spread over experts instead of making one hot.
- windows: the trace's sequences concatenated into one token stream. The rows of a GRPO group share a
  prompt, and a deterministic model routes identical prompts identically, so the group's prompt
  positions read one window of the stream; each row's completion reads a window of its own. Window
  starts are drawn from `seed`: the same rollout shape and seed give the same routes.
- positions at or past a row's length keep their live value (the micro-batch builder gives them spread
  filler routes; they are masked out of the loss).
"""
from __future__ import annotations

import logging
import os
import pathlib

import numpy as np

from foremoe_jax.planner import traces

log = logging.getLogger(__name__)


def occurrence(ids_SxLxK) -> np.ndarray:
  """int64 [S, L, k]: how many earlier routes of the same layer (token-major) chose the same expert."""
  s, l, k = ids_SxLxK.shape
  flat_LxN = np.asarray(ids_SxLxK).transpose(1, 0, 2).reshape(l, s * k)
  order_LxN = np.argsort(flat_LxN, axis=1, kind="stable")
  sorted_LxN = np.take_along_axis(flat_LxN, order_LxN, 1)
  pos_N = np.arange(s * k)
  new_LxN = np.concatenate([np.ones((l, 1), bool), sorted_LxN[:, 1:] != sorted_LxN[:, :-1]], 1)
  rank_LxN = np.empty((l, s * k), np.int64)
  np.put_along_axis(rank_LxN, order_LxN, pos_N - np.maximum.accumulate(np.where(new_LxN, pos_N, 0), 1), 1)
  return rank_LxN.reshape(l, s, k).transpose(1, 0, 2)


def map_experts(ids_SxLxK, weights_SxLxK, trace_experts: int, num_experts: int, top_k: int) -> np.ndarray:
  """int32 [S, L, top_k]: each stream token's trace top-k_t as this model's top-k (rules above)."""
  ids = np.asarray(ids_SxLxK).astype(np.int32)
  weights = np.asarray(weights_SxLxK, np.float32)
  if ids.ndim != 3 or weights.shape != ids.shape:
    raise ValueError(f"trace ids and weights must both be [S, L, k], got {ids.shape} and {weights.shape}")
  if ids.size and (ids.min() < 0 or ids.max() >= trace_experts):
    raise ValueError(f"trace expert ids must be in [0, {trace_experts}), got [{ids.min()}, {ids.max()}]")
  if not np.isfinite(weights).all() or (weights < 0).any():
    raise ValueError("trace gate weights must be finite and >= 0")
  if not 1 <= top_k <= num_experts:
    raise ValueError(f"need 1 <= top_k <= num_experts, got top_k={top_k}, num_experts={num_experts}")
  k_t = ids.shape[-1]
  if trace_experts > num_experts:
    mapped = ids % num_experts
  else:
    replicas = -(-(num_experts - ids) // trace_experts)  # of expert e: e + i * E_t < E
    mapped = ids + trace_experts * (occurrence(ids) % replicas)
  # A duplicate keeps no weight of its own: its weight moves to the first copy.
  same = mapped[..., :, None] == mapped[..., None, :]  # [S, L, k_t, k_t]
  first = ~np.tril(same, -1).any(-1)
  score = np.where(first, (same * weights[..., None, :]).sum(-1), -np.inf)
  top = np.take_along_axis(mapped, score.argmax(-1)[..., None], -1)
  fillers = min(num_experts - 1, top_k + k_t - 1)
  filler_ids = (top + 1 + np.arange(fillers)) % num_experts
  cand_ids = np.concatenate([mapped, filler_ids], -1)
  cand_score = np.concatenate([score, np.broadcast_to(-1.0 - np.arange(fillers), filler_ids.shape)], -1)
  taken = (cand_ids[..., :, None] == cand_ids[..., None, :k_t]) & np.tri(cand_ids.shape[-1], k_t, -1, bool)
  cand_score = np.where(taken.any(-1), -np.inf, cand_score)  # fillers that are real choices already
  order = np.argsort(-cand_score, axis=-1, kind="stable")[..., :top_k]
  return np.take_along_axis(cand_ids, order, -1).astype(np.int32)


def stream_index(lengths_B, prompt_lengths_B, seq_len: int, group_size: int, stream_len: int,
                 seed: int, rows: range | None = None, num_rows: int | None = None) -> np.ndarray:
  """int64 [B, T]: the stream token each position replays, -1 at or past a row's length (live value).
  `rows` of `num_rows` (default: all B): these are rows `rows` of a larger batch (one process's block),
  and get the windows they get in the whole batch."""
  lengths_B, prompt_B = np.asarray(lengths_B, np.int64), np.asarray(prompt_lengths_B, np.int64)
  (b,) = lengths_B.shape
  rows = range(b) if rows is None else rows
  num_rows = b if num_rows is None else num_rows
  if prompt_B.shape != (b,) or num_rows % group_size or len(rows) != b or rows.stop > num_rows:
    raise ValueError(f"lengths {lengths_B.shape} and prompt_lengths {prompt_B.shape} must be [B] = rows "
                     f"[{rows.start}, {rows.stop}) of a batch of {num_rows}, a multiple of group_size={group_size}")
  if ((prompt_B < 0) | (prompt_B > lengths_B) | (lengths_B > seq_len)).any():
    raise ValueError(f"need 0 <= prompt_length <= length <= T={seq_len} in every row")
  if stream_len < seq_len:
    raise ValueError(f"the trace stream has {stream_len} tokens, fewer than one row of T={seq_len}")
  rng = np.random.default_rng(seed)
  prompt_start_B = np.repeat(rng.integers(0, stream_len - seq_len + 1, num_rows // group_size), group_size)[
      rows.start:rows.stop]
  completion_start_B = rng.integers(0, stream_len - seq_len + 1, num_rows)[rows.start:rows.stop]
  t_T = np.arange(seq_len)
  index = np.where(t_T < prompt_B[:, None], prompt_start_B[:, None] + t_T,
                   completion_start_B[:, None] + t_T - prompt_B[:, None])
  return np.where(t_T < lengths_B[:, None], index, -1)


class TraceRoutes:
  """fn(rollout) -> rollout with its routes replaced by trace routes, for `GRPOTrainer.route_hook`."""

  def __init__(self, ids_SxLxK, weights_SxLxK, *, trace_experts: int, num_experts: int, num_layers: int,
               top_k: int, group_size: int, seed: int = 0, source: str = "trace"):
    l_t = np.shape(ids_SxLxK)[1] if np.ndim(ids_SxLxK) == 3 else 0
    if l_t < 1:
      raise ValueError(f"trace ids must be [S, L, k] with L >= 1, got shape {np.shape(ids_SxLxK)}")
    mapped = map_experts(ids_SxLxK, weights_SxLxK, trace_experts, num_experts, top_k)
    self.mapped_SxLxK = mapped[:, np.arange(num_layers) % l_t]
    self.group_size, self.seed, self.source = group_size, seed, source

  def routes(self, routes_BxTxLxK, lengths_B, prompt_lengths_B, rows=None, num_rows=None) -> np.ndarray:
    routes = np.asarray(routes_BxTxLxK)
    if routes.ndim != 4 or routes.shape[2:] != self.mapped_SxLxK.shape[1:]:
      raise ValueError(f"rollout routes have shape {routes.shape}; the trace routes were built for "
                       f"[B, T, L, k] with (L, k) = {self.mapped_SxLxK.shape[1:]}")
    index_BxT = stream_index(lengths_B, prompt_lengths_B, routes.shape[1], self.group_size,
                             len(self.mapped_SxLxK), self.seed, rows, num_rows)
    return np.where((index_BxT >= 0)[..., None, None], self.mapped_SxLxK[np.maximum(index_BxT, 0)],
                    routes).astype(routes.dtype)

  def __call__(self, roll, rows: range | None = None, num_rows: int | None = None):
    """`roll` holds rows `rows` of `num_rows` (one process's block; default: the whole batch)."""
    return roll._replace(routes=self.routes(roll.routes, roll.lengths, roll.prompt_lengths, rows, num_rows))


def resolve(spec: str) -> tuple[pathlib.Path | None, str]:
  """`--routes` value -> (trace root or None for live routes, what the run used, for its JSON).

  `live`; `traces` (root: $FOREMOE_TRACES, else <repo>/../shared/traces; if the default is missing the
  run falls back to live routes, logged and named in the note); `traces:ROOT`. An explicit root, or
  $FOREMOE_TRACES, that holds no ESFT traces is an error naming the path.
  """
  kind, _, root = spec.partition(":")
  if kind == "live" and not root:
    return None, "live"
  if kind != "traces":
    raise ValueError(f"--routes must be live, traces or traces:ROOT, got {spec!r}")
  explicit = bool(root) or bool(os.environ.get("FOREMOE_TRACES"))
  path = pathlib.Path(root) if root else traces.traces_root()
  if not (path / traces.ESFT_DIR).is_dir():
    if explicit:
      raise FileNotFoundError(f"no ESFT traces at {path} (want {path / traces.ESFT_DIR})")
    log.warning("no ESFT traces at %s: live routes (set FOREMOE_TRACES or --routes traces:ROOT)", path)
    return None, f"live (traces not found at {path})"
  return path, f"traces ({path / traces.ESFT_DIR})"


def esft_trace_routes(root: pathlib.Path, *, num_experts: int, num_layers: int, top_k: int, group_size: int,
                      seed: int = 0, tasks=traces.ESFT_TASKS) -> TraceRoutes:
  """TraceRoutes over the ESFT DeepSeek-V2-Lite traces (64 experts, top-6, 26 MoE layers) of `tasks`."""
  ids, weights = traces.load_esft_stream(root, tasks, num_layers=min(num_layers, 26))
  return TraceRoutes(ids, weights, trace_experts=traces.ESFT_EXPERTS, num_experts=num_experts,
                     num_layers=num_layers, top_k=top_k, group_size=group_size, seed=seed,
                     source=f"ESFT {'+'.join(tasks)}, layers 1..{min(num_layers, 26)}")
