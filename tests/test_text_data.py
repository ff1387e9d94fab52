"""Prompt-file loaders (jsonl, veRL parquet, tsv) on good and bad files; the GSM generator; the
math-verify reward on right, wrong and malformed answers."""
import json

import pytest

from foremoe_jax.text import data

pytest.importorskip("math_verify")
from foremoe_jax.text.rewards import MathReward  # noqa: E402


def write_jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
  return path


def test_jsonl_plain_verl_and_gsm8k_answers(tmp_path):
  path = write_jsonl(tmp_path / "p.jsonl", [
      {"prompt": "What is 2+3?", "answer": "5"},
      {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Half of 10?"}],
       "reward_model": {"ground_truth": "5", "style": "rule"}, "data_source": "openai/gsm8k"},
      {"prompt": "Sum?", "answer": "3 + 4 = 7\n#### 7"}, {"prompt": "Count?", "answer": 12}])
  path.write_text(path.read_text() + "\n")  # blank lines are skipped
  assert data.load_examples(path) == [("What is 2+3?", "5"), ("Half of 10?", "5"), ("Sum?", "7"), ("Count?", "12")]


def test_parquet_verl_columns(tmp_path):
  pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
  table = pa.table({"prompt": [[{"role": "user", "content": "What is 6*7?"}]],
                    "reward_model": [{"ground_truth": "42", "style": "rule"}]})
  pq.write_table(table, tmp_path / "train.parquet")
  assert data.load_examples(tmp_path / "train.parquet") == [("What is 6*7?", "42")]
  pq.write_table(pa.table({"question": ["q"], "answer": ["1"]}), tmp_path / "bad.parquet")
  with pytest.raises(ValueError, match=r"bad.parquet: missing column 'prompt' \(columns: question, answer\)"):
    data.load_examples(tmp_path / "bad.parquet")
  (tmp_path / "fake.parquet").write_bytes(b"not parquet")
  with pytest.raises(ValueError, match="fake.parquet: not a readable parquet file"):
    data.load_examples(tmp_path / "fake.parquet")


def test_tsv(tmp_path):
  (tmp_path / "p.tsv").write_text("What is 1+1?\t2\n\nWhat is 2+2?\t4\n", encoding="utf-8")
  assert data.load_examples(tmp_path / "p.tsv") == [("What is 1+1?", "2"), ("What is 2+2?", "4")]
  (tmp_path / "bad.tsv").write_text("ok\t1\nno tab here\n", encoding="utf-8")
  with pytest.raises(ValueError, match=r"bad.tsv:2: expected 'prompt<TAB>answer' \(2 columns\), got 1"):
    data.load_examples(tmp_path / "bad.tsv")


@pytest.mark.parametrize("content, message", [
    (b"", "has no examples"),
    (b'{"prompt": "a", "answer": "1"}\n{"question": "b", "answer": "2"}\n', r":2: missing column 'prompt'"),
    (b'{"prompt": "a"}\n', r":1: missing column 'answer' \(or 'reward_model.ground_truth'\)"),
    (b'{"prompt": 3, "answer": "1"}\n', r":1, column 'prompt': expected a string or a list of chat messages, got int"),
    (b'{"prompt": "a", "answer": [1]}\n', r":1, column 'answer': expected a string or a number, got list"),
    (b'{"prompt": "a", "reward_model": {"ground_truth": null}}\n',
     r":1, column 'reward_model.ground_truth': expected a string or a number, got NoneType"),
    (b'{"prompt": "  ", "answer": "1"}\n', r":1, column 'prompt': empty prompt"),
    (b'{"prompt": "a", "answer": "1"}\n{"prompt": "b", "answer": "2"\n', r":2: not a JSON object"),
    (b'{"prompt": "a", "answer": "1"}\n{"prompt": "caf\xe9", "answer": "2"}\n', r":2: not UTF-8 \(byte 15: b'.xe9'\)"),
    (b'[1, 2]\n', r":1: expected a JSON object, got list"),
])
def test_bad_jsonl_names_file_line_and_column(tmp_path, content, message):
  path = tmp_path / "bad.jsonl"
  path.write_bytes(content)
  with pytest.raises(ValueError, match=r"bad.jsonl" + (".*" if message.startswith("has") else "") + message):
    data.load_examples(path)


def test_missing_file_and_unknown_extension(tmp_path):
  with pytest.raises(FileNotFoundError, match="missing.jsonl"):
    data.load_examples(tmp_path / "missing.jsonl")
  with pytest.raises(ValueError, match="unknown extension '.csv'"):
    data.load_examples(tmp_path / "p.csv")


def test_gsm_symbolic_generator_is_offline_and_seeded():
  gsm = pytest.importorskip("foremoe_jax.text.gsm")
  pytest.importorskip("reasoning_gym")
  first = gsm.generate("gsm_symbolic", 3, seed=1)
  assert first == gsm.generate("gsm_symbolic", 3, seed=1) and first != gsm.generate("gsm_symbolic", 3, seed=2)
  assert all(len(q) > 40 and a.lstrip("-").replace(".", "").isdigit() for q, a in first)
  with pytest.raises(ValueError, match="unknown problem generator 'gsm8k'"):
    gsm.generate("gsm8k", 3, seed=1)


@pytest.mark.parametrize("response, answer, correct", [
    ("so the total is \\boxed{72}", "72", True),
    ("The answer is 72.", "72", True),
    ("\\boxed{\\frac{1}{2}}", "0.5", True),
    ("\\boxed{3/4}", "\\frac{3}{4}", True),
    ("\\boxed{71}", "72", False),
    ("I think 7 then \\boxed{", "72", False),  # malformed
    ("no number here", "72", False),
    ("", "72", False),
])
def test_math_verify_reward(response, answer, correct):
  reward = MathReward()
  assert reward.correct(response, answer) is correct
  assert reward.score(response, answer) == float(correct)


def test_format_reward_and_rule():
  reward = MathReward(format_weight=0.1)
  assert reward.score("\\boxed{72}", "72") == pytest.approx(1.1)
  assert reward.score("72", "72") == 1.0 and reward.score("\\boxed{7}", "72") == pytest.approx(0.1)
  assert reward.score("\\boxed{72} or \\boxed{72}", "72") == 1.0  # two boxes: no format reward
  assert "math_verify.verify" in reward.rule and "0.1" in reward.rule and "0.1" not in MathReward().rule
  with pytest.raises(ValueError, match="no expression math-verify can parse"):
    reward.correct("\\boxed{1}", "")
  with pytest.raises(ValueError, match="format_weight must be >= 0"):
    MathReward(format_weight=-1)
