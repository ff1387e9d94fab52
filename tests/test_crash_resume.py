"""kill -9 during SFT and during RL, then --resume: the run finishes as an uninterrupted one would
(same final RL metrics, same seed), and metrics.jsonl holds every step exactly once."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One 32-wide layer: the four launches spend their time tracing and compiling, and what is checked (resume
# from each checkpoint, every step once) does not depend on the model's size.
TINY = ["--sft-steps", "4", "--rl-steps", "3", "--set", "model.d_model=32", "--set", "model.num_layers=1",
        "--set", "sft.ckpt_every=2", "--set", "sft.log_every=1",
        "--set", "sft.batch_size=16", "--set", "sft.eval_prompts=8", "--set", "rl.prompts_per_step=8",
        "--set", "rl.group_size=2", "--set", "rl.num_minibatches=2", "--set", "rl.max_new_tokens=2",
        "--set", "rl.recompute_layout=home"]  # deterministic: "ready" depends on each run's timing


def _launch(run_dir, cache_dir, *extra):
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  return subprocess.Popen([sys.executable, "train.py", "--run-dir", run_dir, *TINY, *extra], cwd=ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _records(run_dir):
  path = os.path.join(run_dir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f.read().splitlines() if line.endswith("}")]


def _kill_when(proc, ready, timeout=300):
  deadline = time.monotonic() + timeout
  while not ready():
    if proc.poll() is not None:
      raise AssertionError(f"run ended before the kill point:\n{proc.stderr.read()[-3000:]}")
    if time.monotonic() > deadline:
      proc.kill()
      raise AssertionError("kill point not reached in time")
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()


def _finish(proc):
  _, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]


def _final(run_dir):
  last = [r["rl"] for r in _records(run_dir) if "rl" in r][-1]
  return {k: last[k] for k in ("reward", "kl", "loss")}


@pytest.mark.slow
def test_kill_minus_9_in_sft_and_in_rl_then_resume_matches_an_uninterrupted_run(tmp_path):
  cache = str(tmp_path / "jax_cache")
  ref_dir, run_dir = str(tmp_path / "ref"), str(tmp_path / "run")
  reference = _launch(ref_dir, cache)
  _finish(reference)

  proc = _launch(run_dir, cache)  # killed once SFT has saved step 2 and is past it
  _kill_when(proc, lambda: any(r.get("step", 0) >= 3 and "sft/loss" in r for r in _records(run_dir)))
  proc = _launch(run_dir, cache, "--resume")  # killed once RL step 0 is logged
  _kill_when(proc, lambda: any("rl" in r for r in _records(run_dir)))
  _finish(_launch(run_dir, cache, "--resume"))

  records = _records(run_dir)
  sft_steps = [r["step"] for r in records if "sft/loss" in r]
  rl_steps = [r["step"] for r in records if "rl" in r]
  assert sft_steps == [1, 2, 3, 4] and rl_steps == [0, 1, 2], (sft_steps, rl_steps)
  assert [r["step"] for r in records if "sft/accuracy" in r] == [4]
  assert _final(run_dir) == _final(ref_dir)
  with open(os.path.join(run_dir, "summary.json")) as f:
    assert json.load(f)["steps"] >= 1
