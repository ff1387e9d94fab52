"""Host-local data: per-row prompts, each process packing its own rows, and the gathered planning inputs,
with processes simulated by calling the functions with each process's rows."""
import types
from typing import NamedTuple

import numpy as np
import pytest

from foremoe_jax.rl import host_batches as hb
from foremoe_jax.rl.config import RLConfig
from foremoe_jax.rl.microbatch import counts_of
from foremoe_jax.rl.rollout import Rollout, local_prompts, process_rows
from foremoe_jax.rl.task import ArithmeticTask, sample_rows

B, T, L, K, E = 32, 10, 2, 2, 8  # rows, width, MoE layers, top-k, experts
SHARDS, D = 8, 4  # batch shards, expert devices


class Device(NamedTuple):
  process_index: int
  id: int


def sampler(task, seed=0, step=3):
  return lambda rows: sample_rows(task.sample, rows, seed=seed, step=step)


def test_rows_built_by_a_split_equal_the_one_process_batch():
  task = ArithmeticTask(num_digits=3)
  whole = local_prompts(sampler(task), range(12), 4)
  halves = local_prompts(sampler(task), range(0, 6), 4) + local_prompts(sampler(task), range(6, 12), 4)
  assert halves == whole  # group 1 (rows 4..7) straddles the split: both halves draw its prompt alike
  assert all(whole[b] == whole[b // 4 * 4] for b in range(12)) and len({p for p, _ in whole}) == 3
  assert local_prompts(sampler(task, step=4), range(12), 4) != whole
  assert local_prompts(sampler(task, seed=1), range(12), 4) != whole


def rollout(seed=0) -> Rollout:
  rng = np.random.default_rng(seed)
  lengths = rng.integers(4, T + 1, size=B)
  t = np.arange(T)[None]
  routes = np.stack([rng.permutation(E)[:K] for _ in range(B * T * L)]).reshape(B, T, L, K).astype(np.int32)
  tokens = np.where(t < lengths[:, None], rng.integers(3, 18, size=(B, T)), 0).astype(np.int32)
  mask = ((t >= 2) & (t < lengths[:, None] - 1)).astype(np.int32)
  return Rollout(tokens, routes, mask, None, lengths, np.full(B, 3))


def part(roll: Rollout, rows: range) -> Rollout:
  return Rollout(*(None if x is None else x[rows.start:rows.stop] for x in roll))


def hosts(roll, rl, groups, blocks, step=5):
  """HostBatches of each block of rows, the micro-steps agreed over all of them (as the gather would)."""
  sizes = dict(num_rows=B, num_shards=SHARDS, groups=groups)
  row_len = T if rl.pack_sequences else None
  needed = [hb.host_packings(roll.lengths[r.start:r.stop], r, rl=rl, step=step, row_len=row_len, **sizes)
            for r in blocks]
  m = max(p.num_micro_steps for packs in needed for p in packs)
  out = []
  for rows in blocks:
    packings = hb.agreed_packings(roll.lengths[rows.start:rows.stop], rows, agree=lambda mine, m=m: max(mine, m),
                                  rl=rl, step=step, row_len=row_len, **sizes)
    assert {p.num_micro_steps for p in packings} == {m}
    out.append(hb.build_host_batches(part(roll, rows), rows, packings, expert_devices=D, num_experts=E, rl=rl,
                                     **sizes))
  return out


def inputs(parts, rl):
  return hb.step_inputs(np.stack([h.counts_MxLxDxE for h in parts]), np.stack([h.tokens_M for h in parts]),
                        np.stack([[h.real_tokens, h.row_positions] for h in parts]), rl.num_minibatches)


@pytest.mark.parametrize("pack_sequences", [False, True])
def test_each_process_packs_its_rows_and_the_gathered_counts_are_the_full_batchs(pack_sequences):
  rl = RLConfig(rows_per_shard=2, tokens_per_shard=16, num_minibatches=2, pack_sequences=pack_sequences)
  roll = rollout()
  one = hosts(roll, rl, 2, [range(B)])[0]  # one process, two packing groups
  two = hosts(roll, rl, 2, [range(0, B // 2), range(B // 2, B)])  # two processes, one group each
  assert len(one.groups) == 2 and [len(h.groups) for h in two] == [1, 1]
  adv = np.linspace(-1, 1, B, dtype=np.float32)
  full_in, split_in = inputs([one], rl), inputs(two, rl)
  whole = hb.host_micro_batches(one, adv, full_in.num_tokens_M)
  halves = [hb.host_micro_batches(h, adv[h.rows.start:h.rows.stop], split_in.num_tokens_M) for h in two]
  assert len(whole) % 2 == 0 and all(len(h) == len(whole) for h in halves)
  for m, batch in enumerate(whole):  # each process holds its shards' half of every global micro-batch
    assert batch["tokens"].shape[0] == SHARDS * rl.rows_per_shard
    for key, value in batch.items():
      got = halves[0][m][key] if value.ndim == 0 else np.concatenate([h[m][key] for h in halves])
      np.testing.assert_array_equal(got, value, err_msg=key)
  np.testing.assert_array_equal(split_in.counts_MxLxDxE, full_in.counts_MxLxDxE)
  np.testing.assert_array_equal(split_in.num_tokens_M, full_in.num_tokens_M)
  assert split_in.real_token_share == full_in.real_token_share and split_in.real_tokens == roll.lengths.sum()
  # The counts are those of the global micro-batches: shard i is expert rank i % D.
  replay = np.stack([b["replay"] for b in whole])
  routed = np.stack([b["segment_ids"] > 0 for b in whole]) if pack_sequences else None
  np.testing.assert_array_equal(full_in.counts_MxLxDxE, counts_of(replay, D, rl.rows_per_shard, E, routed))
  assert not np.array_equal(two[0].counts_MxLxDxE, two[1].counts_MxLxDxE)  # each sends its own pairs
  # The advantages and tokens of every row land once, in its own process's shards.
  placed = np.concatenate([b["adv"].reshape(-1) for b in whole])
  assert np.isin(adv[adv != 0], placed).all()
  assert sum(b["mask"].sum() for b in whole) == roll.completion_mask.sum()


def test_a_process_that_needs_fewer_micro_steps_packs_into_the_agreed_ones():
  rl = RLConfig(rows_per_shard=2, tokens_per_shard=16, num_minibatches=1)
  roll = rollout()
  short = roll._replace(lengths=np.where(np.arange(B) < B // 2, 4, T))  # process 0's rows are short
  kwargs = dict(num_rows=B, num_shards=SHARDS, groups=2, rl=rl, step=0, row_len=None)
  own = hb.host_packings(short.lengths[:B // 2], range(B // 2), **kwargs)[0].num_micro_steps
  other = hb.host_packings(short.lengths[B // 2:], range(B // 2, B), **kwargs)[0].num_micro_steps
  assert own < other
  agreed = hb.agreed_packings(short.lengths[:B // 2], range(B // 2), agree=lambda mine: max(mine, other), **kwargs)
  assert agreed[0].num_micro_steps == other


def test_rows_in_order_and_rows_built_twice_or_never():
  ids = np.array([[4, 5, 6, 7], [0, 1, 2, 3]])  # process 0 built the second block
  columns, host_rows = hb.rows_in_order(ids, {"reward": ids * 10.0}, 8)
  np.testing.assert_array_equal(columns["reward"], np.arange(8) * 10.0)
  assert host_rows == [[4, 8], [0, 4]]
  with pytest.raises(RuntimeError, match=r"built batch rows \[\[0, 4\], \[3, 7\]\].*row 3 was built 2 times"):
    hb.rows_in_order(np.array([[0, 1, 2, 3], [3, 4, 5, 6]]), {}, 8)


def test_broken_assumptions_are_named():
  with pytest.raises(ValueError, match="must be a multiple of 2"):
    hb.num_groups(1, 2, 8)
  with pytest.raises(ValueError, match="3 packing groups do not divide the 8 batch shards"):
    hb.num_groups(3, 1, 8)
  assert hb.num_groups(0, 2, 8) == 2 and hb.num_groups(4, 2, 8) == 4
  with pytest.raises(ValueError, match=r"rows \[2, 10\) of 16, not whole packing groups of 8 rows"):
    hb.local_groups(range(2, 10), 16, 2)

  def sharding(blocks):  # device d (of process p) holds rows `blocks[d]`
    index = {Device(p, d): (slice(*rows),) for d, (p, rows) in enumerate(blocks)}
    return types.SimpleNamespace(devices_indices_map=lambda shape: index)
  ok = process_rows(sharding([(0, (0, 4)), (0, (4, 8)), (1, (8, 12)), (1, (12, 16))]), 16)
  assert ok == {0: range(0, 8), 1: range(8, 16)}
  with pytest.raises(ValueError, match=r"process 0 holds batch rows \[\(0, 4\), \(8, 12\)\].*not one contiguous"):
    process_rows(sharding([(0, (0, 4)), (1, (4, 8)), (0, (8, 12)), (1, (12, 16))]), 16)
