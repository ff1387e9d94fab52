"""Trace routes for the RL step: expert/layer mapping against a per-token reference, windows, errors, the
trace root's resolution and fallback, and the RL-step benchmark end to end on a small hand-made trace."""
import gzip
import json
import pathlib
import re
import sys

import numpy as np
import pytest

from foremoe_jax.planner import traces
from foremoe_jax.rl import trace_routes as tr


def reference_top_k(ids, weights, trace_experts, num_experts, top_k, seen):
  """One token, one layer, written out: map (`seen`: routes to each trace expert so far in this layer),
  merge duplicates, rank by weight, fill after the first."""
  if trace_experts > num_experts:
    mapped = [e % num_experts for e in ids]
  else:
    mapped = []
    for e in ids:
      mapped.append(e + trace_experts * (seen.get(e, 0) % len(range(e, num_experts, trace_experts))))
      seen[e] = seen.get(e, 0) + 1
  score = {}
  for e, w in zip(mapped, weights):
    score[e] = score.get(e, 0.0) + float(w)
  chosen = sorted(score, key=lambda e: -score[e])[:top_k]  # stable: ties keep first-occurrence order
  i = 1
  while len(chosen) < top_k:
    filler = (chosen[0] + i) % num_experts
    chosen += [] if filler in chosen else [filler]
    i += 1
  return chosen


def random_trace(rng, s, layers, k_t, trace_experts, ties=False):
  ids = np.stack([[rng.choice(trace_experts, k_t, replace=False) for _ in range(layers)] for _ in range(s)])
  weights = rng.integers(1, 4, ids.shape) / 4 if ties else rng.random(ids.shape)
  return ids.astype(np.int16), weights.astype(np.float32)


@pytest.mark.parametrize("trace_experts, num_experts, k_t, top_k, ties", [
    (64, 16, 6, 2, False), (64, 16, 6, 4, True), (8, 4, 3, 4, False), (64, 64, 6, 4, True),
    (64, 128, 6, 8, False), (4, 10, 2, 3, True), (6, 3, 3, 3, True), (16, 8, 4, 1, False),
])
def test_map_experts_matches_the_per_token_reference(trace_experts, num_experts, k_t, top_k, ties):
  rng = np.random.default_rng(trace_experts * 1000 + num_experts + top_k)
  ids, weights = random_trace(rng, 40, 3, k_t, trace_experts, ties)
  mapped = tr.map_experts(ids, weights, trace_experts, num_experts, top_k)
  assert mapped.shape == (40, 3, top_k) and mapped.dtype == np.int32
  assert mapped.min() >= 0 and mapped.max() < num_experts
  assert all(len(set(tok)) == top_k for tok in mapped.reshape(-1, top_k))  # no repeated expert in a token
  seen = [{} for _ in range(3)]
  for n in range(40):
    for layer in range(3):
      assert mapped[n, layer].tolist() == reference_top_k(ids[n, layer], weights[n, layer], trace_experts,
                                                          num_experts, top_k, seen[layer]), (n, layer)
  np.testing.assert_array_equal(mapped, tr.map_experts(ids, weights, trace_experts, num_experts, top_k))


def test_folding_adds_the_weights_of_experts_that_merge():
  ids, weights = np.array([[[0, 4, 1]]]), np.array([[[0.5, 0.3, 0.6]]], np.float32)
  # 0 and 4 fold into 0 (0.8) and outrank 1 (0.6); a third choice is the filler after expert 0.
  assert tr.map_experts(ids, weights, 8, 4, 2).tolist() == [[[0, 1]]]
  assert tr.map_experts(ids, weights, 8, 4, 3).tolist() == [[[0, 1, 2]]]


def test_replicas_share_their_trace_experts_load_in_turn():
  ids = np.array([0, 2, 3] * 12).reshape(36, 1, 1)
  mapped = tr.map_experts(ids, np.ones(ids.shape, np.float32), 4, 10, 1)[:, 0, 0]
  np.testing.assert_array_equal(mapped[:6], [0, 2, 3, 4, 6, 7])  # replicas: 0 -> 0,4,8; 2 -> 2,6; 3 -> 3,7
  loads = np.bincount(mapped, minlength=10)
  assert loads[[0, 4, 8]].tolist() == [4, 4, 4] and loads[[2, 6]].tolist() == [6, 6]
  assert loads[[3, 7]].tolist() == [6, 6] and loads[[1, 5, 9]].sum() == 0


def test_model_layers_replay_trace_layers_modulo():
  rng = np.random.default_rng(0)
  ids, weights = random_trace(rng, 50, 3, 6, 64)
  hook = tr.TraceRoutes(ids, weights, trace_experts=64, num_experts=16, num_layers=7, top_k=2, group_size=1)
  direct = tr.map_experts(ids, weights, 64, 16, 2)
  for layer in range(7):
    np.testing.assert_array_equal(hook.mapped_SxLxK[:, layer], direct[:, layer % 3])


