"""Host-side (numpy) packing of whole sequences into (micro-step, device) bins and rows, and routes -> counts.

A bin (m, d) holds the sequences device d processes in micro-step m, under a budget of real tokens, in R
rows. Greedy longest-first into the least-loaded bin (LPT) keeps, in every micro-step, the device loads
within one sequence length of each other, which is what data-parallel attention/dense compute needs. The
expert load that remains unbalanced is then visible in `counts` and is the planner's job.

Two row layouts, fixed per run (the shapes of a bin never change: R rows of one length):
- one sequence per row (`row_len=None`): row r of bin (m, d) holds sequence `seq_idx[m, d, r]`, right-padded
  to the row length by the caller; -1 = a padding row.
- packed (`row_len=T`, veRL's / slime's "remove padding" with fixed shapes): several sequences back to back
  in each row. Each bin receives its sequences longest first and puts each into the first of its rows with
  room (first-fit decreasing); sequence n starts at column `offset_N[n]` of row `row_N[n]` and is segment
  `segment_N[n]` (1, 2, ... in row order) of that row; columns past the row's last sequence are padding
  (segment 0). `place_rows` builds the row arrays, `segments_and_positions` the per-token segment ids and
  positions (restarting at 0 per sequence) the model masks attention and rotates RoPE with.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np


@dataclasses.dataclass(frozen=True)
class Packing:
  """Where each of N sequences runs: bin (micro_step_N[n], device_N[n]), row row_N[n] of its R rows, from
  column offset_N[n] (0 with one sequence per row)."""

  micro_step_N: np.ndarray  # int32 [N]
  device_N: np.ndarray  # int32 [N]
  num_micro_steps: int
  seq_idx_MxDxR: np.ndarray | None  # int32 [M, D, R] one sequence per row: row r's sequence, -1 = padding row
  tokens_MxD: np.ndarray  # int64 [M, D]: real tokens per bin
  row_N: np.ndarray  # int32 [N]
  offset_N: np.ndarray  # int32 [N]
  segment_N: np.ndarray  # int32 [N] 1-based rank in its row (always 1 with one sequence per row)
  length_N: np.ndarray  # int64 [N]
  num_rows: int  # R
  row_len: int | None  # packed rows' length; None: one sequence per row


def _greedy(lens_N, order, num_bins, budget, rows):
  """LPT into the least-loaded bin with a free row; None when a sequence fits no bin."""
  load_B = np.zeros(num_bins, np.int64)
  used_B = np.zeros(num_bins, np.int64)
  bin_N = np.empty(len(lens_N), np.int64)
  for n in order:
    free_B = np.where(used_B < rows, load_B, np.iinfo(np.int64).max)
    b = int(np.argmin(free_B))  # Ties go to the lowest bin: micro-step 0's devices fill first.
    if free_B[b] + lens_N[n] > budget:
      return None
    bin_N[n], load_B[b], used_B[b] = b, load_B[b] + lens_N[n], used_B[b] + 1
  return bin_N


def _first_fit_rows(lens_N, order, num_bins, budget, rows, row_len):
  """LPT over the bins where the sequence fits (budget and a row with room), first fit over that bin's
  rows: in `order` (longest first) each bin's rows fill first-fit decreasing. -> (bin, row, offset,
  segment) per sequence, or None when a sequence fits no bin."""
  load_B = np.zeros(num_bins, np.int64)
  free_BxR = np.full((num_bins, rows), row_len, np.int64)
  used_BxR = np.zeros((num_bins, rows), np.int64)
  out_4xN = np.empty((4, len(lens_N)), np.int64)
  for n in order:
    fits_BxR = free_BxR >= lens_N[n]
    ok_B = fits_BxR.any(axis=1) & (load_B + lens_N[n] <= budget)
    if not ok_B.any():
      return None
    b = int(np.argmin(np.where(ok_B, load_B, np.iinfo(np.int64).max)))  # ties: the lowest bin
    r = int(np.argmax(fits_BxR[b]))
    out_4xN[:, n] = b, r, row_len - free_BxR[b, r], used_BxR[b, r] + 1
    free_BxR[b, r] -= lens_N[n]
    used_BxR[b, r] += 1
    load_B[b] += lens_N[n]
  return out_4xN


def pack_micro_batches(seq_lens_N, num_devices: int, num_micro_steps: int | None = None, *,
                       tokens_per_device: int, rows_per_bin: int | None = None, row_len: int | None = None,
                       seed: int = 0) -> Packing:
  """Assigns whole sequences to (micro-step, device) bins of at most `tokens_per_device` real tokens.

  num_micro_steps: fixed M, or None for the fewest micro-steps the greedy packing fits in.
  rows_per_bin: fixed R (static shapes across steps), or None for the largest bin's row count (one
    sequence per row only).
  row_len: pack several sequences into each of the R rows of this length; None: one sequence per row.
  seed: breaks ties between equal lengths, so equal-length groups don't always land in index order.
  """
  lens_N = np.asarray(seq_lens_N, np.int64)
  if lens_N.ndim != 1 or lens_N.size == 0 or (lens_N < 0).any():
    raise ValueError(f"pack_micro_batches: seq_lens must be a non-empty 1-D array of lengths >= 0, "
                     f"got shape {lens_N.shape}")
  sizes = [x for x in (num_micro_steps, rows_per_bin, row_len) if x is not None]
  if min(num_devices, tokens_per_device, *sizes) < 1:
    raise ValueError(f"pack_micro_batches: num_devices={num_devices}, tokens_per_device={tokens_per_device}, "
                     f"num_micro_steps={num_micro_steps}, rows_per_bin={rows_per_bin} and row_len={row_len} "
                     "must be >= 1")
  if row_len is not None and rows_per_bin is None:
    raise ValueError("pack_micro_batches: packed rows (row_len) need a fixed rows_per_bin")
  too_long = np.flatnonzero(lens_N > tokens_per_device)
  if too_long.size:
    n = int(too_long[0])
    raise ValueError(f"pack_micro_batches: sequence {n} has {lens_N[n]} tokens, which exceeds the per-device "
                     f"budget tokens_per_device={tokens_per_device} ({too_long.size} such sequences)")
  too_long = np.flatnonzero(lens_N > (row_len or np.iinfo(np.int64).max))
  if too_long.size:
    n = int(too_long[0])
    raise ValueError(f"pack_micro_batches: sequence {n} has {lens_N[n]} tokens, longer than a row of "
                     f"row_len={row_len} ({too_long.size} such sequences)")
  shuffled = np.random.default_rng(seed).permutation(lens_N.size)
  order = shuffled[np.argsort(-lens_N[shuffled], kind="stable")]
  rows = lens_N.size if rows_per_bin is None else rows_per_bin
  if row_len is None:
    fit = functools.partial(_greedy, lens_N, order, budget=tokens_per_device, rows=rows)
    min_bins = max(-(-int(lens_N.sum()) // tokens_per_device), -(-lens_N.size // rows))
  else:
    fit = functools.partial(_first_fit_rows, lens_N, order, budget=tokens_per_device, rows=rows, row_len=row_len)
    min_bins = -(-int(lens_N.sum()) // min(tokens_per_device, rows * row_len))
  if num_micro_steps is None:
    m, placed = max(1, -(-min_bins // num_devices)), None
    while placed is None:  # Ends: with one sequence per bin every sequence fits.
      placed = fit(num_bins=m * num_devices)
      m += placed is None
  else:
    m = num_micro_steps
    placed = fit(num_bins=m * num_devices)
    if placed is None:
      raise ValueError(f"pack_micro_batches: {lens_N.size} sequences ({lens_N.sum()} tokens) don't fit "
                       f"num_micro_steps={m} x num_devices={num_devices} bins of {tokens_per_device} tokens"
                       + ("" if rows_per_bin is None else f" and {rows_per_bin} rows")
                       + ("" if row_len is None else f" of {row_len}"))
  if row_len is None:
    bin_N, seq_idx, row_N = _one_per_row(placed, m * num_devices, rows_per_bin)
    offset_N, segment_N = np.zeros_like(row_N), np.ones_like(row_N)
    seq_idx, r = seq_idx.reshape(m, num_devices, -1), seq_idx.shape[1]
  else:
    bin_N, row_N, offset_N, segment_N = placed
    seq_idx, r = None, rows_per_bin
  return Packing(
      micro_step_N=(bin_N // num_devices).astype(np.int32),
      device_N=(bin_N % num_devices).astype(np.int32),
      num_micro_steps=m,
      seq_idx_MxDxR=seq_idx,
      tokens_MxD=np.bincount(bin_N, weights=lens_N, minlength=m * num_devices).astype(np.int64)
      .reshape(m, num_devices),
      row_N=row_N.astype(np.int32), offset_N=offset_N.astype(np.int32), segment_N=segment_N.astype(np.int32),
      length_N=lens_N, num_rows=r, row_len=row_len,
  )


def _one_per_row(bin_N, num_bins: int, rows_per_bin: int | None):
  """-> (bin_N, seq_idx [bins, R], row_N): a bin's rows hold its sequences in index order."""
  num_rows_B = np.bincount(bin_N, minlength=num_bins)
  r = int(num_rows_B.max()) if rows_per_bin is None else rows_per_bin
  seq_idx = np.full((num_bins, r), -1, np.int32)
  by_bin = np.argsort(bin_N, kind="stable")
  starts_B = np.cumsum(num_rows_B) - num_rows_B
  row_N = np.empty(len(bin_N), np.int64)
  row_N[by_bin] = np.arange(len(bin_N)) - starts_B[bin_N[by_bin]]
  seq_idx[bin_N, row_N] = np.arange(len(bin_N))
  return bin_N, seq_idx, row_N


