"""Prompt files -> `(prompt, answer)` pairs, checked whole before any device work.

Formats (by extension):
- `.jsonl`: one JSON object per line with `prompt` and `answer`, or veRL's `prompt` (a string or a list
  of chat messages: the last user message is the prompt) and `reward_model.ground_truth`.
- `.parquet`: the same columns (veRL's GSM8K / MATH files as they are); needs `pyarrow`.
- `.tsv` / `.txt`: `prompt<TAB>answer` lines, blank lines skipped.
An answer in GSM8K's raw form (`reasoning ... #### 72`) keeps the part after `####`. Every error names
the file, the line (jsonl, tsv) or row (parquet, from 1) and the column.
"""
from __future__ import annotations

import json
import numbers
import os

FORMATS = (".jsonl", ".parquet", ".tsv", ".txt")


def _prompt_text(value, where: str) -> str:
  if isinstance(value, str):
    text = value
  elif isinstance(value, (list, tuple)):  # chat messages
    users = [m.get("content") for m in value if isinstance(m, dict) and m.get("role") == "user"]
    if not users or not isinstance(users[-1], str):
      raise ValueError(f"{where}, column 'prompt': a message list needs a user message with string content")
    text = users[-1]
  else:
    raise ValueError(f"{where}, column 'prompt': expected a string or a list of chat messages, "
                     f"got {type(value).__name__}")
  if not text.strip():
    raise ValueError(f"{where}, column 'prompt': empty prompt")
  return text


def _answer_text(value, where: str, column: str) -> str:
  if isinstance(value, bool) or not isinstance(value, (str, numbers.Number)):
    raise ValueError(f"{where}, column '{column}': expected a string or a number, got {type(value).__name__}")
  text = str(value).rpartition("####")[2].strip() if isinstance(value, str) else str(value)
  if not text:
    raise ValueError(f"{where}, column '{column}': empty answer")
  return text


def example_from_record(record, where: str) -> tuple[str, str]:
  """One (prompt, answer) from a dict with `prompt` and `answer` or `reward_model.ground_truth`."""
  if not isinstance(record, dict):
    raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
  if "prompt" not in record:
    raise ValueError(f"{where}: missing column 'prompt' (columns: {', '.join(sorted(record)) or 'none'})")
  prompt = _prompt_text(record["prompt"], where)
  if "answer" in record:
    return prompt, _answer_text(record["answer"], where, "answer")
  reward_model = record.get("reward_model")
  if isinstance(reward_model, dict) and "ground_truth" in reward_model:
    return prompt, _answer_text(reward_model["ground_truth"], where, "reward_model.ground_truth")
  raise ValueError(f"{where}: missing column 'answer' (or 'reward_model.ground_truth'); columns: "
                   f"{', '.join(sorted(record))}")


def _lines(path: str):
  """(line number, text) of the non-blank lines; non-UTF-8 bytes name their line."""
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, start=1):
      try:
        line = raw.decode("utf-8").rstrip("\r\n")
      except UnicodeDecodeError as e:
        raise ValueError(f"{path}:{lineno}: not UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r})") from None
      if line.strip():
        yield lineno, line


def _load_jsonl(path: str) -> list[tuple[str, str]]:
  pairs = []
  for lineno, line in _lines(path):
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{lineno}: not a JSON object ({e.msg} at column {e.colno})") from None
    pairs.append(example_from_record(record, f"{path}:{lineno}"))
  return pairs


def _load_tsv(path: str) -> list[tuple[str, str]]:
  pairs = []
  for lineno, line in _lines(path):
    fields = line.split("\t")
    if len(fields) != 2:
      raise ValueError(f"{path}:{lineno}: expected 'prompt<TAB>answer' (2 columns), got {len(fields)}: {line[:80]!r}")
    where = f"{path}:{lineno}"
    pairs.append((_prompt_text(fields[0], where), _answer_text(fields[1], where, "answer")))
  return pairs


def _load_parquet(path: str) -> list[tuple[str, str]]:
  try:
    import pyarrow.parquet as pq  # noqa: PLC0415  (the `text` extra)
  except ImportError:
    raise ImportError(f"{path}: parquet files need pyarrow: pip install -e '.[text]'") from None
  try:
    table = pq.read_table(path)
  except Exception as e:  # pyarrow raises its own error types for a file that is not parquet
    raise ValueError(f"{path}: not a readable parquet file ({e})") from None
  if "prompt" not in table.column_names:
    raise ValueError(f"{path}: missing column 'prompt' (columns: {', '.join(table.column_names)})")
  return [example_from_record(record, f"{path}, row {i}") for i, record in enumerate(table.to_pylist(), start=1)]


def load_examples(path: str | os.PathLike) -> list[tuple[str, str]]:
  """All (prompt, answer) pairs of a prompt file; ValueError naming file, line / row and column."""
  path = os.fspath(path)
  ext = os.path.splitext(path)[1].lower()
  if ext not in FORMATS:
    raise ValueError(f"prompt file {path!r}: unknown extension {ext!r}; expected one of {', '.join(FORMATS)}")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"prompt file not found: {path!r}")
  pairs = {".jsonl": _load_jsonl, ".parquet": _load_parquet}.get(ext, _load_tsv)(path)
  if not pairs:
    raise ValueError(f"prompt file {path!r} has no examples")
  return pairs