def test_windows_share_the_prompt_within_a_group_and_stop_at_the_length():
  prompt_B, lengths_B = np.array([3, 3, 3, 5, 5, 5]), np.array([7, 4, 3, 9, 5, 10])
  index = tr.stream_index(lengths_B, prompt_B, 10, 3, 1000, seed=1)
  assert index.shape == (6, 10)
  for g in range(2):
    rows = index[3 * g:3 * g + 3, :prompt_B[3 * g]]
    assert (rows == rows[0]).all() and (np.diff(rows[0]) == 1).all()  # one contiguous prompt window
  for b in range(6):
    assert (index[b, lengths_B[b]:] == -1).all() and (index[b, :lengths_B[b]] >= 0).all()
    assert (np.diff(index[b, prompt_B[b]:lengths_B[b]]) == 1).all()  # each completion: its own window
  assert index[0, 3] != index[1, 3]  # the group's completions do not share a window
  assert not np.array_equal(index[0, :3], index[3, :3])  # nor do different groups' prompts
  np.testing.assert_array_equal(index, tr.stream_index(lengths_B, prompt_B, 10, 3, 1000, seed=1))
  assert not np.array_equal(index, tr.stream_index(lengths_B, prompt_B, 10, 3, 1000, seed=2))
  assert index.max() < 1000


def test_a_block_of_rows_gets_its_windows_in_the_whole_batch():
  """A process replays trace routes on its own rows only: its block's windows are the whole batch's, also
  when the block splits a group."""
  prompt_B, lengths_B = np.array([3, 3, 3, 5, 5, 5]), np.array([7, 4, 3, 9, 5, 10])
  whole = tr.stream_index(lengths_B, prompt_B, 10, 3, 1000, seed=1)
  for rows in (range(0, 2), range(2, 6)):
    part = tr.stream_index(lengths_B[rows.start:rows.stop], prompt_B[rows.start:rows.stop], 10, 3, 1000, seed=1,
                           rows=rows, num_rows=6)
    np.testing.assert_array_equal(part, whole[rows.start:rows.stop])


def test_trace_routes_replace_real_positions_and_keep_the_rest():
  rng = np.random.default_rng(3)
  ids, weights = random_trace(rng, 64, 2, 6, 64)
  hook = tr.TraceRoutes(ids, weights, trace_experts=64, num_experts=16, num_layers=2, top_k=2, group_size=2)
  live = np.full((4, 12, 2, 2), -7, np.int32)
  lengths, prompts = np.array([12, 5, 8, 2]), np.array([2, 2, 1, 1])
  routes = hook.routes(live, lengths, prompts)
  index = tr.stream_index(lengths, prompts, 12, 2, 64, seed=0)
  assert routes.dtype == np.int32 and routes.shape == live.shape
  for b in range(4):
    np.testing.assert_array_equal(routes[b, :lengths[b]], hook.mapped_SxLxK[index[b, :lengths[b]]])
    assert (routes[b, lengths[b]:] == -7).all()


@pytest.mark.parametrize("call, message", [
    (lambda: tr.map_experts(np.zeros((4, 2)), np.zeros((4, 2)), 8, 4, 2), r"\[S, L, k\]"),
    (lambda: tr.map_experts(np.zeros((4, 2, 3)), np.zeros((4, 2, 2)), 8, 4, 2), r"\[S, L, k\]"),
    (lambda: tr.map_experts(np.full((4, 2, 3), 8), np.zeros((4, 2, 3)), 8, 4, 2), r"in \[0, 8\)"),
    (lambda: tr.map_experts(np.zeros((4, 2, 3)), np.full((4, 2, 3), -1.0), 8, 4, 2), "finite and >= 0"),
    (lambda: tr.map_experts(np.zeros((4, 2, 3)), np.zeros((4, 2, 3)), 8, 4, 5), "top_k"),
    (lambda: tr.stream_index(np.array([5, 5, 5]), np.array([1, 1, 1]), 8, 2, 100, 0), "multiple of group_size"),
    (lambda: tr.stream_index(np.array([9, 5]), np.array([1, 1]), 8, 1, 100, 0), "prompt_length <= length"),
    (lambda: tr.stream_index(np.array([5, 5]), np.array([1, 1]), 8, 1, 7, 0), "7 tokens, fewer than"),
    (lambda: tr.TraceRoutes(np.zeros((9, 2, 3)), np.ones((9, 2, 3)), trace_experts=8, num_experts=4, num_layers=3,
                            top_k=2, group_size=1).routes(np.zeros((2, 8, 2, 2)), [4, 4], [1, 1]),
     r"\(L, k\) = \(3, 2\)"),
])
def test_bad_input_is_named(call, message):
  with pytest.raises(ValueError, match=message):
    call()


