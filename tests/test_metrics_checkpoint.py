"""MetricsLogger / plot / summary, and the Orbax Checkpointer with NNX model + optimizer state."""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from foremoe_jax import checkpoint, metrics


def test_metrics_logger_jsonl_tensorboard_summary_and_plot(tmp_path):
  run = tmp_path / "run"
  with metrics.MetricsLogger(run) as first:
    assert first.tensorboard or not importlib.util.find_spec("tensorboardX")
    for step in range(3):
      first.log(step, {"reward": np.float32(0.25 * step), "kl": jnp.asarray(0.1), "time": {"rollout": 1.5},
                       "imbalance_per_micro_step": {"static": [1.3, 1.2], "foremoe": [1.01, 1.0]},
                       "loss": float("nan")})
  with metrics.MetricsLogger(run, tensorboard=False) as log:  # A resumed run appends.
    log.log(3, {"reward": 1.0, "imbalance_per_micro_step": {"static": [1.5], "foremoe": [1.0]}})
  records = metrics.read_metrics(run)
  assert [r["step"] for r in records] == [0, 1, 2, 3]
  assert records[2]["reward"] == 0.5 and records[0]["time"] == {"rollout": 1.5} and records[0]["loss"] is None
  if first.tensorboard:
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(run / "tb"))

  png = metrics.plot_run(run, tmp_path / "plots" / "run.png")
  with open(png, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  metrics.plot_run(records[:1], tmp_path / "one.png")  # Records work as input too.

  path = metrics.write_summary(run, {"steps": 4, "imbalance": {"static": np.float64(1.3)}, "devices": 8})
  assert json.load(open(path)) == {"steps": 4, "imbalance": {"static": 1.3}, "devices": 8}


def test_read_metrics_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
    metrics.read_metrics(tmp_path)
  (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n{"step": 1, "rew')  # Killed mid-write.
  assert metrics.read_metrics(tmp_path) == [{"step": 0}]
  (tmp_path / "metrics.jsonl").write_text('{"step": 0}\nbroken\n{"step": 2}\n')
  with pytest.raises(ValueError, match="metrics.jsonl:2"):
    metrics.read_metrics(tmp_path)


def _model_and_opt(seed, d_out=4):
  model = nnx.Linear(3, d_out, rngs=nnx.Rngs(seed))
  return model, nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)


@nnx.jit
def _train_step(model, opt):
  grads = nnx.grad(lambda m: jnp.sum(m(jnp.ones((2, 3))) ** 2))(model)
  opt.update(model, grads)


def test_checkpoint_round_trip_latest_and_retention(tmp_path):
  model, opt = _model_and_opt(0)
  ckpt = checkpoint.Checkpointer(tmp_path / "ckpt", max_to_keep=2)
  assert ckpt.latest_step() is None
  for step in (1, 2, 3):
    _train_step(model, opt)
    ckpt.save(step, {"model": nnx.state(model), "opt": nnx.state(opt)}, {"step": step, "note": "x"})
  assert ckpt.latest_step() == 3 and ckpt.all_steps() == [2, 3]

  fresh_model, fresh_opt = _model_and_opt(1)
  assert not np.allclose(fresh_model.kernel[...], model.kernel[...])
  abstract = {"model": nnx.state(fresh_model), "opt": nnx.state(fresh_opt)}
  state, extra = checkpoint.Checkpointer(tmp_path / "ckpt").restore(3, abstract)
  assert extra == {"step": 3, "note": "x"}
  nnx.update(fresh_model, state["model"])
  nnx.update(fresh_opt, state["opt"])
  jax.tree.map(np.testing.assert_array_equal, nnx.state(fresh_model), nnx.state(model))
  jax.tree.map(np.testing.assert_array_equal, nnx.state(fresh_opt), nnx.state(opt))
  assert int(fresh_opt.step[...]) == 3
  # The restored optimizer continues exactly like the original.
  _train_step(model, opt)
  _train_step(fresh_model, fresh_opt)
  np.testing.assert_array_equal(fresh_model.kernel[...], model.kernel[...])
  with pytest.raises(FileNotFoundError, match="no checkpoint for step 1"):
    ckpt.restore(1, abstract)
  ckpt.close()


def test_checkpoint_restore_from_eval_shape(tmp_path):
  model, _ = _model_and_opt(0)
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    ckpt.save(7, nnx.state(model))
    abstract = nnx.state(nnx.eval_shape(lambda: nnx.Linear(3, 4, rngs=nnx.Rngs(5))))
    state, extra = ckpt.restore(ckpt.latest_step(), abstract)
  assert extra == {}
  np.testing.assert_array_equal(state["kernel"][...], model.kernel[...])


def test_checkpoint_shape_mismatch_is_caught_before_restore(tmp_path):
  model, opt = _model_and_opt(0, d_out=4)
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, {"model": nnx.state(model), "opt": nnx.state(opt)})
    other, other_opt = _model_and_opt(0, d_out=5)
    with pytest.raises(ValueError, match=r"model\.kernel\.value: checkpoint \(3, 4\) float32 vs target \(3, 5\)"):
      ckpt.restore(1, {"model": nnx.state(other), "opt": nnx.state(other_opt)})
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), nnx.state(model))
    with pytest.raises(ValueError, match=r"model\.bias\.value: checkpoint \(4,\) float32 vs target \(4,\) bfloat16"):
      ckpt.restore(1, {"model": bf16, "opt": nnx.state(opt)})
    with pytest.raises(ValueError, match="structure: leaves missing from the checkpoint"):
      ckpt.restore(1, {"model": nnx.state(model), "opt": nnx.state(opt), "ema": nnx.state(model)})
  assert checkpoint.Checkpointer(tmp_path).latest_step() == 1  # The failed restores left it intact.


