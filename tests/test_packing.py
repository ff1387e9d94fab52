"""Packing sequences into (micro-step, device) bins, and routes -> counts."""

import dataclasses

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


def _check_rows(p, lens, budget, rows, row_len):
  """Packed rows: each sequence once, inside its row, no two overlapping, segments in column order."""
  _check_bins(p, lens, budget)
  assert p.seq_idx_MxDxR is None and p.num_rows == rows and p.row_len == row_len
  assert ((0 <= p.row_N) & (p.row_N < rows)).all() and (p.offset_N + lens <= row_len).all()
  row_key = (p.micro_step_N.astype(np.int64) * p.tokens_MxD.shape[1] + p.device_N) * rows + p.row_N
  for key in np.unique(row_key):
    members = np.flatnonzero(row_key == key)
    members = members[np.argsort(p.offset_N[members])]
    starts, ends = p.offset_N[members], p.offset_N[members] + lens[members]
    assert starts[0] == 0 and (starts[1:] == ends[:-1]).all()  # back to back, no overlap
    assert p.segment_N[members].tolist() == list(range(1, members.size + 1))


def _check_bins(p, lens, budget):
  np.testing.assert_array_equal(p.length_N, lens)
  bins = p.micro_step_N.astype(np.int64) * p.tokens_MxD.shape[1] + p.device_N
  np.testing.assert_array_equal(np.bincount(bins, lens, minlength=p.tokens_MxD.size).reshape(p.tokens_MxD.shape),
                                p.tokens_MxD)
  assert p.tokens_MxD.max() <= budget


def test_pack_rows_hand_case():
  # One bin of 2 rows of 10: first fit decreasing puts 6, 4 in row 0 and 5, 3, 2 in row 1.
  p = P.pack_micro_batches([2, 6, 3, 5, 4], num_devices=1, tokens_per_device=20, rows_per_bin=2, row_len=10)
  assert p.num_micro_steps == 1
  assert p.row_N.tolist() == [1, 0, 1, 1, 0] and p.offset_N.tolist() == [8, 0, 5, 0, 6]
  assert p.segment_N.tolist() == [3, 1, 2, 1, 2]
  seg, pos = P.segments_and_positions(p)
  assert seg[0, 0].tolist() == [[1] * 6 + [2] * 4, [1] * 5 + [2] * 3 + [3] * 2]
  assert pos[0, 0, 1].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 0, 1]


@pytest.mark.parametrize("seed", range(4))
def test_pack_rows_random_lengths_valid_and_deterministic(seed):
  rng = np.random.default_rng(seed)
  lens = rng.integers(1, 40, size=int(rng.integers(1, 120)))
  kw = dict(num_devices=4, tokens_per_device=int(rng.integers(40, 120)), rows_per_bin=int(rng.integers(1, 4)),
            row_len=40, seed=seed)
  p = P.pack_micro_batches(lens, **kw)
  _check_rows(p, lens, kw["tokens_per_device"], kw["rows_per_bin"], 40)
  q = P.pack_micro_batches(lens, **kw)
  for f in dataclasses.fields(p):
    np.testing.assert_array_equal(getattr(p, f.name), getattr(q, f.name))
  # Packing never needs more micro-steps than one sequence per row of the same rows and budget.
  one = P.pack_micro_batches(lens, 4, tokens_per_device=kw["tokens_per_device"], rows_per_bin=kw["rows_per_bin"],
                             seed=seed)
  assert p.num_micro_steps <= one.num_micro_steps
  fixed = P.pack_micro_batches(lens, **{**kw, "seed": seed}, num_micro_steps=p.num_micro_steps + 2)
  _check_rows(fixed, lens, kw["tokens_per_device"], kw["rows_per_bin"], 40)
  assert fixed.tokens_MxD.shape == (p.num_micro_steps + 2, 4)


def test_place_rows_round_trip_and_layout_errors():
  lens = np.array([3, 7, 1, 5, 2, 4])
  p = P.pack_micro_batches(lens, num_devices=2, tokens_per_device=12, rows_per_bin=2, row_len=8)
  x = np.arange(6)[:, None] * 100 + np.arange(8)
  rows = P.place_rows(x, p, fill=-1)
  assert rows.shape == (p.num_micro_steps, 2, 2, 8)
  for n in range(6):
    got = rows[p.micro_step_N[n], p.device_N[n], p.row_N[n], p.offset_N[n]:p.offset_N[n] + lens[n]]
    assert got.tolist() == x[n, :lens[n]].tolist()
  assert (rows == -1).sum() == rows.size - lens.sum()
  with pytest.raises(ValueError, match="use place_rows"):
    P.gather_packed(x, p)
  with pytest.raises(ValueError, match="use gather_packed"):
    P.place_rows(x, P.pack_micro_batches(lens, 2, tokens_per_device=12))
  with pytest.raises(ValueError, match=r"want \[N=6, T >= 7"):
    P.place_rows(x[:, :5], p)


def test_pack_rows_errors():
  with pytest.raises(ValueError, match="sequence 2 has 9 tokens, longer than a row of row_len=8"):
    P.pack_micro_batches([3, 4, 9], num_devices=2, tokens_per_device=40, rows_per_bin=2, row_len=8)
  with pytest.raises(ValueError, match="need a fixed rows_per_bin"):
    P.pack_micro_batches([3], num_devices=2, tokens_per_device=40, row_len=8)
  with pytest.raises(ValueError, match="don't fit num_micro_steps=1 .* and 1 rows of 8"):
    P.pack_micro_batches([5, 5, 5], num_devices=1, num_micro_steps=1, tokens_per_device=40, rows_per_bin=1,
                         row_len=8)
