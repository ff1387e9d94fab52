"""Bad input to train.py fails with a message naming the problem, before any XLA compile."""
import json

import pytest
from compile_count import count_compiles

import train

CASES = [
    (["--config", "cpu_tiyn"], ValueError, r"unknown preset 'cpu_tiyn' \(did you mean 'cpu_tiny'\?\)"),
    (["--set", "rl.step=3"], ValueError, r"--set rl.step: unknown key 'step' in RLConfig; did you mean 'steps'\?"),
    (["--set", "sft.steps=ten"], ValueError, r"--set sft.steps=ten: expected a int"),
    (["--set", "model.moe.top_k=17"], ValueError, r"ModelConfig: top_k=17 must be in \[1, num_experts=16\]"),
    (["--set", "model.moe.num_experts=12"], ValueError, r"num_experts=12 is not divisible by the expert axis size D=8"),
    (["--set", "model.moe.slots_per_device=1"], ValueError, r"slots_per_device=1 x D=8 < num_experts=16"),
    (["--set", "rl.num_minibatches=0"], ValueError, r"must be >= 1: rl.num_minibatches=0"),
    (["--set", "sft.batch_size=0"], ValueError, r"sft.batch_size=0"),
    (["--set", "sft.steps=-1"], ValueError, r"sft.steps=-1"),
    (["--set", "sft.batch_size=12"], ValueError, r"sft.batch_size=12 is not divisible by the 8 devices"),
    (["--set", "rl.prompts_per_step=3", "--set", "rl.group_size=1"], ValueError,
     r"rl.prompts_per_step \* rl.group_size = 3 is not divisible by the 8 devices"),
    (["--set", "rl.policy=magic"], ValueError, r"rl.policy='magic' is not one of"),
    (["--set", "rl.table_sizes=big"], ValueError, r"rl.table_sizes='big' must be 'fixed' or 'plan'"),
    (["--set", "model.moe.gmm_backend=cuda"], ValueError,
     r"ModelConfig.gmm_backend='cuda': known backends of gmm/tgmm"),
    (["--set", "rl.prompt_file=missing.tsv"], FileNotFoundError, r"rl.prompt_file 'missing.tsv' does not exist"),
    (["--set", "model"], ValueError, r"--set expects key=value, got 'model'"),
]


@pytest.mark.parametrize("argv, error, message", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_config_is_refused_before_any_compile(tmp_path, argv, error, message):
  with count_compiles() as compiles, pytest.raises(error, match=message):
    train.main([*argv, "--run-dir", str(tmp_path / "run")])
  assert not compiles


def test_bad_paths_are_refused_before_any_compile(tmp_path):
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "model.safetensors").write_bytes(b"x")
  (tmp_path / "hf").mkdir()
  (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
  cases = [
      (["--resume", "--run-dir", str(tmp_path / "nowhere")], FileNotFoundError,
       r"--resume: run directory .*nowhere' does not exist \(nothing to resume"),
      (["--init-from", str(tmp_path / "no_ckpt")], FileNotFoundError, r"--init-from: .*no_ckpt' is not a directory"),
      (["--init-from", str(tmp_path / "hf")], ValueError, r"model_type='mixtral' is not supported"),
      (["--export-to", str(tmp_path / "out")], FileExistsError, r"--export-to: .*out' is not empty; pass --overwrite"),
  ]
  for argv, error, message in cases:
    with count_compiles() as compiles, pytest.raises(error, match=message):
      train.main(argv if "--run-dir" in argv else [*argv, "--run-dir", str(tmp_path / "run")])
    assert not compiles, argv
