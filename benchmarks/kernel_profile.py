"""Which device kernels a jitted program spends its time in: one profiled run, kernels summed by name.

`jax.profiler` writes a Perfetto trace (plain gzipped JSON, no extra package needed to read it); the device
processes' complete events are the kernels and copies the program launched. On CPU the table is of the
host's XLA threads and says little; it is meant for GPUs.

    from kernel_profile import kernel_table
    rows = kernel_table(compiled, args)  # [{name, ms per call, launches per call}], slowest first
"""
from __future__ import annotations

import collections
import gzip
import json
import pathlib
import tempfile


def kernel_table(fn, args, repeats: int = 3) -> list[dict]:
  """Runs fn(*args) `repeats` times under the profiler -> every kernel, by device time per call (slowest first)."""
  import jax
  jax.block_until_ready(fn(*args))  # compiled and warm before tracing
  with tempfile.TemporaryDirectory() as logdir:
    jax.profiler.start_trace(logdir, create_perfetto_trace=True)
    for _ in range(repeats):
      jax.block_until_ready(fn(*args))
    jax.profiler.stop_trace()
    trace = next(pathlib.Path(logdir).rglob("perfetto_trace.json.gz"))
    events = json.load(gzip.open(trace))
  events = events["traceEvents"] if isinstance(events, dict) else events
  device_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
                 and "/device:" in e["args"].get("name", "")}
  total_us, launches = collections.Counter(), collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e["pid"] in device_pids:
      total_us[e["name"]] += e["dur"]
      launches[e["name"]] += 1
  return [dict(name=name, ms=us / repeats / 1e3, launches=launches[name] / repeats)
          for name, us in total_us.most_common()]


def device_ms(rows: list[dict]) -> float:
  return sum(r["ms"] for r in rows)


def print_table(title: str, rows: list[dict], top: int = 20) -> None:
  print(f"{title}: {device_ms(rows):.2f} ms of device time per call; top kernels, ms per call")
  for r in rows[:top]:
    print(f"  {r['ms']:9.3f}  x{r['launches']:<6g} {r['name'][:110]}")
