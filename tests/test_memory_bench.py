"""benchmarks/memory.py: the analytic state bytes equal what the executor's compiled programs take as
arguments, and the script's tables and JSON come out (CPU, a one-layer tiny model)."""
import dataclasses
import json
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import memory  # noqa: E402

TINY = ["model.moe.num_experts=16", "model.num_layers=1", "model.scan_layers=true", "model.remat=block",
        "rl.adam_dtype=float32", "rl.rows_per_shard=2"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  out = tmp_path_factory.mktemp("memory") / "memory.json"
  result = memory.main(["--preset", "cpu_tiny", "--ep", "2", "--programs", "last", "--seq-len", "16", "--skew", "2",
                        "--unit", "MiB", "--out", str(out)] + sum((["--set", s] for s in TINY), []))
  return result, json.loads(out.read_text())


@pytest.mark.parametrize("changes", [dict(scan_layers=True), dict(moe_every=2, num_layers=3),
                                     dict(qk_norm_scope="projection"), dict(qk_norm=False)])
def test_param_counts_match_the_model(changes):
  from foremoe_jax.model import param_count
  cfg = memory.ep_config("cpu_tiny", 2, [])
  m = dataclasses.replace(cfg.model, **changes)
  counts = memory.param_counts(m)
  assert counts["dense"] + counts["expert"] == param_count(memory.abstract_model(m, memory.expert_mesh(2)))


def test_json_has_the_run(run):
  _, saved = run
  assert saved["eps"] == [2] and saved["backend"] == "cpu" and saved["jax"]
  assert saved["shapes"]["rows"] == 2 and saved["shapes"]["seq_len"] == 16 and saved["shapes"]["remat"] == "block"
  for r in saved["results"]:
    stats = r["programs"]["last"]["memory"]
    assert set(stats) == {"argument", "output", "alias", "temp", "generated_code"}
    assert stats["argument"] > 0 and stats["temp"] > 0


def test_tables_print(run, capsys):
  memory.print_tables(run[1], "MiB")
  text = capsys.readouterr().out
  assert "| EP | slots / device |" in text and "analytic vs compiled (cpu" in text and "| 2 | last |" in text


@pytest.mark.parametrize("part", ["weights", "acc", "slots", "batch"])
def test_analytic_state_equals_compiled_arguments(run, part):
  """The last micro-step's program (with the update) reads every parameter, accumulator, slot and the
  batch: its argument bytes per part are the analytic ones, to the byte (EP 2: base and working slots),
  but for the held replica gradients where it reads none (no tenure of two micro-steps or more is alive
  in it), which XLA prunes; they stay resident: the executor's state has them."""
  result = run[0]["results"][0]
  last = result["programs"]["last"]
  pruned = part == "acc" and not last["reads_held"]
  assert result["analytic"]["held"] > 0 and result["analytic"]["held"] % 4 == 0
  assert last["argument_parts"][part] + pruned * result["analytic"]["held"] == result["analytic"]["parts"][part]
  assert result["state_bytes"][part] == result["analytic"]["parts"][part]


def test_argument_parts_sum_to_the_memory_analysis(run):
  """Per-part bytes from the input shardings add up to XLA's argument size (nothing else is passed)."""
  for r in run[0]["results"]:
    last = r["programs"]["last"]
    assert sum(last["argument_parts"].values()) == last["memory"]["argument"]


def test_adam_moments_sharded_as_their_weights(run):
  """The moments take their parameters' shardings (experts' over "expert"): the compiled argument bytes of
  the optimizer state equal the analytic per-device ones (replicated moments would add (D - 1) / D)."""
  result = run[0]["results"][0]
  assert result["programs"]["last"]["argument_parts"]["adam"] == result["analytic"]["parts"]["adam"]
