"""Tokenizer, arithmetic task, SFT batch alignment and prompt files."""

import numpy as np
import pytest

from foremoe_jax.rl import task as T


def test_tokenizer_round_trip_and_stops():
  tok = T.CharTokenizer()
  ids = tok.encode("12+345=357", bos=True, eos=True)
  assert ids[0] == T.BOS and ids[-1] == T.EOS
  assert max(ids) < tok.vocab_size and len(set(ids)) == 10
  assert tok.decode(ids) == "12+345=357"
  assert tok.decode(ids + tok.encode("99")) == "12+345=357"  # Stops at EOS.
  assert tok.decode([*tok.encode("42"), T.PAD, *tok.encode("7")]) == "42"  # Stops at PAD.
  with pytest.raises(ValueError, match="not in the vocabulary"):
    tok.encode("12a")


@pytest.mark.parametrize("prompt,answer", [("12+345=", "357"), ("50-7=", "43"), ("12*12=", "144"),
                                           ("3-10=", "-7"), ("-3+10=", "7")])
def test_solve(prompt, answer):
  assert T.solve(prompt) == answer


def test_solve_rejects_garbage():
  with pytest.raises(ValueError, match="not an arithmetic prompt"):
    T.solve("12=")


def test_samples_are_correct_and_seeded():
  task = T.ArithmeticTask(num_digits=3, ops="+-*", seed=1)
  pairs = task.sample(np.random.default_rng(0), 200)
  assert pairs == T.ArithmeticTask(num_digits=3, ops="+-*", seed=2).sample(np.random.default_rng(0), 200)
  assert {p[0][:-1].strip("0123456789")[-1] for p in pairs} == {"+", "-", "*"}
  for prompt, answer in pairs:
    a, b = (int(x) for x in prompt[:-1].replace("-", "+").replace("*", "+").split("+"))
    assert 0 <= a < 1000 and 0 <= b < 1000
    assert answer == str(eval(prompt[:-1]))  # noqa: S307 -- an independent oracle on generated digits.
    assert int(answer) >= 0
    assert len(prompt) <= task.max_prompt_len and len(answer) <= task.max_answer_len
  assert task.sample(n=5) != task.sample(n=5)  # The task's own generator advances.


def test_reward_exact_match():
  task = T.ArithmeticTask()
  assert task.reward("12+345=", "357") == 1.0
  assert task.reward("12+345=", " 357 ") == 1.0
  assert task.reward("12+345=", "3570") == 0.0
  assert task.reward("12+345=", "") == 0.0


def test_sft_batch_mask_marks_predictions_of_answer_and_eos():
  task = T.ArithmeticTask(num_digits=2, seed=0)
  batch = task.sft_batch(np.random.default_rng(3), batch=16, seq_len=12)
  tokens, mask = batch["tokens"], batch["loss_mask"]
  assert tokens.shape == mask.shape == (16, 12) and tokens.dtype == mask.dtype == np.int32
  assert (mask[:, -1] == 0).all()
  tok = task.tokenizer
  eq_id = tok.encode("=")[0]
  for b in range(16):
    text = tok.decode(tokens[b])
    prompt, answer = text.split("=")[0] + "=", text.split("=")[1]
    assert answer == T.solve(prompt)
    targets = tokens[b, 1:][mask[b, :-1] == 1]  # What the masked positions predict.
    assert tok.decode(targets) == answer and targets[-1] == T.EOS
    first = np.argmax(mask[b])
    assert tokens[b, first] == eq_id  # The first trained prediction is made at '='.


def test_sft_batch_too_short():
  with pytest.raises(ValueError, match="seq_len=5 is too short"):
    T.ArithmeticTask(num_digits=3).sft_batch(None, 2, 5)


def test_encode_prompts():
  tok = T.CharTokenizer()
  tokens, lens = T.encode_prompts(tok, ["1+2=", "10+20="], 8)
  assert lens.tolist() == [5, 7]
  assert tok.decode(tokens[1]) == "10+20=" and (tokens[0, 5:] == T.PAD).all()


def test_prompt_file(tmp_path):
  path = tmp_path / "p.tsv"
  path.write_text("1+2=\t3\n\n10*10=\t100\n")
  assert T.load_prompt_file(path) == [("1+2=", "3"), ("10*10=", "100")]
  with pytest.raises(FileNotFoundError, match="missing.tsv"):
    T.load_prompt_file(tmp_path / "missing.tsv")
  path.write_text("1+2=\t3\n1+2= 3\n")
  with pytest.raises(ValueError, match=r"p.tsv:2: expected 'prompt<TAB>answer'"):
    T.load_prompt_file(path)
  path.write_text("1+x=\t3\n")
  with pytest.raises(ValueError, match=r"p.tsv:1: .*not in the vocabulary"):
    T.load_prompt_file(path)


def test_a_rows_prompt_depends_on_seed_step_and_row_only():
  task = T.ArithmeticTask(num_digits=3)
  every = T.sample_rows(task.sample, range(6), seed=0, step=2)
  assert T.sample_rows(task.sample, range(3, 6), seed=0, step=2) == every[3:]  # whoever draws rows 3..5
  assert len(set(every)) == 6 and T.sample_rows(task.sample, range(6), seed=0, step=3) != every
  assert T.row_rng(0, 2, 4).integers(1 << 30) == T.row_rng(0, 2, 4).integers(1 << 30)
