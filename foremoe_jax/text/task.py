"""A real-text RL task: word problems in, chat-formatted token ids, verified reward on the decoded response.

Same interface as `rl.task.ArithmeticTask` (what `sft.py` and `rl/trainer.py` call): `tokenizer`,
`sample`, `prompt_batch`, `sft_batch`, `score`, `correct`, `load_prompts`, `describe`, `max_prompt_len`,
`max_answer_len`. Layout: `chat(prompt)` tokens right-padded with the tokenizer's pad id to
`max_prompt_len` (one rollout shape for every step: no recompiles), then the response and EOS. The SFT
target is `\\boxed{answer}` + EOS, so the warm-started policy answers in the format the verifier extracts
first. Problems whose prompt or target do not fit the token budgets are dropped once, logged and counted
(`describe()["dropped"]`), as veRL's `filter_overlong_prompts` does.
"""
from __future__ import annotations

import dataclasses
import logging
import os

import numpy as np

from foremoe_jax.text import data, gsm
from foremoe_jax.text import tokenizer as tokenizers
from foremoe_jax.text.rewards import MathReward

log = logging.getLogger(__name__)


def sft_target(answer: str) -> str:
  return f"\\boxed{{{answer}}}"


@dataclasses.dataclass
class TextTask:
  tokenizer: tokenizers.TextTokenizer
  pairs: list[tuple[str, str]]  # (question, reference answer)
  reward_fn: MathReward
  max_prompt_len: int  # tokens of the chat-formatted prompt
  max_answer_len: int  # tokens of the SFT target, EOS excluded
  source: str = ""
  system: str = ""
  seed: int = 0
  dropped: int = 0

  def __post_init__(self):
    self._rng = np.random.default_rng(self.seed)

  def prompt_ids(self, prompt: str) -> list[int]:
    return self.tokenizer.encode(self.tokenizer.chat(prompt, self.system), bos=True)

  def fits(self, prompt: str, answer: str) -> bool:
    return (len(self.prompt_ids(prompt)) <= self.max_prompt_len
            and len(self.tokenizer.encode(sft_target(answer))) <= self.max_answer_len)

  def keep_fitting(self, pairs: list[tuple[str, str]], where: str) -> list[tuple[str, str]]:
    kept = [pair for pair in pairs if self.fits(*pair)]
    if not kept:
      raise ValueError(f"{where}: none of its {len(pairs)} problems fits task.max_prompt_tokens="
                       f"{self.max_prompt_len} (chat-formatted) and task.max_answer_tokens={self.max_answer_len}")
    if len(kept) < len(pairs):
      log.info("%s: dropped %d of %d problems longer than %d prompt / %d answer tokens", where,
               len(pairs) - len(kept), len(pairs), self.max_prompt_len, self.max_answer_len)
    self.dropped += len(pairs) - len(kept)
    return kept

  def sample(self, rng: np.random.Generator | None = None, n: int = 1) -> list[tuple[str, str]]:
    rng = self._rng if rng is None else rng
    return [self.pairs[i] for i in rng.integers(0, len(self.pairs), size=n)]

  def prompt_batch(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """int32 `[N, max_prompt_len]` chat-formatted prompts right-padded with the pad id, int32 lengths `[N]`."""
    tokens_NxP = np.full((len(prompts), self.max_prompt_len), self.tokenizer.pad_id, np.int32)
    lens_N = np.zeros(len(prompts), np.int32)
    for b, prompt in enumerate(prompts):
      ids = self.prompt_ids(prompt)
      if len(ids) > self.max_prompt_len:
        raise ValueError(f"prompt of {len(ids)} tokens > task.max_prompt_tokens={self.max_prompt_len}: {prompt[:80]!r}")
      tokens_NxP[b, :len(ids)] = ids
      lens_N[b] = len(ids)
    return tokens_NxP, lens_N

  def sft_batch(self, rng: np.random.Generator | None, batch: int, seq_len: int) -> dict[str, np.ndarray]:
    """`chat(prompt) \\boxed{answer} EOS`, pad-filled; `loss_mask[b, t]` trains predicting `tokens[b, t + 1]`."""
    tokens_BxT = np.full((batch, seq_len), self.tokenizer.pad_id, np.int32)
    loss_mask_BxT = np.zeros((batch, seq_len), np.int32)
    for b, (prompt, answer) in enumerate(self.sample(rng, batch)):
      p, a = self.prompt_ids(prompt), self.tokenizer.encode(sft_target(answer), eos=True)
      if len(p) + len(a) > seq_len:
        raise ValueError(f"seq_len={seq_len} is too short for a {len(p)} + {len(a)} token example")
      tokens_BxT[b, :len(p) + len(a)] = p + a
      loss_mask_BxT[b, len(p) - 1:len(p) + len(a) - 1] = 1
    return {"tokens": tokens_BxT, "loss_mask": loss_mask_BxT}

  def score(self, completion_text: str, answer: str) -> float:
    return self.reward_fn.score(completion_text, answer)

  def correct(self, completion_text: str, answer: str) -> bool:
    return self.reward_fn.correct(completion_text, answer)

  def load_prompts(self, path: str | os.PathLike) -> list[tuple[str, str]]:
    return self.keep_fitting(data.load_examples(path), os.fspath(path))

  def describe(self) -> dict:
    return {"task": f"text ({self.source}: {len(self.pairs)} problems, {self.dropped} dropped as too long)",
            "tokenizer": self.tokenizer.describe(), "reward_rule": self.reward_fn.rule,
            "sft_target": sft_target("<answer>") + " + EOS"}


def make_text_task(task_cfg, seed: int) -> TextTask:
  """The task of a config's `task` section (`kind="text"`): tokenizer, problems (a file or a generator)
  and reward, all checked here, before any device work."""
  tok = tokenizers.load(task_cfg.tokenizer)
  source = task_cfg.data
  task = TextTask(tok, [], MathReward(task_cfg.format_weight), task_cfg.max_prompt_tokens, task_cfg.max_answer_tokens,
                  source=source, system=task_cfg.system, seed=seed)
  if source in gsm.GENERATORS:
    pairs = gsm.generate(source, task_cfg.num_problems, seed)
  else:
    pairs = data.load_examples(source)
  task.pairs = task.keep_fitting(pairs, source)
  return task
