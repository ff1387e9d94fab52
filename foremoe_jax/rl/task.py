"""A verifiable task generated on the fly: multi-digit arithmetic with a character tokenizer.

Sequence layout (SFT and rollout alike): `BOS prompt answer EOS PAD...`, e.g. `^12+345=357$` for
prompt "12+345=" and answer "357". The reward is exact match of the decoded completion with the answer.

Loss-mask convention (the one `grpo.token_logprobs` uses too): arrays are `[B, T]`, aligned with the
model's logits `[B, T, V]`; `loss_mask[b, t] == 1` means "the prediction made at position t, of token
`tokens[b, t + 1]`, is trained". So it is 1 on the positions *before* each answer token and before EOS,
and the last column is always 0.
"""

from __future__ import annotations

import dataclasses
import operator
import os

import numpy as np

PAD, BOS, EOS = 0, 1, 2
_CHARS = "0123456789+-*= "
_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


class CharTokenizer:
  """Fixed vocabulary: PAD=0, BOS=1, EOS=2, then digits, `+ - * =` and space."""

  name, pad_id, bos_id, eos_id = "char", PAD, BOS, EOS

  def __init__(self):
    self._id = {c: i + 3 for i, c in enumerate(_CHARS)}
    self._char = {i: c for c, i in self._id.items()}

  @property
  def vocab_size(self) -> int:
    return len(_CHARS) + 3

  def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
    bad = sorted({c for c in text if c not in self._id})
    if bad:
      raise ValueError(f"CharTokenizer: characters {bad} of {text!r} are not in the vocabulary {_CHARS!r}")
    return [BOS] * bos + [self._id[c] for c in text] + [EOS] * eos

  def decode(self, ids) -> str:
    """Text up to the first EOS or PAD; BOS is skipped."""
    return "".join(self._char.get(i, "?") for i in content_ids(ids, self))


def content_ids(ids, tokenizer) -> list[int]:
  """The ids a tokenizer decodes: those before the first EOS or pad id, BOS dropped (the rule every
  tokenizer's `decode` shares)."""
  out = []
  for i in np.asarray(ids).reshape(-1).tolist():
    if i in (tokenizer.eos_id, tokenizer.pad_id):
      break
    if i != tokenizer.bos_id:
      out.append(i)
  return out


def row_rng(seed: int, step: int, row: int) -> np.random.Generator:
  """The generator of prompt row `row` of RL step `step`: a row's prompt depends on (seed, step, row) only,
  so any process can build exactly the rows it owns and gets the rows another split of the batch gets."""
  return np.random.default_rng([seed, step, row])


def sample_rows(sample, rows, *, seed: int, step: int) -> list:
  """One item per row of `rows` (global prompt indices), each drawn by `sample(rng, 1)` from its own
  `row_rng`: the same whichever process, or how many, build it."""
  return [sample(row_rng(seed, step, row), 1)[0] for row in rows]


def solve(prompt: str) -> str:
  """The answer of an arithmetic prompt `"<int><op><int>="`."""
  body = prompt.strip().removesuffix("=")
  for i, c in enumerate(body[1:], start=1):  # Start at 1 so a leading minus is a sign.
    if c in _OPS:
      try:
        return str(_OPS[c](int(body[:i]), int(body[i + 1:])))
      except ValueError:
        break
  raise ValueError(f"not an arithmetic prompt of the form '<int><op><int>=': {prompt!r}")


def exact_match(completion_text: str, answer: str) -> float:
  """1.0 when the completion (surrounding spaces ignored) equals the answer, else 0.0."""
  return float(completion_text.strip() == answer.strip())


