"""Host-side (numpy) packing of whole sequences into (micro-step, device) bins, and routes -> counts.

A bin (m, d) holds the sequences device d processes in micro-step m, under a budget of real tokens.
Greedy longest-first into the least-loaded bin (LPT) keeps, in every micro-step, the device loads within
one sequence length of each other, which is what data-parallel attention/dense compute needs. The expert
load that remains unbalanced is then visible in `counts` and is the planner's job.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Packing:
  """Where each of N sequences runs. `seq_idx[m, d, :]` lists bin (m, d)'s sequences, -1 = padding row."""

  micro_step_N: np.ndarray  # int32 [N]
  device_N: np.ndarray  # int32 [N]
  num_micro_steps: int
  seq_idx_MxDxR: np.ndarray  # int32 [M, D, R]
  tokens_MxD: np.ndarray  # int64 [M, D]: real tokens per bin


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


def pack_micro_batches(seq_lens_N, num_devices: int, num_micro_steps: int | None = None, *,
                       tokens_per_device: int, rows_per_bin: int | None = None, seed: int = 0) -> Packing:
  """Assigns whole sequences to (micro-step, device) bins of at most `tokens_per_device` real tokens.

  num_micro_steps: fixed M, or None for the fewest micro-steps the greedy packing fits in.
  rows_per_bin: fixed R (static shapes across steps), or None for the largest bin's row count.
  seed: breaks ties between equal lengths, so equal-length groups don't always land in index order.
  """
  lens_N = np.asarray(seq_lens_N, np.int64)
  if lens_N.ndim != 1 or lens_N.size == 0 or (lens_N < 0).any():
    raise ValueError(f"pack_micro_batches: seq_lens must be a non-empty 1-D array of lengths >= 0, "
                     f"got shape {lens_N.shape}")
  if min(num_devices, tokens_per_device, *(x for x in (num_micro_steps, rows_per_bin) if x is not None)) < 1:
    raise ValueError(f"pack_micro_batches: num_devices={num_devices}, tokens_per_device={tokens_per_device}, "
                     f"num_micro_steps={num_micro_steps} and rows_per_bin={rows_per_bin} must be >= 1")
  too_long = np.flatnonzero(lens_N > tokens_per_device)
  if too_long.size:
    n = int(too_long[0])
    raise ValueError(f"pack_micro_batches: sequence {n} has {lens_N[n]} tokens, which exceeds the per-device "
                     f"budget tokens_per_device={tokens_per_device} ({too_long.size} such sequences)")
  shuffled = np.random.default_rng(seed).permutation(lens_N.size)
  order = shuffled[np.argsort(-lens_N[shuffled], kind="stable")]
  rows = lens_N.size if rows_per_bin is None else rows_per_bin
  if num_micro_steps is None:
    min_bins = max(-(-int(lens_N.sum()) // tokens_per_device), -(-lens_N.size // rows))
    m, bin_N = max(1, -(-min_bins // num_devices)), None
    while bin_N is None:  # Ends: with one sequence per bin every sequence fits.
      bin_N = _greedy(lens_N, order, m * num_devices, tokens_per_device, rows)
      m += bin_N is None
  else:
    m = num_micro_steps
    bin_N = _greedy(lens_N, order, m * num_devices, tokens_per_device, rows)
    if bin_N is None:
      raise ValueError(f"pack_micro_batches: {lens_N.size} sequences ({lens_N.sum()} tokens) don't fit "
                       f"num_micro_steps={m} x num_devices={num_devices} bins of {tokens_per_device} tokens"
                       + ("" if rows_per_bin is None else f" and {rows_per_bin} rows"))
  num_rows_B = np.bincount(bin_N, minlength=m * num_devices)
  r = int(num_rows_B.max()) if rows_per_bin is None else rows_per_bin
  seq_idx = np.full((m * num_devices, r), -1, np.int32)
  by_bin = np.argsort(bin_N, kind="stable")
  starts_B = np.cumsum(num_rows_B) - num_rows_B
  seq_idx[bin_N[by_bin], np.arange(lens_N.size) - starts_B[bin_N[by_bin]]] = by_bin
  return Packing(
      micro_step_N=(bin_N // num_devices).astype(np.int32),
      device_N=(bin_N % num_devices).astype(np.int32),
      num_micro_steps=m,
      seq_idx_MxDxR=seq_idx.reshape(m, num_devices, r),
      tokens_MxD=np.bincount(bin_N, weights=lens_N, minlength=m * num_devices).astype(np.int64)
      .reshape(m, num_devices),
  )


def gather_packed(x_NxT: np.ndarray, packing: Packing, fill=0) -> np.ndarray:
  """Per-sequence rows `[N, ...]` -> bins `[M, D, R, ...]`, padding rows set to `fill`."""
  idx = packing.seq_idx_MxDxR
  out = np.asarray(x_NxT)[np.maximum(idx, 0)]
  out[idx < 0] = fill
  return out


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
