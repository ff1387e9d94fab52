"""Packing sequences into (micro-step, device) bins, and routes -> counts."""

import numpy as np
import pytest

from foremoe_jax.rl import packing as P


def _check(p, lens, budget):
  M, D, _ = p.seq_idx_MxDxR.shape
  assert p.num_micro_steps == M
  idx = p.seq_idx_MxDxR
  assert sorted(idx[idx >= 0].tolist()) == list(range(len(lens)))  # Each sequence exactly once.
  for m in range(M):
    for d in range(D):
      rows = idx[m, d][idx[m, d] >= 0]
      assert (p.micro_step_N[rows] == m).all() and (p.device_N[rows] == d).all()
      assert lens[rows].sum() == p.tokens_MxD[m, d] <= budget


def test_pack_random_lengths_balanced_and_valid():
  rng = np.random.default_rng(0)
  lens = rng.integers(5, 60, size=200)
  p = P.pack_micro_batches(lens, num_devices=8, tokens_per_device=400, seed=1)
  _check(p, lens, 400)
  assert p.num_micro_steps == -(-lens.sum() // (8 * 400))  # Random small lengths fit the lower bound.
  # LPT keeps every bin within one sequence length of every other.
  assert p.tokens_MxD.max() - p.tokens_MxD.min() <= lens.max()
  assert p.micro_step_N.dtype == p.device_N.dtype == p.seq_idx_MxDxR.dtype == np.int32


def test_pack_hand_case():
  # Longest first into the least-loaded bin, lowest bin on ties: 7->(0,0), 5->(0,1), 4->(1,0), 3->(1,1),
  # 2->(1,1) (loads 7,5,4,3), 1->(1,0) (loads 7,5,4,5).
  p = P.pack_micro_batches([3, 7, 1, 5, 2, 4], num_devices=2, num_micro_steps=2, tokens_per_device=8)
  assert p.seq_idx_MxDxR.tolist() == [[[1, -1], [3, -1]], [[2, 5], [0, 4]]]
  assert p.tokens_MxD.tolist() == [[7, 5], [5, 5]]


def test_pack_fixed_rows_and_micro_steps():
  lens = np.full(10, 3)
  p = P.pack_micro_batches(lens, num_devices=2, num_micro_steps=4, tokens_per_device=100, rows_per_bin=3)
  _check(p, lens, 100)
  assert p.seq_idx_MxDxR.shape == (4, 2, 3)
  assert np.bincount(p.micro_step_N * 2 + p.device_N, minlength=8).max() <= 2  # Spread, not stacked.
  auto = P.pack_micro_batches(lens, num_devices=2, tokens_per_device=100, rows_per_bin=1)
  assert auto.num_micro_steps == 5 and auto.seq_idx_MxDxR.shape == (5, 2, 1)


def test_pack_seed_only_breaks_ties():
  lens = np.array([4, 4, 4, 4, 9])
  a = P.pack_micro_batches(lens, 2, 1, tokens_per_device=20, seed=0)
  b = P.pack_micro_batches(lens, 2, 1, tokens_per_device=20, seed=5)
  assert sorted(a.tokens_MxD.ravel()) == sorted(b.tokens_MxD.ravel()) == [12, 13]


def test_pack_errors():
  with pytest.raises(ValueError, match="sequence 1 has 50 tokens, which exceeds .*tokens_per_device=40"):
    P.pack_micro_batches([10, 50], num_devices=2, tokens_per_device=40)
  with pytest.raises(ValueError, match="don't fit num_micro_steps=1"):
    P.pack_micro_batches([30, 30, 30], num_devices=2, num_micro_steps=1, tokens_per_device=40)
  with pytest.raises(ValueError, match="must be >= 1"):
    P.pack_micro_batches([3], num_devices=0, tokens_per_device=40)


def test_gather_packed():
  p = P.pack_micro_batches([3, 7, 1, 5, 2, 4], num_devices=2, num_micro_steps=2, tokens_per_device=8)
  x = np.arange(6)[:, None] * 10 + np.arange(3)
  out = P.gather_packed(x, p, fill=-7)
  assert out.shape == (2, 2, 2, 3)
  assert out[1, 1, 1].tolist() == [40, 41, 42] and (out[0, 0, 1] == -7).all()


def test_routes_to_counts_matches_loop():
  rng = np.random.default_rng(2)
  N, T, L, K, M, D, E = 6, 5, 3, 2, 2, 2, 4
  routes = rng.integers(0, E, size=(N, T, L, K)).astype(np.int32)
  mask = rng.random((N, T)) < 0.7
  routes[~mask] = 99  # Padding routes are ignored.
  micro, dev = rng.integers(0, M, N), rng.integers(0, D, N)
  want = np.zeros((M, L, D, E), np.int64)
  for n in range(N):
    for t in range(T):
      if mask[n, t]:
        for l in range(L):
          for k in range(K):
            want[micro[n], l, dev[n], routes[n, t, l, k]] += 1
  got = P.routes_to_counts(routes, mask, micro, dev, M, D, E)
  assert got.dtype == np.int64
  np.testing.assert_array_equal(got, want)
  assert got.sum() == mask.sum() * L * K


def test_routes_to_counts_errors():
  routes = np.zeros((2, 3, 1, 2), np.int32)
  mask = np.ones((2, 3), bool)
  with pytest.raises(ValueError, match=r"expert ids of real tokens must be in \[0, 4\)"):
    P.routes_to_counts(routes + 4, mask, [0, 0], [0, 1], 1, 2, 4)
  with pytest.raises(ValueError, match="want routes"):
    P.routes_to_counts(routes, mask[:, :2], [0, 0], [0, 1], 1, 2, 4)
  with pytest.raises(ValueError, match="device in"):
    P.routes_to_counts(routes, mask, [0, 0], [0, 2], 1, 2, 4)
