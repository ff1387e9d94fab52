"""train.py as two jax.distributed processes on CPU (4 virtual devices each, gloo collectives) against the
one-process 8-device run of the same seed: same SFT loss, rewards, losses, plans and imbalance per step,
with each process building only its own rows; then `--resume` in two processes continues from the
checkpoints. Plus the launch helpers' unit checks."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from foremoe_jax import distributed, launch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The smallest run that still has an SFT step, a rollout, a plan, a recompute and an update per RL step; the
# evaluation and the rollout have the same shapes (32 rows, 3 new tokens), so they share one program.
TINY = ["--sft-steps", "1", "--set", "model.d_model=32", "--set", "model.num_layers=1", "--set", "sft.batch_size=16",
        "--set", "sft.eval_prompts=32", "--set", "rl.prompts_per_step=8", "--set", "rl.group_size=4",
        "--set", "rl.num_minibatches=1", "--set", "rl.max_new_tokens=3", "--set", "rl.compile_workers=0",
        "--set", "rl.recompute_layout=plan"]  # deterministic: "ready" depends on each run's timing
TIMEOUT_S = 400  # a loaded 2-core box; a hung collective must still end the test


def _env(cache_dir) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_", "SLURM_", "OMPI_"))}
  # The resumed run reuses the first two-process run's programs: the compiles dominate this test.
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, JAX_COMPILATION_CACHE_DIR=str(cache_dir),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
  # The caller's XLA flags but its device count (train.py and the launcher set each process's): -O0 from
  # scripts/test.sh makes the five train.py processes' compiles cheaper.
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform")]
  if flags:
    env["XLA_FLAGS"] = " ".join(flags)
  return env


def _run(cmd, env, what):
  """Runs cmd in its own process group; on timeout the group (launcher and children) is killed."""
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          start_new_session=True, text=True)
  try:
    out, _ = proc.communicate(timeout=TIMEOUT_S + 30)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    out, _ = proc.communicate()
    pytest.fail(f"{what} timed out after {TIMEOUT_S + 30} s:\n{out[-4000:]}")
  assert proc.returncode == 0, f"{what} failed ({proc.returncode}):\n{out[-6000:]}"
  return out


def _two(args, env, what):
  return _run([sys.executable, "-m", "foremoe_jax.launch", "--processes", "2", "--timeout", str(TIMEOUT_S),
               "train.py", *args], env, what)


def _records(run_dir):
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    lines = [json.loads(line) for line in f]
  sft = [r["sft/loss"] for r in lines if "sft/loss" in r]
  return sft, [r["rl"] for r in lines if "rl" in r]


def test_two_processes_match_one_and_resume(tmp_path):
  env = _env(tmp_path / "cache")
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  # Packed in two groups like the two processes' (one each): rl.pack_groups decides the packing.
  _run([sys.executable, "train.py", "--rl-steps", "2", "--run-dir", one, *TINY, "--set", "rl.pack_groups=2"], env,
       "one process")
  out = _two(["--rl-steps", "1", "--run-dir", two, *TINY], env, "two processes")
  assert "[p0]" in out and "[p1]" in out and "process 1 (env launch): 2 processes x 4 local devices (cpu)" in out
  out = _two(["--rl-steps", "2", "--resume", "--run-dir", two, *TINY], env, "two processes, resumed")
  assert "rl step 0:" not in out and "rl step 1:" in out  # continued from the step-1 checkpoint

  sft_1, rl_1 = _records(one)
  sft_2, rl_2 = _records(two)
  assert len(sft_2) == 1 and [r["step"] for r in rl_2] == [0, 1]  # one writer: no line twice
  np.testing.assert_allclose(sft_2, sft_1, rtol=1e-4)
  for a, b in zip(rl_1, rl_2, strict=True):
    # Host-local data: each process built its own half of the 32 rows, none another's.
    assert a["host_rows"] == [[0, 32]] and b["host_rows"] == [[0, 16], [16, 32]]
    assert b["response_length"] == a["response_length"] and b["real_token_share"] == a["real_token_share"]
    assert b["load"]["expert_tokens_LxE"] == a["load"]["expert_tokens_LxE"]
    assert b["plan_digests"] == a["plan_digests"] and b["micro_steps"] == a["micro_steps"]
    assert b["reward"] == a["reward"] and b["imbalance"] == a["imbalance"]
    assert b["imbalance_per_micro_step"] == a["imbalance_per_micro_step"]
    np.testing.assert_allclose([b["loss"], b["kl"]], [a["loss"], a["kl"]], rtol=1e-3, atol=1e-6)
  with open(os.path.join(two, "summary.json")) as f:
    summary = json.load(f)
  assert summary["processes"] == 2 and summary["devices"] == 8 and summary["steps"] == 1


def test_cpu_devices_split_over_processes():
  env = {"JAX_NUM_PROCESSES": "2"}
  distributed.setup_cpu_devices(env)
  assert "--xla_force_host_platform_device_count=4" in env["XLA_FLAGS"]
  with pytest.raises(ValueError, match="do not split evenly over 3 processes"):
    distributed.setup_cpu_devices({"SLURM_NTASKS": "3"})
  gpu = {"JAX_PLATFORMS": "cuda", "JAX_NUM_PROCESSES": "2"}
  distributed.setup_cpu_devices(gpu)
  assert "XLA_FLAGS" not in gpu
  child = launch.child_env(1, 2, 1234, 8, base={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  assert child["JAX_PROCESS_ID"] == "1" and child["JAX_COORDINATOR_ADDRESS"] == "localhost:1234"
  assert child["XLA_FLAGS"].count("device_count") == 1 and "device_count=4" in child["XLA_FLAGS"]


def test_env_launch_without_a_process_id_is_refused():
  class NoJax:  # initialize must refuse before it touches jax.distributed
    config = type("Config", (), {"update": staticmethod(lambda *a: None)})

  with pytest.raises(ValueError, match="JAX_PROCESS_ID is not"):
    distributed.initialize(NoJax, {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"})
  assert distributed.initialize(NoJax, {}) == "single"


def test_digest_sees_values_shapes_and_dtypes():
  a = np.arange(6, dtype=np.int32)
  assert np.array_equal(distributed.digest([a]), distributed.digest([a.copy()]))
  for other in (a + 1, a.reshape(2, 3), a.astype(np.int64)):
    assert not np.array_equal(distributed.digest([a]), distributed.digest([other]))


def test_true_on_every_process_ands_the_flags_over_processes(monkeypatch):
  """Two processes: a flag true on one of them only is false on both (they then choose alike)."""
  monkeypatch.setenv("PYTHONPATH", ROOT)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  code = ("import sys, jax; from foremoe_jax import distributed; distributed.initialize(jax); "
          "me = jax.process_index(); every = distributed.true_on_every_process; "
          "sys.exit(0 if every(True) and not every(me == 0) and not every(me == 1) and not every(False) else 5)")
  assert launch.launch([sys.executable, "-c", code], 2, timeout=120) == 0


def test_launcher_stops_peers_when_one_fails():
  code = "import os, sys, time; sys.exit(3) if os.environ['JAX_PROCESS_ID'] == '1' else time.sleep(60)"
  assert launch.launch([sys.executable, "-c", code], 2, timeout=30) == 3


def test_mesh_mismatch_names_processes_and_local_devices():
  from foremoe_jax.mesh import make_mesh  # noqa: PLC0415
  with pytest.raises(ValueError, match=r"JAX sees 8 = 1 processes x 8 local devices"):
    make_mesh(2, 8)
