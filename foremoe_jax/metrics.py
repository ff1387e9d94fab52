"""Run metrics: one JSON line per step, TensorBoard scalars, a summary file and a PNG of the run.

Files under `run_dir`: `metrics.jsonl` (appended, so a resumed run continues it), `tb/` (TensorBoard),
`summary.json`. A record is a flat or nested dict of numbers and lists; nested dicts become TensorBoard
tags `a/b`, lists go to the JSON line only. `plot_run` reads `reward` and `imbalance_per_micro_step`
(`{policy: [one float per micro-step]}`) from each record.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import warnings

import numpy as np
from matplotlib.figure import Figure

from foremoe_jax.atomic import atomic_path, write_json


def _jsonable(x):
  """numpy / jax scalars and arrays -> plain Python; non-finite floats -> None (valid JSON)."""
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if hasattr(x, "tolist"):  # numpy and jax arrays and scalars.
    return _jsonable(np.asarray(x).tolist())
  if isinstance(x, float) and not math.isfinite(x):
    return None
  return x


def _scalars(record: dict, prefix: str = ""):
  for k, v in record.items():
    if isinstance(v, dict):
      yield from _scalars(v, f"{prefix}{k}/")
    elif isinstance(v, numbers.Number) and not isinstance(v, bool):
      yield f"{prefix}{k}", float(v)


def _summary_writer_cls():
  """tensorboardX's SummaryWriter, else torch's (the GPU image has torch + tensorboard only), else None.
  Imported lazily: both are slow to import and only the logger needs them."""
  try:
    from tensorboardX import SummaryWriter
  except ImportError:
    try:
      from torch.utils.tensorboard import SummaryWriter
    except ImportError:
      return None
  return SummaryWriter


class MetricsLogger:
  """`log(step, record)` appends `{"step": step, **record}` to metrics.jsonl and scalars to TensorBoard."""

  def __init__(self, run_dir: str | os.PathLike, tensorboard: bool = True):
    os.makedirs(run_dir, exist_ok=True)
    self.path = os.path.join(run_dir, "metrics.jsonl")
    self._file = open(self.path, "a", encoding="utf-8")
    self._tb = None
    if tensorboard:
      writer = _summary_writer_cls()
      if writer is None:
        warnings.warn("neither tensorboardX nor torch.utils.tensorboard is installed: metrics go to "
                      "metrics.jsonl only", stacklevel=2)
      else:
        self._tb = writer(os.path.join(run_dir, "tb"))

  @property
  def tensorboard(self) -> bool:
    return self._tb is not None

  def log(self, step: int, record: dict) -> None:
    record = _jsonable({"step": int(step), **record})
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()  # A killed run keeps every finished step.
    if self._tb is not None:
      for tag, value in _scalars(record):
        if tag != "step":
          self._tb.add_scalar(tag, value, int(step))

  def rewind(self, prefix: str, step: int) -> int:
    """Drops the records of a stage that resumes at `step`: those with a key starting with `prefix` and
    a step >= `step` (a run killed after logging them, before its checkpoint, runs them again: each step
    stays in metrics.jsonl once); a torn last line goes too. Rewritten atomically; returns how many
    records were dropped."""
    self._file.close()
    records = read_metrics(os.path.dirname(self.path))
    keep = [r for r in records if not (r.get("step", -1) >= step and any(k.startswith(prefix) for k in r))]
    with open(self.path, encoding="utf-8") as f:
      torn = len(f.read().splitlines()) > len(records)  # a line cut by a kill: appending would join it
    if torn or len(keep) < len(records):
      with atomic_path(self.path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in keep)
    self._file = open(self.path, "a", encoding="utf-8")
    return len(records) - len(keep)

  def close(self) -> None:
    self._file.close()
    if self._tb is not None:
      self._tb.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
  """The records of `run_dir/metrics.jsonl`; a torn last line (killed mid-write) is skipped."""
  path = os.path.join(run_dir, "metrics.jsonl")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no metrics file at {path!r}")
  records = []
  with open(path, encoding="utf-8") as f:
    lines = f.read().splitlines()
  for i, line in enumerate(lines):
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      if i != len(lines) - 1:
        raise ValueError(f"{path}:{i + 1}: not a JSON line: {line[:80]!r}") from None
  return records


def write_summary(run_dir: str | os.PathLike, summary: dict) -> str:
  """Writes `run_dir/summary.json` atomically (temp file + rename); returns its path."""
  return write_json(os.path.join(run_dir, "summary.json"), _jsonable(summary), indent=2, sort_keys=True)


def plot_run(run_dir_or_records, path_png: str | os.PathLike) -> str:
  """Two panels: reward per step; per-micro-step imbalance per policy over the run (steps' micro-steps
  laid end to end, dotted lines at step boundaries). Returns the PNG path."""
  records = (read_metrics(run_dir_or_records) if isinstance(run_dir_or_records, (str, os.PathLike))
             else list(run_dir_or_records))
  fig = Figure(figsize=(11, 4), layout="constrained")  # No pyplot: safe off the main thread, no display.
  ax_r, ax_i = fig.subplots(1, 2)
  rewarded = [r for r in records if r.get("reward") is not None]
  ax_r.plot([r["step"] for r in rewarded], [r["reward"] for r in rewarded], marker="o", ms=3)
  ax_r.set(title="reward", xlabel="step", ylabel="mean reward")
  series, boundaries, offset = {}, [], 0
  for r in records:
    per_policy = r.get("imbalance_per_micro_step") or {}
    width = max((len(v) for v in per_policy.values()), default=0)
    for policy, values in per_policy.items():
      xs, ys = series.setdefault(policy, ([], []))
      xs.extend(range(offset, offset + len(values)))
      ys.extend(float("nan") if v is None else v for v in values)
    offset += width
    if width:
      boundaries.append(offset - 0.5)
  for policy, (xs, ys) in sorted(series.items()):
    ax_i.plot(xs, ys, marker=".", lw=1, label=policy)
  for x in boundaries[:-1]:
    ax_i.axvline(x, color="0.85", ls=":", lw=0.8)
  ax_i.axhline(1.0, color="0.5", lw=0.8)
  ax_i.set(title="imbalance per micro-step (max / mean device load)", xlabel="micro-step (all steps)",
           ylabel="imbalance")
  if series:
    ax_i.legend(fontsize=8)
  with atomic_path(path_png) as tmp:
    fig.savefig(tmp, dpi=110, format="png")
  return os.fspath(path_png)
