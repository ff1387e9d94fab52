"""GSM-style word problems with known answers, generated offline by `reasoning-gym`'s `gsm_symbolic`
(GSM8K templates with fresh numbers; the answer is computed from them), reproducible from a seed."""
from __future__ import annotations

GENERATORS = ("gsm_symbolic",)


def generate(name: str, size: int, seed: int) -> list[tuple[str, str]]:
  """`size` (question, answer) pairs of generator `name`."""
  if name not in GENERATORS:
    raise ValueError(f"unknown problem generator {name!r}; known: {', '.join(GENERATORS)}")
  if size < 1:
    raise ValueError(f"generator {name!r}: size must be >= 1, got {size}")
  try:
    import reasoning_gym  # noqa: PLC0415  (the `text` extra)
  except ImportError:
    raise ImportError(f"the {name} generator needs reasoning-gym: pip install -e '.[text]'") from None
  dataset = reasoning_gym.create_dataset(name, size=size, seed=seed)
  return [(item["question"], str(item["answer"])) for item in (dataset[i] for i in range(size))]