def test_checkpoint_keeps_target_sharding(tmp_path):
  mesh = jax.make_mesh((len(jax.devices()),), ("expert",))
  sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("expert"))
  x = jax.device_put(jnp.arange(8.0 * len(jax.devices())).reshape(-1, 2), sharded)
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    ckpt.save(0, {"w": x})
    state, _ = ckpt.restore(0, {"w": jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharded)})
  assert state["w"].sharding == sharded
  np.testing.assert_array_equal(state["w"], x)


def _largest_file(directory):
  files = [os.path.join(root, f) for root, _, names in os.walk(directory) for f in names]
  return max(files, key=os.path.getsize)


@pytest.mark.parametrize("damage", ["truncate", "delete"])
@pytest.mark.parametrize("part", ["", "d"])  # the largest file of the state, or of its array data
def test_restore_latest_falls_back_past_a_damaged_newest_checkpoint(tmp_path, damage, part, caplog):
  model, opt = _model_and_opt(0)
  abstract = {"model": nnx.state(model), "opt": nnx.state(opt)}
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, abstract, {"step": 1})
    first = jax.tree.map(np.asarray, nnx.state(model))
    _train_step(model, opt)
    ckpt.save(2, abstract, {"step": 2})
  victim = _largest_file(tmp_path / "2" / "state" / part)
  if damage == "truncate":
    with open(victim, "r+b") as f:
      f.truncate(os.path.getsize(victim) // 3)
  else:
    os.remove(victim)
  with caplog.at_level("WARNING", logger="foremoe_jax.checkpoint"):
    step, state, extra = checkpoint.Checkpointer(tmp_path).restore_latest(abstract)
  assert step == 1 and extra == {"step": 1}
  assert "step 2" in caplog.text and "restored step 1" in caplog.text
  jax.tree.map(np.testing.assert_array_equal, state["model"], first)


def test_restore_latest_with_nothing_readable_names_every_failure(tmp_path):
  model, opt = _model_and_opt(0)
  abstract = {"model": nnx.state(model), "opt": nnx.state(opt)}
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    assert ckpt.restore_latest(abstract) is None
    ckpt.save(1, abstract)
  os.remove(_largest_file(tmp_path / "1" / "state"))
  with pytest.raises(RuntimeError, match=r"no readable checkpoint in .*step 1: "):
    checkpoint.Checkpointer(tmp_path).restore_latest(abstract)


def test_rewind_drops_a_resumed_stage_s_later_records_and_a_torn_line(tmp_path):
  with metrics.MetricsLogger(tmp_path, tensorboard=False) as logger:
    for step in (10, 20, 30):
      logger.log(step, {"sft/loss": step})
    for step in range(3):
      logger.log(step, {"rl": {"reward": step}})
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 3, "rl": {"rew')  # killed mid-write
  with metrics.MetricsLogger(tmp_path, tensorboard=False) as logger:
    assert logger.rewind("rl", 1) == 2  # RL resumes at step 1: steps 1 and 2 run again
    assert logger.rewind("sft/", 31) == 0
    logger.log(1, {"rl": {"reward": 9}})
  steps = [(r["step"], "rl" in r) for r in metrics.read_metrics(tmp_path)]
  assert steps == [(10, False), (20, False), (30, False), (0, True), (1, True)]
