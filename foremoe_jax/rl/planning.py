"""The RL trainer's planning, beside the trainer: in a thread (default) or a spawned process.

Planning is pure numpy, but made of many small calls that each take the GIL: in a thread beside the
host loop that dispatches the recompute it runs slower than alone (BENCHMARKS.md, "numbers behind
choices"). `rl.plan_in_process` plans in a spawned process
(never forked: JAX runs threads); it stays opt-in until timed on a GPU. Either way the plans come back as
numpy `Plan`s and their device tables are built on the trainer's thread.
"""
from __future__ import annotations

import concurrent.futures
import multiprocessing
import time

import numpy as np

from foremoe_jax.planner import Plan, PlanConfig, plan_step


def timed_plan(counts_MxLxDxE, plan_cfg: PlanConfig, history) -> tuple[Plan, float, np.ndarray]:
  """(plan of one mini-batch under the running policy, seconds it took, its device load `[M, L, D]` for
  the step's report)."""
  tic = time.perf_counter()
  plan = plan_step(counts_MxLxDxE, plan_cfg, history=history)
  return plan, time.perf_counter() - tic, plan.device_load(counts_MxLxDxE)


def minibatches(counts_MxLxDxE, num_minibatches: int, history) -> list[tuple[np.ndarray, np.ndarray | None]]:
  """(counts, history) of each mini-batch: the history of one is the mini-batch before it, the first's
  the previous step's last (what `eplb_history` plans from)."""
  chunks = np.split(counts_MxLxDxE, num_minibatches)
  return list(zip(chunks, [history] + chunks[:-1]))


def _ready() -> bool:
  return True


class Planner:
  """One worker for the trainer's plans: a thread, or a spawned process (started, and its imports paid,
  at once, so the first step does not wait for it). `close()` stops it; so does the interpreter's exit."""

  def __init__(self, in_process: bool):
    if in_process:
      self._pool = concurrent.futures.ProcessPoolExecutor(max_workers=1,
                                                          mp_context=multiprocessing.get_context("spawn"))
      self._pool.submit(_ready)
    else:
      self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="planner")

  def submit(self, fn, *args) -> concurrent.futures.Future:
    return self._pool.submit(fn, *args)

  def close(self) -> None:
    self._pool.shutdown(wait=False, cancel_futures=True)
