"""cpu_text end to end (train.py: text prompts in, decoded responses and a verified reward out), the
expert-load monitor against a direct count, and the rollout's response-length statistics."""
import json
import os

import numpy as np
import pytest

pytest.importorskip("tiktoken")
pytest.importorskip("math_verify")

from foremoe_jax.load_monitor import expert_tokens, load_record, plot_load  # noqa: E402
from foremoe_jax.rl.rollout import length_stats  # noqa: E402


def test_expert_tokens_counts_real_positions_only():
  rng = np.random.default_rng(0)
  routes = rng.integers(0, 6, size=(3, 5, 2, 2))
  lengths = np.array([5, 2, 0])
  want = np.zeros((2, 6), np.int64)
  for b in range(3):
    for t in range(lengths[b]):
      for l in range(2):
        for e in routes[b, t, l]:
          want[l, e] += 1
  np.testing.assert_array_equal(expert_tokens(routes, lengths, 6), want)
  record = load_record(want, {"static": np.array([[4.0, 0.0], [1.0, 1.0]])})
  assert record["device_imbalance"]["static"] == pytest.approx((2.0 + 1.0) / 2)
  assert record["expert_imbalance"]["layer0"] == pytest.approx(want[0].max() / want[0].mean())


def test_length_stats():
  eos = 9
  tokens = np.array([[1, 5, eos, 0], [1, 5, 5, 5], [1, 1, 5, eos]])
  stats = length_stats(tokens, np.array([3, 4, 4]), np.array([1, 1, 2]), eos_id=eos, max_new_tokens=3)
  assert stats == {"mean": pytest.approx(7 / 3), "max": 3, "clipped_share": pytest.approx(1 / 3)}


def test_cpu_text_end_to_end(tmp_path):
  import train  # noqa: PLC0415
  from foremoe_jax.text.tokenizer import qwen3  # noqa: PLC0415

  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text("".join(json.dumps({"prompt": f"What is {a} plus {b}?", "answer": str(a + b)}) + "\n"
                             for a, b in [(2, 3), (4, 4), (10, 7), (6, 1)]) + '{"prompt": "' + "long " * 50
                     + '", "answer": "1"}\n', encoding="utf-8")
  run_dir = tmp_path / "run"
  summary = train.main([
      "--config", "cpu_text", "--run-dir", str(run_dir), "--sft-steps", "1", "--rl-steps", "1",
      "--set", f"task.data={prompts}", "--set", "task.max_prompt_tokens=24", "--set", "task.max_answer_tokens=6",
      "--set", "model.num_layers=1", "--set", "model.max_seq_len=32", "--set", "sft.batch_size=8",
      "--set", "sft.eval_prompts=8", "--set", "rl.prompts_per_step=4", "--set", "rl.group_size=2",
      "--set", "rl.max_new_tokens=7", "--set", "rl.num_minibatches=1", "--set", "rl.recompute_layout=plan",
      "--set", "rl.tokens_per_shard=64"])
  assert summary["tokenizer"]["name"] == "qwen3" and summary["tokenizer"]["eos_id"] == 151645
  assert "4 problems, 1 dropped" in summary["task"] and "math_verify" in summary["reward_rule"]
  assert summary["steps"] == 1 and 0.0 <= summary["reward_first"] == summary["reward_last"] <= 1.1
  assert 1 <= summary["response_length"]["max"] <= 7 and 0 <= summary["response_length"]["clipped_share"] <= 1
  sample = summary["samples"][0]
  assert sample["prompt"].startswith("What is") and isinstance(sample["response"], str)
  with open(summary["samples_file"], encoding="utf-8") as f:
    assert json.loads(f.readline())["samples"][0]["answer"] == sample["answer"]
  with open(run_dir / "metrics.jsonl", encoding="utf-8") as f:
    rl = [json.loads(line)["rl"] for line in f if '"rl"' in line][0]
  load = rl["load"]
  assert np.asarray(load["expert_tokens_LxE"]).shape == (1, 16)
  # Every real position (prompt + response) of the 4 x 2 rows, routed to top_k = 2 experts.
  tok = qwen3()
  prompt_tokens = sum(len(tok.encode(tok.chat(s["prompt"]))) for s in summary["samples"]) * 2
  assert np.sum(load["expert_tokens_LxE"]) == 2 * (prompt_tokens + round(8 * summary["response_length"]["mean"]))
  assert set(load["device_tokens_MxD"]) == set(rl["imbalance"]) == {"static", "foremoe"}  # rl.report_policies off
  assert np.asarray(load["device_tokens_MxD"]["static"]).shape[1] == 8
  assert os.path.getsize(summary["load_plot"]) > 0 and os.listdir(run_dir / "tb")
  assert plot_load([rl, rl], tmp_path / "again.png").endswith("again.png")
