"""train.py end to end: SFT warm start, then GRPO steps with foresight, on 8 CPU devices."""
import json
import os

import pytest

import train
from foremoe_jax.planner import POLICIES


def test_train_cli_learns_and_writes_summary_plot_and_metrics(tmp_path):
  """The default preset (fixed seed): GRPO raises the sampled reward over the SFT start; with
  rl.report_policies the summary compares every policy."""
  run_dir = str(tmp_path / "run")
  summary = train.main(["--rl-steps", "12", "--run-dir", run_dir, "--set", "sft.eval_prompts=64",
                        "--set", "rl.report_policies=true"])
  with open(os.path.join(run_dir, "summary.json")) as f:
    saved = json.load(f)
  for key in ("steps", "reward_first", "reward_last", "imbalance", "seconds_per_stage", "policy", "devices",
              "backend", "dispatch", "gmm_backend", "dispatch_backend"):
    assert key in saved, key
  assert saved["steps"] == 12 and saved["devices"] == 8 and saved["policy"] == "foremoe"
  assert set(saved["seconds_per_stage"]) == {"rollout", "postprocess", "plan_wait", "recompute", "update", "record"}
  assert saved["tokens_per_s"] > 0 and saved["train_tokens_per_s"] > 0 and 0 < saved["moe_flop_share"] < 1
  assert 0 <= saved["plan_wait_share"] < 1 and saved["real_tokens"] > 0 and saved["step_s"] > 0
  imbalance = saved["imbalance"]
  assert set(imbalance) == set(POLICIES)  # rl.report_policies: every policy planned on each step's counts
  assert imbalance["foremoe"] <= imbalance["eplb_step"] + 1e-3 and imbalance["foremoe"] < imbalance["static"]
  assert os.path.getsize(summary["plot"]) > 1000
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    rl_lines = [json.loads(line) for line in f if '"rl"' in line]
  assert len(rl_lines) == 12 and all(r["rl"]["dropped"] == 0 for r in rl_lines)
  rewards = [r["rl"]["reward"] for r in rl_lines]
  assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.04, rewards
  assert os.path.isdir(os.path.join(run_dir, "rl_ckpt"))


def test_bad_cli_input_is_refused_before_any_work(tmp_path):
  with pytest.raises(ValueError, match="unknown key"):
    train.main(["--set", "rl.nope=1", "--run-dir", str(tmp_path)])
  with pytest.raises(ValueError, match="policy"):
    train.main(["--policy", "magic", "--run-dir", str(tmp_path)])
  with pytest.raises(FileNotFoundError, match="missing.tsv"):
    train.main(["--set", "rl.prompt_file=missing.tsv", "--sft-steps", "0", "--run-dir", str(tmp_path)])
