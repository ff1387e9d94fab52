"""SFT: the loss falls over a few steps; an interrupted run resumed from its checkpoint ends where an
uninterrupted one does; the CLI refuses bad flags with clear messages."""
import dataclasses
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

import configs
from foremoe_jax.metrics import MetricsLogger, read_metrics
from foremoe_jax.sft import run_sft
from test_model import CFG
import train


def tiny_config(steps: int) -> configs.TrainConfig:
  cfg = configs.get_config("cpu_tiny")
  return dataclasses.replace(cfg, model=dataclasses.replace(CFG, max_seq_len=12),
                             sft=dataclasses.replace(cfg.sft, steps=steps, batch_size=16, lr=1e-2, warmup_steps=1,
                                                     log_every=1, ckpt_every=6, eval_prompts=8))


def params(model):
  return jax.tree.map(np.asarray, nnx.state(model, nnx.Param).to_pure_dict())


def test_loss_falls_and_resume_matches_an_uninterrupted_run(tmp_path):
  cfg = tiny_config(steps=12)
  with MetricsLogger(tmp_path / "a", tensorboard=False) as logger:
    full = run_sft(cfg, str(tmp_path / "a"), logger=logger)
  losses = [r["sft/loss"] for r in read_metrics(tmp_path / "a")]
  assert len(losses) == 12 and np.mean(losses[-3:]) < losses[0] - 0.3, losses
  # Interrupted after step 6: only the step-6 checkpoint survives; resuming replays steps 7..12.
  shutil.copytree(tmp_path / "a", tmp_path / "b")
  shutil.rmtree(tmp_path / "b" / "ckpt" / "12")
  resumed = run_sft(cfg, str(tmp_path / "b"), resume=True)
  assert resumed.step == 12
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), params(resumed.model),
               params(full.model))


def test_cli_refuses_bad_flags(tmp_path):
  with pytest.raises(ValueError, match="unknown preset"):
    train.main(["--config", "cpu_huge", "--run-dir", str(tmp_path)])
  with pytest.raises(ValueError, match="unknown key 'stepz'"):
    train.main(["--set", "sft.stepz=3", "--run-dir", str(tmp_path)])
  assert not os.path.exists(tmp_path / "summary.json")