@dataclasses.dataclass
class ArithmeticTask:
  """Operands are uniform in [0, 10**num_digits); for "-" the larger operand comes first (answers >= 0).

  `rng` arguments take a `np.random.Generator`; None uses the task's own generator seeded by `seed`.
  """

  num_digits: int = 3
  ops: str = "+"
  seed: int = 0
  tokenizer: CharTokenizer = dataclasses.field(default_factory=CharTokenizer)

  def __post_init__(self):
    if self.num_digits < 1:
      raise ValueError(f"ArithmeticTask: num_digits must be >= 1, got {self.num_digits}")
    if not self.ops or any(op not in _OPS for op in self.ops):
      raise ValueError(f"ArithmeticTask: ops must be a non-empty string of {''.join(_OPS)!r}, got {self.ops!r}")
    self._rng = np.random.default_rng(self.seed)

  @property
  def max_prompt_len(self) -> int:
    return 2 * self.num_digits + 2

  @property
  def max_answer_len(self) -> int:
    return 2 * self.num_digits if "*" in self.ops else self.num_digits + 1

  def sample(self, rng: np.random.Generator | None = None, n: int = 1) -> list[tuple[str, str]]:
    """`n` (prompt, answer) pairs, e.g. ("12+345=", "357")."""
    rng = self._rng if rng is None else rng
    a_N, b_N = rng.integers(0, 10**self.num_digits, size=(2, n))
    ops_N = rng.choice(list(self.ops), size=n)
    pairs = []
    for a, b, op in zip(a_N.tolist(), b_N.tolist(), ops_N.tolist()):
      if op == "-" and a < b:
        a, b = b, a
      prompt = f"{a}{op}{b}="
      pairs.append((prompt, solve(prompt)))
    return pairs

  def reward(self, prompt: str, completion_text: str) -> float:
    return exact_match(completion_text, solve(prompt))

  def sft_batch(self, rng: np.random.Generator | None, batch: int, seq_len: int) -> dict[str, np.ndarray]:
    """Teacher-forcing batch: int32 `tokens [B, T]` and `loss_mask [B, T]` (see the module docstring)."""
    return encode_sft(self.tokenizer, self.sample(rng, batch), seq_len)

  # The task interface the trainer and `sft.evaluate` use (shared with `foremoe_jax.text.task.TextTask`).
  def prompt_batch(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """`BOS prompt` right-padded to the longest prompt + 1 (see `encode_prompts`)."""
    return encode_prompts(self.tokenizer, prompts, max(len(p) for p in prompts) + 1)

  def score(self, completion_text: str, answer: str) -> float:
    return exact_match(completion_text, answer)

  def correct(self, completion_text: str, answer: str) -> bool:
    return bool(exact_match(completion_text, answer))

  def load_prompts(self, path: str | os.PathLike) -> list[tuple[str, str]]:
    return load_prompt_file(path, self.tokenizer)

  def describe(self) -> dict:
    return {"task": f"arithmetic ({self.num_digits} digits, ops {self.ops!r})", "tokenizer": self.tokenizer.name,
            "reward_rule": "1 if the completion, spaces stripped, equals the answer else 0"}


def encode_sft(tokenizer: CharTokenizer, pairs: list[tuple[str, str]], seq_len: int) -> dict[str, np.ndarray]:
  """`BOS prompt answer EOS` right-padded with PAD; `loss_mask[b, t]` trains predicting `tokens[b, t+1]`."""
  tokens_BxT = np.full((len(pairs), seq_len), PAD, np.int32)
  loss_mask_BxT = np.zeros((len(pairs), seq_len), np.int32)
  for b, (prompt, answer) in enumerate(pairs):
    p = tokenizer.encode(prompt, bos=True)
    a = tokenizer.encode(answer, eos=True)
    if len(p) + len(a) > seq_len:
      raise ValueError(f"seq_len={seq_len} is too short for {prompt!r} -> {answer!r} ({len(p) + len(a)} tokens)")
    tokens_BxT[b, : len(p) + len(a)] = p + a
    loss_mask_BxT[b, len(p) - 1 : len(p) + len(a) - 1] = 1
  return {"tokens": tokens_BxT, "loss_mask": loss_mask_BxT}


def encode_prompts(tokenizer: CharTokenizer, prompts: list[str], prompt_len: int) -> tuple[np.ndarray, np.ndarray]:
  """`BOS prompt` right-padded with PAD to int32 `[B, prompt_len]`, and the int32 lengths `[B]` (BOS included)."""
  tokens_BxP = np.full((len(prompts), prompt_len), PAD, np.int32)
  lens_B = np.zeros(len(prompts), np.int32)
  for b, prompt in enumerate(prompts):
    ids = tokenizer.encode(prompt, bos=True)
    if len(ids) > prompt_len:
      raise ValueError(f"prompt_len={prompt_len} is too short for {prompt!r} ({len(ids)} tokens with BOS)")
    tokens_BxP[b, : len(ids)] = ids
    lens_B[b] = len(ids)
  return tokens_BxP, lens_B


def load_prompt_file(path: str | os.PathLike, tokenizer: CharTokenizer | None = None) -> list[tuple[str, str]]:
  """(prompt, answer) pairs from lines `prompt<TAB>answer`; blank lines are skipped."""
  tokenizer = tokenizer or CharTokenizer()
  if not os.path.isfile(path):
    raise FileNotFoundError(f"prompt file not found: {os.fspath(path)!r}")
  pairs = []
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, start=1):
      line = line.rstrip("\r\n")
      if not line.strip():
        continue
      fields = line.split("\t")
      where = f"{os.fspath(path)}:{lineno}"
      if len(fields) != 2 or not fields[0] or not fields[1].strip():
        raise ValueError(f"{where}: expected 'prompt<TAB>answer', got {line!r}")
      try:
        tokenizer.encode(fields[0] + fields[1])
      except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
      pairs.append((fields[0], fields[1].strip()))
  if not pairs:
    raise ValueError(f"prompt file {os.fspath(path)!r} has no 'prompt<TAB>answer' lines")
  return pairs
