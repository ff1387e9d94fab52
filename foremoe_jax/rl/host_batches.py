"""This process's share of an RL step: its rollout rows packed into its devices' micro-batches, and the
few numbers it adds to what every process plans from.

Each process draws, rolls out, scores and packs only the batch rows its devices hold (`rollout.local_rows`:
one contiguous block per process). The rows are packed in `rl.pack_groups` groups (0: one per process):
group g packs rows `[g*B/G, (g+1)*B/G)` into the (micro-step, shard) bins of batch shards
`[g*n/G, (g+1)*n/G)`, so a process packs its own groups only. What crosses processes in a step, all small:
- the micro-step count M: each group packs into its fewest (whole mini-batches); all use the largest;
- the planning inputs, gathered once: the counts `[M, L, D, E]` each process's shards send (summed: the
  same on every process, what the planner plans from), the masked tokens per micro-step (the GRPO loss
  denominators) and the real tokens and row positions (the record's real-token share);
- per-row scalars (reward, response length, clipped) for the group advantages (a group may straddle two
  processes) and the record, each tagged with its row: a row built twice or never fails the step.
Never another process's tokens or routes. The packing depends on the groups, so a 1-process run equals a
P-process run only with `rl.pack_groups=P`.
"""
import dataclasses

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from foremoe_jax import distributed
from foremoe_jax.mesh import batch_sharding, batch_shards
from foremoe_jax.rl.microbatch import StepBatches, build_step_batches, step_packing, with_advantages
from foremoe_jax.rl.packing import Packing


def num_groups(pack_groups: int, processes: int, num_shards: int) -> int:
  """The packing groups `rl.pack_groups` asks for (0: one per process), checked against the launch."""
  groups = pack_groups or processes
  if groups % processes:
    raise ValueError(f"rl.pack_groups={pack_groups}: each of the {processes} processes packs only the rows it "
                     f"built, so the packing groups must be a multiple of {processes} (0: one per process)")
  if num_shards % groups:
    raise ValueError(f"rl.pack_groups={pack_groups}: {groups} packing groups do not divide the {num_shards} "
                     "batch shards (devices of the batch axes)")
  return groups


def local_groups(rows: range, num_rows: int, groups: int) -> range:
  """The packing groups `rows` (one process's block of the `num_rows` batch rows) is made of."""
  size = num_rows // groups
  if not rows or rows.start % size or rows.stop % size:
    raise ValueError(f"this process holds batch rows [{rows.start}, {rows.stop}) of {num_rows}, not whole packing "
                     f"groups of {size} rows ({groups} groups): each process must hold whole groups (rl.pack_groups)")
  return range(rows.start // size, rows.stop // size)


def host_packings(lengths_B, rows: range, *, num_rows: int, num_shards: int, groups: int, rl, step: int,
                  row_len: int | None, num_micro_steps: int | None = None) -> list[Packing]:
  """One packing per local group of `rows` (lengths: those rows' only) into its `num_shards / groups`
  shards, seeded by (step, global group): the same wherever the group is packed."""
  size = num_rows // groups
  return [step_packing(np.asarray(lengths_B)[g * size - rows.start:(g + 1) * size - rows.start],
                       num_shards=num_shards // groups, rows_per_shard=rl.rows_per_shard,
                       tokens_per_shard=rl.tokens_per_shard, num_minibatches=rl.num_minibatches, row_len=row_len,
                       seed=[step, g], num_micro_steps=num_micro_steps)
          for g in local_groups(rows, num_rows, groups)]


def agreed_packings(lengths_B, rows: range, *, agree=distributed.max_over_processes, **kwargs) -> list[Packing]:
  """`host_packings` into the micro-steps every group agrees on: the most any group needs, by
  `agree(this process's most)` (the max over processes; a test passes its own)."""
  packings = host_packings(lengths_B, rows, **kwargs)
  m = agree(max(p.num_micro_steps for p in packings))
  if all(p.num_micro_steps == m for p in packings):
    return packings
  return host_packings(lengths_B, rows, num_micro_steps=m, **kwargs)


@dataclasses.dataclass(frozen=True)
class HostBatches:
  """This process's micro-batches, one `StepBatches` per local packing group, and its planning inputs."""
  rows: range  # the global batch rows built here
  groups: list[StepBatches]  # in row (and shard) order
  counts_MxLxDxE: np.ndarray  # int64: the pairs this process's shards send
  tokens_M: np.ndarray  # int64: masked (trained) tokens per micro-step on this process's shards
  real_tokens: int  # prompt + response tokens of these rows
  row_positions: int  # M x local shards x R x T


def build_host_batches(roll, rows: range, packings: list[Packing], *, num_rows: int, num_shards: int, groups: int,
                       expert_devices: int, num_experts: int, rl) -> HostBatches:
  """This process's micro-batches from its rollout rows (`roll`: numpy, rows `rows` only) and packings."""
  size, shards = num_rows // groups, num_shards // groups
  if len(roll.lengths) != len(rows):
    raise ValueError(f"build_host_batches: the rollout has {len(roll.lengths)} rows, rows [{rows.start}, "
                     f"{rows.stop}) are {len(rows)}")
  steps = []
  for g, packing in zip(local_groups(rows, num_rows, groups), packings, strict=True):
    part = slice(g * size - rows.start, (g + 1) * size - rows.start)
    steps.append(build_step_batches(roll.tokens[part], roll.routes[part], roll.completion_mask[part],
                                    roll.lengths[part], num_shards=shards, expert_devices=expert_devices,
                                    rows_per_shard=rl.rows_per_shard, tokens_per_shard=rl.tokens_per_shard,
                                    num_experts=num_experts, num_minibatches=rl.num_minibatches,
                                    pack_sequences=rl.pack_sequences, packing=packing, first_shard=g * shards))
  tokens_M = np.array([[b["mask"].sum() for b in s.micro_batches] for s in steps], np.int64).sum(0)
  m, t = len(steps[0].micro_batches), roll.tokens.shape[1]
  return HostBatches(rows, steps, sum(s.counts_MxLxDxE for s in steps), tokens_M, int(np.sum(roll.lengths)),
                     m * len(steps) * shards * rl.rows_per_shard * t)


def pack_host(roll, rows: range, *, step: int, num_rows: int, num_shards: int, groups: int, expert_devices: int,
              num_experts: int, rl) -> HostBatches:
  """This process's rollout rows packed (micro-steps agreed across processes) into its micro-batches."""
  sizes = dict(num_rows=num_rows, num_shards=num_shards, groups=groups)
  packings = agreed_packings(roll.lengths, rows, rl=rl, step=step,
                             row_len=roll.tokens.shape[1] if rl.pack_sequences else None, **sizes)
  return build_host_batches(roll, rows, packings, expert_devices=expert_devices, num_experts=num_experts, rl=rl,
                            **sizes)


@dataclasses.dataclass(frozen=True)
class StepInputs:
  """What every process plans and normalizes from, summed over the processes."""
  counts_MxLxDxE: np.ndarray  # int64
  num_tokens_M: np.ndarray  # float32: masked tokens of each micro-step's mini-batch (the loss denominator, >= 1)
  real_tokens: int
  real_token_share: float  # real tokens / row positions of the step


def step_inputs(counts_PxMxLxDxE, tokens_PxM, totals_Px2, num_minibatches: int) -> StepInputs:
  """`StepInputs` from every process's (counts, tokens per micro-step, (real tokens, row positions))."""
  tokens_M = np.asarray(tokens_PxM).sum(0)
  per_mb = np.maximum(tokens_M.reshape(num_minibatches, -1).sum(1), 1)
  real, positions = np.asarray(totals_Px2).sum(0)
  return StepInputs(np.asarray(counts_PxMxLxDxE).sum(0), np.repeat(per_mb, len(tokens_M) // num_minibatches)
                    .astype(np.float32), int(real), float(real / positions))


def gather_inputs(host: HostBatches, num_minibatches: int) -> StepInputs:
  """The step's `StepInputs`: one all-gather of every process's counts and token totals."""
  totals = np.array([host.real_tokens, host.row_positions], np.int64)
  return step_inputs(*distributed.gather_over_processes([host.counts_MxLxDxE, host.tokens_M, totals]),
                     num_minibatches)


def host_micro_batches(host: HostBatches, adv_rows, num_tokens_M) -> list[dict]:
  """This process's micro-batches (its shards, in order) with its rows' advantages and the step's loss
  denominators: the local part of each global micro-batch."""
  size = len(host.rows) // len(host.groups)
  adv_rows = np.asarray(adv_rows, np.float32)
  per_group = [with_advantages(s, adv_rows[i * size:(i + 1) * size]) for i, s in enumerate(host.groups)]
  out = []
  for parts, num_tokens in zip(zip(*per_group), num_tokens_M, strict=True):
    batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0] if k != "num_tokens"}
    out.append({**batch, "num_tokens": np.float32(num_tokens)})
  return out