def write_esft(root: pathlib.Path, task: str, layers: int, sequences) -> None:
  """An ESFT-format trace directory: per layer, one line per sequence of top-6 ids then gate weights."""
  task_dir = root / traces.ESFT_DIR / task
  task_dir.mkdir(parents=True)
  for layer in range(1, layers + 1):
    lines = ["\t".join(map(str, ids.ravel())) + "\t\t" + "\t".join(f"{w:.4f}" for w in weights.ravel())
             for ids, weights in sequences]
    with gzip.open(task_dir / f"expert_weights_{layer}.txt.gz", "wt") as f:
      f.write("\n".join(lines) + "\n")


def test_resolve_routes_and_the_fallback_flag(tmp_path, monkeypatch):
  monkeypatch.delenv("FOREMOE_TRACES", raising=False)
  assert tr.resolve("live") == (None, "live")
  with pytest.raises(ValueError, match="live, traces or traces:ROOT"):
    tr.resolve("replay")
  with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nowhere"))):
    tr.resolve(f"traces:{tmp_path / 'nowhere'}")
  default = traces.traces_root
  monkeypatch.setattr(traces, "traces_root", lambda: tmp_path / "missing")
  assert tr.resolve("traces") == (None, f"live (traces not found at {tmp_path / 'missing'})")
  monkeypatch.setattr(traces, "traces_root", default)
  monkeypatch.setenv("FOREMOE_TRACES", str(tmp_path / "env"))  # asked for by name: an error, not a fallback
  with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "env"))):
    tr.resolve("traces")
  write_esft(tmp_path / "env", "intent", 1, [(np.zeros((2, 6), int), np.zeros((2, 6)))])
  assert tr.resolve("traces")[0] == tmp_path / "env"
  assert tr.resolve(f"traces:{tmp_path / 'env'}")[0] == tmp_path / "env"


def test_esft_stream_reads_ids_and_weights_in_order(tmp_path):
  rng = np.random.default_rng(4)
  sequences = [(np.stack([rng.choice(64, 6, replace=False) for _ in range(n)]), rng.random((n, 6)).round(4))
               for n in (3, 5)]
  write_esft(tmp_path, "law", 3, sequences)
  ids, weights = traces.load_esft_stream(tmp_path, ["law"], num_layers=2)
  assert ids.shape == weights.shape == (8, 2, 6)
  np.testing.assert_array_equal(ids[:, 1], np.concatenate([s[0] for s in sequences]))
  np.testing.assert_allclose(weights[:, 0], np.concatenate([s[1] for s in sequences]), atol=1e-6)
  with pytest.raises(ValueError, match="layers 1..26"):
    traces.load_esft_stream(tmp_path, ["law"], num_layers=27)


@pytest.fixture(scope="module")
def esft_root():
  root = traces.traces_root()
  if not (root / traces.ESFT_DIR).is_dir():
    pytest.skip(f"ESFT traces not found under {root} (set FOREMOE_TRACES)")
  return root


@pytest.mark.parametrize("num_experts, top_k, num_layers", [(16, 2, 2), (64, 4, 12), (128, 8, 30)])
def test_real_esft_routes_mapped_to_model_shapes(esft_root, num_experts, top_k, num_layers):
  hook = tr.esft_trace_routes(esft_root, num_experts=num_experts, num_layers=num_layers, top_k=top_k,
                              group_size=8, tasks=["law"])
  mapped = hook.mapped_SxLxK
  assert mapped.shape == (8327, num_layers, top_k) and 0 <= mapped.min() and mapped.max() < num_experts
  assert (np.sort(mapped, -1)[..., 1:] != np.sort(mapped, -1)[..., :-1]).all()
  load = np.bincount(mapped[:, 0].ravel(), minlength=num_experts)
  assert load.max() / load.mean() > 1.3  # a trained router's skew survives the mapping


def test_rl_step_benchmark_replays_trace_routes(tmp_path):
  """The benchmark at the smallest cut, on a trace whose every token picks experts 0 and 1 (one device's
  two home experts): the static placement's imbalance shows the trace's routes reached the planner."""
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
  import rl_step
  ids = np.tile([0, 1, 2, 3, 4, 5], (40, 1))
  write_esft(tmp_path, "intent", 2, [(ids, np.tile([0.5, 0.4, 0.03, 0.03, 0.02, 0.02], (40, 1)))])
  out = tmp_path / "rl_step.json"
  result = rl_step.main(["--config", "cpu_tiny", "--routes", f"traces:{tmp_path}", "--trace-tasks", "intent",
                         "--policies", "static", "--repeats", "1", "--set", "rl.prompts_per_step=8",
                         "--out", str(out)])
  assert json.loads(out.read_text())["routes"].startswith("traces (ESFT intent, layers 1..2")
  # Every real token loads device 0 only; positions past a row's end replay spread routes.
  assert result["rows"][0]["policy"] == "static" and result["rows"][0]["imbalance"] > 3
