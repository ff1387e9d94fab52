"""Per-kernel GPU time of a `jax.profiler` trace (the perfetto JSON it writes), for the benchmarks.

    python benchmarks/trace_summary.py TRACE_DIR [--top 25]

Sums each device event's duration by name on the first GPU's tracks and by a coarse class (grouped
matmul, all-to-all, ppermute, sort, gather/scatter, other), so a benchmark can say where a step's
time goes without a trace viewer. Overlapping streams are summed, so totals can exceed wall time;
`busy_ms` (the union of the GPU's event intervals) against `span_ms` (first start to last end) says how
long that GPU sat idle within the traced step. Where the profiler tags events with their XLA program and
HLO op (`hlo_module`, `hlo_op` args), time is also summed per program (each GPU) and per op (first GPU),
so a kernel such as a peer memcpy can be traced to the program and op that issued it. `idle_gaps` says
where the first GPU sat idle: each gap between its busy intervals, summed by the programs on either side.
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib

CLASSES = (  # first match wins; lowercase substrings of kernel / op names
    ("all_to_all", ("all-to-all", "all_to_all", "alltoall")),
    ("ppermute", ("collective-permute", "sendrecv", "send_recv", "ppermute")),
    ("other_collective", ("nccl", "all-reduce", "all-gather", "reduce-scatter")),
    ("grouped_matmul", ("mosaic", "gmm", "pallas", "wgmma")),
    ("dense_matmul", ("gemm", "cublas", "dot", "matmul", "sm90_xmma", "cutlass")),
    ("sort", ("sort", "cub::", "radix")),
    ("gather_scatter", ("gather", "scatter", "dynamic-slice", "dynamic_slice", "dynamic-update-slice")),
)


def classify(name: str) -> str:
  low = name.lower()
  return next((cls for cls, keys in CLASSES if any(k in low for k in keys)), "other")


def load_events(directory: pathlib.Path) -> list[dict]:
  paths = sorted(directory.rglob("perfetto_trace.json.gz")) or sorted(directory.rglob("*.trace.json.gz"))
  if not paths:
    raise FileNotFoundError(f"no perfetto_trace.json.gz under {directory}")
  with gzip.open(paths[-1], "rt") as f:
    doc = json.load(f)
  return doc["traceEvents"] if isinstance(doc, dict) else doc


def busy_and_span_ms(spans_us: list[tuple[float, float]]) -> tuple[float, float]:
  """(length of the union of [start, end) intervals, last end - first start), microseconds -> ms."""
  busy, reach = 0.0, float("-inf")
  for start, end in sorted(spans_us):
    busy += max(0.0, end - max(start, reach))
    reach = max(reach, end)
  span = reach - min(s for s, _ in spans_us) if spans_us else 0.0
  return busy / 1e3, span / 1e3


def idle_gaps(events: list[dict], min_us: float = 20.0, top: int = 8) -> list[tuple[str, float, int]]:
  """Idle time between one GPU's busy intervals, by (program before -> program after): [(pair, ms, count)]
  for gaps of at least `min_us`, largest total first. Says whether a step waits on the host (gaps
  between programs) or inside a program (gaps within it)."""
  reach, last, gaps = None, None, collections.defaultdict(lambda: [0.0, 0])
  for e in sorted(events, key=lambda e: e["ts"]):
    if reach is not None and e["ts"] - reach >= min_us:
      entry = gaps[f"{program_of(last)} -> {program_of(e)}"]
      entry[0] += (e["ts"] - reach) / 1e3
      entry[1] += 1
    if reach is None or e["ts"] + e["dur"] > reach:
      reach, last = e["ts"] + e["dur"], e
  return [(pair, round(ms, 3), n) for pair, (ms, n) in sorted(gaps.items(), key=lambda kv: -kv[1][0])[:top]]


def program_of(event: dict) -> str:
  """The XLA program an event ran in, without its unique-id suffix ("jit_f(12)" -> "jit_f"); "?" if untagged."""
  return str(event.get("args", {}).get("hlo_module", "?")).split("(")[0]


def summarize(directory, top: int = 25) -> dict:
  events = load_events(pathlib.Path(directory))
  names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  gpus = sorted((n, pid) for pid, n in names.items() if "gpu" in n.lower())
  if not gpus:
    return {"error": f"no GPU process in the trace; processes: {sorted(set(names.values()))[:10]}"}
  gpu_of = {pid: i for i, (_, pid) in enumerate(gpus)}
  by_name, count, by_op = collections.Counter(), collections.Counter(), collections.Counter()
  ops_by_program = collections.defaultdict(collections.Counter)  # the first GPU's ops within each program
  longest = []  # the first GPU's longest single events, with their args (sizes of copies, ops)
  by_class = [collections.Counter() for _ in gpus]
  by_program = [collections.Counter() for _ in gpus]
  spans = [[] for _ in gpus]
  first_gpu = []
  for e in events:
    i = gpu_of.get(e.get("pid"))
    if i is not None and e.get("ph") == "X" and "dur" in e:
      by_class[i][classify(e["name"])] += e["dur"] / 1e3
      by_program[i][program_of(e)] += e["dur"] / 1e3
      spans[i].append((e["ts"], e["ts"] + e["dur"]))
      if i == 0:
        first_gpu.append(e)
        by_name[e["name"]] += e["dur"] / 1e3
        count[e["name"]] += 1
        longest.append((e["dur"] / 1e3, e["name"][:60], json.dumps(e.get("args", {}))[:300]))
        op = e.get("args", {}).get("hlo_op")
        if op:
          by_op[f"{program_of(e)}/{op} [{e['name'][:40]}]"] += e["dur"] / 1e3
          ops_by_program[program_of(e)][f"{op} [{e['name'][:40]}]"] += e["dur"] / 1e3
  busy_ms, span_ms = busy_and_span_ms(spans[0])
  # The first GPU in detail; every GPU's busy time and classes, since the busiest one sets the pace.
  return {"device": gpus[0][0], "total_ms": sum(by_class[0].values()), "busy_ms": busy_ms, "span_ms": span_ms,
          "by_class_ms": dict(by_class[0].most_common()),
          "top_ms": [(n, round(t, 3), count[n]) for n, t in by_name.most_common(top)],
          "top_ops_ms": [(n, round(t, 3)) for n, t in by_op.most_common(top)],
          "longest_events": [(round(ms, 3), name, args) for ms, name, args in sorted(longest, reverse=True)[:8]],
          "idle_gaps": idle_gaps(first_gpu),
          # the small programs (base transfer, update) drown in the micro-steps' list above
          "program_top_ops_ms": {p: [(n, round(t, 3)) for n, t in ops.most_common(8)]
                                 for p, ops in ops_by_program.items()},
          "by_gpu": [{"device": name, "busy_ms": busy_and_span_ms(sp)[0], "by_class_ms": dict(c.most_common()),
                      "by_program_ms": {k: round(v, 3) for k, v in prog.most_common()}}
                     for (name, _), c, sp, prog in zip(gpus, by_class, spans, by_program)]}


def format_summary(summary: dict) -> str:
  if "error" in summary:
    return summary["error"]
  lines = [f"{summary['device']}: {summary['total_ms']:.1f} ms of device events, busy {summary['busy_ms']:.1f} of "
           f"{summary['span_ms']:.1f} ms"]
  lines += [f"  {cls:16s} {ms:9.2f} ms" for cls, ms in summary["by_class_ms"].items()]
  lines += [f"  {ms:9.3f} ms  x{n:<5d} {name[:110]}" for name, ms, n in summary["top_ms"]]
  lines += [f"  op {ms:9.3f} ms  {name[:120]}" for name, ms in summary.get("top_ops_ms", [])]
  small_programs = {p: ops for p, ops in summary.get("program_top_ops_ms", {}).items() if "micro" not in p}
  lines += [f"  {program} op {ms:9.3f} ms  {name[:100]}" for program, ops in small_programs.items() for name, ms in ops]
  lines += [f"  idle {ms:9.3f} ms  x{n:<4d} {pair}" for pair, ms, n in summary.get("idle_gaps", [])]
  lines += [f"  longest {ms:9.3f} ms  {name} {args[:150]}" for ms, name, args in summary.get("longest_events", [])]
  lines += [f"{g['device']} programs: " + ", ".join(f"{p} {ms:.1f}" for p, ms in g.get("by_program_ms", {}).items())
            for g in summary.get("by_gpu", [])]
  lines += [f"{g['device']}: busy {g['busy_ms']:.1f} ms; "
            + ", ".join(f"{c} {ms:.1f}" for c, ms in g["by_class_ms"].items()) for g in summary.get("by_gpu", [])[1:]]
  return "\n".join(lines)


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("trace_dir")
  ap.add_argument("--top", type=int, default=25)
  args = ap.parse_args()
  print(format_summary(summarize(args.trace_dir, args.top)))


if __name__ == "__main__":
  main()