def rows_in_order(ids_PxB, columns_P: dict, num_rows: int) -> tuple[dict, list[list[int]]]:
  """Every process's per-row columns (`[P, B_local, ...]`, rows `ids_PxB`) as global `[num_rows, ...]` in
  row order, and the `[start, stop)` each process built; a row built twice or never is an error."""
  ids_PxB = np.asarray(ids_PxB)
  host_rows = [[int(ids.min()), int(ids.max()) + 1] for ids in ids_PxB]
  seen = np.bincount(ids_PxB.reshape(-1), minlength=num_rows)
  if seen.size != num_rows or (seen != 1).any():
    row = int(np.flatnonzero(seen != 1)[0])
    raise RuntimeError(f"the processes built batch rows {host_rows} (process p: [start, stop)), not each of the "
                       f"{num_rows} rows once: row {row} was built {seen[row]} times")
  order = np.argsort(ids_PxB.reshape(-1), kind="stable")
  return {k: np.asarray(v).reshape(-1, *np.shape(v)[2:])[order] for k, v in columns_P.items()}, host_rows


def gather_rows(rows: range, num_rows: int, columns: dict) -> tuple[dict, list[list[int]]]:
  """This process's per-row scalars (`columns`: name -> [len(rows)]) gathered into `rows_in_order`."""
  stacked = distributed.gather_over_processes([np.arange(rows.start, rows.stop), *columns.values()])
  return rows_in_order(stacked[0], dict(zip(columns, stacked[1:])), num_rows)


def device_batch(batch: dict, mesh) -> dict:
  """This process's part of a micro-batch (its shards' rows; scalars the same everywhere) -> global
  arrays sharded over the batch axes (scalars replicated)."""
  shard, replicated = batch_sharding(mesh), NamedSharding(mesh, P())
  parts = batch_shards(mesh) // len(shard.addressable_devices)

  def put(v):
    v = np.asarray(v)
    if v.ndim == 0:
      return jax.make_array_from_process_local_data(replicated, v, v.shape)
    return jax.make_array_from_process_local_data(shard, v, (v.shape[0] * parts, *v.shape[1:]))
  return {k: put(v) for k, v in batch.items()}
