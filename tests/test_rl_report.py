"""The RL step's report (rl/report.py): device loads, imbalance, throughput and the MoE FLOP share on
hand-computed cases; the log line and the run summary; the cross-process flag."""
import dataclasses

import numpy as np
import pytest

from foremoe_jax import distributed
from foremoe_jax.model import ModelConfig
from foremoe_jax.moe import ExpertsConfig
from foremoe_jax.planner import PlanConfig, plan_step
from foremoe_jax.rl.report import (STAGES, THROUGHPUT, format_record, home_device_load, imbalance_report,
                                   moe_flop_share, summarize, throughput)


def test_home_device_load_is_the_static_plans():
  counts = np.zeros((1, 1, 2, 4), np.int64)  # 2 devices, 4 experts: experts 0-1 on device 0, 2-3 on device 1
  counts[0, 0, 0] = [1, 2, 3, 4]
  counts[0, 0, 1] = [10, 0, 0, 5]
  np.testing.assert_array_equal(home_device_load(counts, 2), [[[13.0, 12.0]]])
  rng = np.random.default_rng(0)
  for devices, slots in ((8, 3), (4, 4), (1, 16)):
    cfg = PlanConfig(num_experts=16, num_devices=devices, slots_per_device=slots, policy="static")
    counts = rng.integers(0, 30, size=(3, 2, devices, 16)) * (rng.random((3, 2, devices, 16)) < 0.6)
    np.testing.assert_array_equal(home_device_load(counts, devices), plan_step(counts, cfg).device_load(counts))


def test_imbalance_report_by_hand():
  # Two micro-steps, one layer, two devices: loads (3, 1) and (2, 2).
  report = imbalance_report({"static": np.array([[[3.0, 1.0]], [[2.0, 2.0]]])})
  assert report["imbalance_sums"] == {"static": (5.0, 4.0)}
  assert report["imbalance"] == {"static": 5.0 / 4.0}
  assert report["imbalance_per_micro_step"] == {"static": [1.5, 1.0]}
  assert imbalance_report({"x": np.zeros((1, 1, 2))})["imbalance"] == {"x": 1.0}  # no load: balanced


def test_moe_flop_share_by_hand():
  cfg = ModelConfig(vocab_size=10, d_model=4, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=2, d_ff_dense=8,
                    moe=ExpertsConfig(num_experts=4, top_k=2, d_ff_expert=3), moe_every=2)
  # Per token: attention 4*2*(2+2+1+1) = 48 per layer (2 layers); layer 1 is MoE: experts 2*3*4*3 = 72,
  # router 4*4 = 16; layer 0 dense: 3*4*8 = 96; LM head 4*10 = 40. Total 96 + 72 + 16 + 96 + 40 = 320.
  assert moe_flop_share(cfg) == pytest.approx(72 / 320)
  assert moe_flop_share(dataclasses.replace(cfg, moe_every=1)) == pytest.approx(144 / (96 + 144 + 32 + 40))


def test_throughput_by_hand():
  seconds = {"rollout": 1.0, "postprocess": 0.5, "plan_wait": 0.5, "recompute": 1.0, "update": 2.0, "record": 0.0}
  out = throughput(seconds, 1000, 2, ModelConfig())
  assert set(out) == set(THROUGHPUT)
  assert out["step_s"] == 5.0 and out["real_tokens"] == 1000
  assert out["tokens_per_s"] == pytest.approx(200.0) and out["train_tokens_per_s"] == pytest.approx(1000.0)
  assert out["plan_wait_share"] == pytest.approx(0.1) and out["moe_flop_share"] == moe_flop_share(ModelConfig())


def _record(reward, sums, step_s):
  seconds = {k: step_s / len(STAGES) for k in STAGES}
  return {"reward": reward, "kl": 0.01, "imbalance_sums": sums,
          "imbalance": {p: a / b for p, (a, b) in sums.items()}, "seconds": seconds, "planner_ms": 2.0,
          **throughput(seconds, 600, 1, ModelConfig())}


def test_summarize_and_format_record():
  records = [_record(0.5, {"static": (4.0, 2.0), "foremoe": (3.0, 2.0), "eplb_step": (5.0, 2.0)}, 3.0),
             _record(0.7, {"static": (6.0, 2.0), "foremoe": (2.0, 2.0)}, 1.0)]
  summary = summarize(records, "foremoe")
  assert summary["imbalance"] == {"static": 10 / 4, "foremoe": 5 / 4}  # only what every step reported
  assert summary["reward_first"] == 0.5 and summary["reward_last"] == 0.7 and summary["steps"] == 2
  assert set(summary["seconds_per_stage"]) == set(STAGES)
  assert summary["step_s"] == pytest.approx(2.0) and summary["tokens_per_s"] == pytest.approx((200 + 600) / 2)
  assert set(THROUGHPUT) <= set(summary)
  line = format_record(1, records[1], "foremoe")
  assert line.startswith("rl step 1: reward 0.700 kl 0.0100 | 1.00s 600 tok/s (train 3.6k) MoE ")
  assert "static 3.000 foremoe* 1.000" in line and "(planner 2.0 ms, wait 16.7%)" in line


def test_true_on_every_process_with_one_process():
  assert distributed.true_on_every_process(True) is True
  assert distributed.true_on_every_process(np.bool_(False)) is False
