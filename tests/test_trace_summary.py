"""benchmarks/trace_summary.py on a hand-made perfetto trace: classes, busy time, every GPU."""
import gzip
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import trace_summary  # noqa: E402


def write_trace(directory: Path, events: list[dict],
                processes=((1, "/host:CPU"), (7, "/device:GPU:0"), (9, "/device:GPU:1"))) -> None:
  meta = [{"ph": "M", "name": "process_name", "pid": pid, "args": {"name": name}} for pid, name in processes]
  with gzip.open(directory / "perfetto_trace.json.gz", "wt") as f:
    json.dump({"traceEvents": meta + events}, f)


def test_summary_per_class_and_per_gpu(tmp_path):
  x = lambda pid, name, ts, dur: {"ph": "X", "pid": pid, "name": name, "ts": ts, "dur": dur}  # noqa: E731
  write_trace(tmp_path, [
      x(7, "ws_body_mosaic_gpu_kernel", 0, 2000), x(7, "ncclDevKernel_SendRecv", 1000, 2000),
      x(7, "loop_add_fusion", 5000, 1000), x(1, "host_op", 0, 99000),
      x(9, "ws_body_mosaic_gpu_kernel", 0, 4000), x(9, "input_scatter_fusion", 6000, 500)])
  s = trace_summary.summarize(tmp_path)
  assert s["device"] == "/device:GPU:0"
  assert s["by_class_ms"] == {"grouped_matmul": 2.0, "ppermute": 2.0, "other": 1.0}
  assert s["busy_ms"] == pytest.approx(4.0) and s["span_ms"] == pytest.approx(6.0)  # overlap counted once
  gpu1 = s["by_gpu"][1]
  assert gpu1["device"] == "/device:GPU:1" and gpu1["busy_ms"] == pytest.approx(4.5)
  assert gpu1["by_class_ms"] == {"grouped_matmul": 4.0, "gather_scatter": 0.5}
  assert "/device:GPU:1: busy 4.5 ms" in trace_summary.format_summary(s)


def test_summary_per_program_and_op(tmp_path):
  def x(pid, name, dur, module=None, op=None):
    args = {k: v for k, v in (("hlo_module", module), ("hlo_op", op)) if v}
    return {"ph": "X", "pid": pid, "name": name, "ts": 0, "dur": dur, "args": args}
  write_trace(tmp_path, [
      x(7, "MemcpyP2P", 3000, "jit__micro_fn(4)", "all-to-all.2"), x(7, "MemcpyP2P", 1000, "jit__micro_fn(9)",
                                                                      "all-to-all.2"),
      x(7, "loop_add_fusion", 500, "jit__finish_fn(1)", "add.3"), x(7, "untagged", 250),
      x(9, "ncclDevKernel_SendRecv", 2000, "jit__micro_fn(4)", "all-to-all.2")])
  s = trace_summary.summarize(tmp_path)
  assert s["by_gpu"][0]["by_program_ms"] == {"jit__micro_fn": 4.0, "jit__finish_fn": 0.5, "?": 0.25}
  assert s["by_gpu"][1]["by_program_ms"] == {"jit__micro_fn": 2.0}
  assert s["top_ops_ms"] == [("jit__micro_fn/all-to-all.2 [MemcpyP2P]", 4.0),
                             ("jit__finish_fn/add.3 [loop_add_fusion]", 0.5)]
  assert s["program_top_ops_ms"] == {"jit__micro_fn": [("all-to-all.2 [MemcpyP2P]", 4.0)],
                                     "jit__finish_fn": [("add.3 [loop_add_fusion]", 0.5)]}
  text = trace_summary.format_summary(s)
  assert "jit__micro_fn 4.0" in text and "jit__finish_fn op     0.500 ms  add.3" in text
  assert [(ms, name) for ms, name, _ in s["longest_events"]] == [(3.0, "MemcpyP2P"), (1.0, "MemcpyP2P"),
                                                                  (0.5, "loop_add_fusion"), (0.25, "untagged")]
  assert '"hlo_op": "all-to-all.2"' in s["longest_events"][0][2]


def test_summary_without_gpu_says_so(tmp_path):
  write_trace(tmp_path, [], processes=((1, "/host:CPU"),))
  assert "no GPU process" in trace_summary.summarize(tmp_path)["error"]


def test_idle_gaps_are_named_by_the_programs_around_them():
  def x(ts, dur, module):
    return {"ph": "X", "name": "k", "ts": ts, "dur": dur, "args": {"hlo_module": module}}
  events = [x(0, 100, "jit_begin(1)"), x(50, 30, "jit_begin(1)"),  # overlap: the gap starts at 100
            x(400, 100, "jit_micro(2)"), x(510, 100, "jit_micro(2)"),  # 10 us: under the threshold
            x(700, 100, "jit_micro(3)"), x(1000, 50, "jit_finish(4)")]
  assert trace_summary.idle_gaps(events) == [("jit_begin -> jit_micro", 0.3, 1), ("jit_micro -> jit_finish", 0.2, 1),
                                             ("jit_micro -> jit_micro", 0.09, 1)]  # largest first