def gather_packed(x_NxT: np.ndarray, packing: Packing, fill=0) -> np.ndarray:
  """Per-sequence rows `[N, ...]` -> bins `[M, D, R, ...]`, padding rows set to `fill` (one sequence per row)."""
  idx = packing.seq_idx_MxDxR
  if idx is None:
    raise ValueError("gather_packed: this packing holds several sequences per row; use place_rows")
  out = np.asarray(x_NxT)[np.maximum(idx, 0)]
  out[idx < 0] = fill
  return out


def place_rows(x_NxTx, packing: Packing, fill=0) -> np.ndarray:
  """Per-sequence arrays `[N, T, ...]` -> packed rows `[M, D, R, row_len, ...]`: the first `length_N[n]`
  entries of sequence n from column `offset_N[n]` of its row; every other entry is `fill` (a scalar, or
  an array broadcast against `[row_len, ...]`)."""
  p, x = packing, np.asarray(x_NxTx)
  if p.row_len is None:
    raise ValueError("place_rows: this packing holds one sequence per row; use gather_packed")
  if x.ndim < 2 or x.shape[0] != p.length_N.size or x.shape[1] < p.length_N.max(initial=0):
    raise ValueError(f"place_rows: want [N={p.length_N.size}, T >= {p.length_N.max(initial=0)}, ...], "
                     f"got {x.shape}")
  num_devices = p.tokens_MxD.shape[1]
  out = np.empty((p.num_micro_steps, num_devices, p.num_rows, p.row_len, *x.shape[2:]), x.dtype)
  out[...] = fill
  n_P, t_P = np.nonzero(np.arange(x.shape[1])[None, :] < p.length_N[:, None])
  row_P = (p.micro_step_N[n_P].astype(np.int64) * num_devices + p.device_N[n_P]) * p.num_rows + p.row_N[n_P]
  out.reshape(-1, p.row_len, *x.shape[2:])[row_P, p.offset_N[n_P] + t_P] = x[n_P, t_P]
  return out


