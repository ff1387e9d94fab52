"""Verified math rewards: the answer is extracted from the response and compared with the reference by
`math-verify` (Hugging Face's verifier: LaTeX, `\\boxed{}` first, or a plain expression; numbers,
fractions and expressions compared symbolically), plus an optional format reward for one `\\boxed{}`.
"""
from __future__ import annotations

import dataclasses
import re
import threading

_BOXED = re.compile(r"\\boxed\{[^{}]*\}")


def _math_verify():
  try:
    import math_verify  # noqa: PLC0415  (the `text` extra)
  except ImportError:
    raise ImportError("verified rewards need math-verify: pip install -e '.[text]'") from None
  return math_verify


@dataclasses.dataclass(frozen=True)
class MathReward:
  """`score(response, answer)` = correct (0 / 1) + format_weight * (exactly one `\\boxed{...}`)."""

  format_weight: float = 0.0

  def __post_init__(self):
    if self.format_weight < 0:
      raise ValueError(f"MathReward: format_weight must be >= 0, got {self.format_weight}")
    _math_verify()

  @property
  def rule(self) -> str:
    text = ("1 if math_verify.verify(parse(answer), parse(response)) else 0, where parse extracts LaTeX "
            "(\\boxed{} first) or a plain expression (math-verify defaults)")
    if self.format_weight:
      text += f"; + {self.format_weight} if the response holds exactly one \\boxed{{...}}"
    return text

  def correct(self, response: str, answer: str) -> bool:
    mv = _math_verify()
    # math-verify's timeouts use SIGALRM, which exists on the main thread only.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    gold = mv.parse(answer, parsing_timeout=timeout)
    if not gold:
      raise ValueError(f"reference answer {answer!r} has no expression math-verify can parse")
    pred = mv.parse(response, parsing_timeout=timeout)
    return bool(pred) and mv.verify(gold, pred, timeout_seconds=timeout)

  def formatted(self, response: str) -> bool:
    return len(_BOXED.findall(response)) == 1

  def score(self, response: str, answer: str) -> float:
    value = float(self.correct(response, answer))
    return value + self.format_weight * self.formatted(response) if self.format_weight else value