def segments_and_positions(packing: Packing) -> tuple[np.ndarray, np.ndarray]:
  """int32 `[M, D, R, row_len]` each: the segment of every column (0 = padding, 1.. = the row's
  sequences in order) and its position within its sequence (0 on padding)."""
  n, t = packing.length_N.size, packing.row_len
  segment = place_rows(np.broadcast_to(packing.segment_N[:, None], (n, t)), packing, 0)
  positions = place_rows(np.broadcast_to(np.arange(t, dtype=np.int32), (n, t)), packing, 0)
  return segment, positions


def routes_to_counts(routes_NxTxLxK, token_mask_NxT, micro_step_N, device_N, M: int, D: int, E: int) -> np.ndarray:
  """int64 `counts[M, L, D, E]`: (token, expert) pairs each device sends to each expert per micro-step.

  token_mask marks the tokens the MoE layers process (real tokens, not padding); their routes must be in
  [0, E). Routes of masked-out tokens are ignored.
  """
  routes = np.asarray(routes_NxTxLxK)
  mask_NxT = np.asarray(token_mask_NxT).astype(bool)
  micro_N, dev_N = np.asarray(micro_step_N, np.int64), np.asarray(device_N, np.int64)
  if (routes.ndim != 4 or mask_NxT.shape != routes.shape[:2] or micro_N.shape != routes.shape[:1]
      or dev_N.shape != routes.shape[:1]):
    raise ValueError(f"routes_to_counts: want routes [N, T, L, k], token_mask [N, T], micro_step and device [N]; "
                     f"got {routes.shape}, {mask_NxT.shape}, {micro_N.shape}, {dev_N.shape}")
  if ((micro_N < 0) | (micro_N >= M)).any() or ((dev_N < 0) | (dev_N >= D)).any():
    raise ValueError(f"routes_to_counts: micro_step must be in [0, {M}) and device in [0, {D})")
  _, _, L, K = routes.shape
  n_idx, t_idx = np.nonzero(mask_NxT)
  e_PxLxK = routes[n_idx, t_idx].astype(np.int64)
  if e_PxLxK.size and (e_PxLxK.min() < 0 or e_PxLxK.max() >= E):
    raise ValueError(f"routes_to_counts: expert ids of real tokens must be in [0, {E}), "
                     f"got range [{e_PxLxK.min()}, {e_PxLxK.max()}]")
  ml_PxL = micro_N[n_idx, None] * L + np.arange(L)[None, :]
  flat_PxLxK = ((ml_PxL * D + dev_N[n_idx, None])[..., None]) * E + e_PxLxK
  return np.bincount(flat_PxLxK.reshape(-1), minlength=M * L * D * E).astype(np.int64).reshape(M, L, D, E)
