"""Tokenizer hook: a checkpoint's `tokenizer.json` through the `tokenizers` library, else the task's
character tokenizer. Both expose `encode(text, bos, eos)`, `decode(ids)` and `vocab_size`."""
import json
import os
import shutil

import jax

from foremoe_jax.rl.task import CharTokenizer, content_ids


class HFTokenizer:
  """A `tokenizers.Tokenizer` with the CharTokenizer interface; special ids from the checkpoint's config."""

  def __init__(self, tokenizer, bos_id: int | None, eos_id: int | None, pad_id: int | None):
    self.tokenizer, self.bos_id, self.eos_id, self.pad_id = tokenizer, bos_id, eos_id, pad_id

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
    ids = self.tokenizer.encode(text, add_special_tokens=False).ids
    return [self.bos_id] * (bos and self.bos_id is not None) + ids + [self.eos_id] * (eos and self.eos_id is not None)

  def decode(self, ids) -> str:
    """Text up to the first EOS or PAD; BOS is skipped (as CharTokenizer.decode)."""
    return self.tokenizer.decode(content_ids(ids, self))


def _first_id(value) -> int | None:
  return value[0] if isinstance(value, list) and value else value if isinstance(value, int) else None


def load_tokenizer(hf_dir: str):
  """`HFTokenizer` when `hf_dir/tokenizer.json` exists (needs `pip install tokenizers`), else CharTokenizer."""
  path = os.path.join(hf_dir, "tokenizer.json")
  if not os.path.isfile(path):
    return CharTokenizer()
  try:
    from tokenizers import Tokenizer  # noqa: PLC0415  (optional dependency)
  except ImportError:
    raise ImportError(f"{path} needs the optional 'tokenizers' package: pip install tokenizers") from None
  config = {}
  if os.path.isfile(os.path.join(hf_dir, "config.json")):
    with open(os.path.join(hf_dir, "config.json"), encoding="utf-8") as f:
      config = json.load(f)
  return HFTokenizer(Tokenizer.from_file(path), _first_id(config.get("bos_token_id")),
                     _first_id(config.get("eos_token_id")), _first_id(config.get("pad_token_id")))


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "generation_config.json")


def copy_tokenizer_files(src_dir: str, dst_dir: str) -> list[str]:
  """Carries the source checkpoint's tokenizer (and generation) files over to an export."""
  copied = [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(src_dir, f))]
  if jax.process_index() == 0:
    for f in copied:
      shutil.copyfile(os.path.join(src_dir, f), os.path.join(dst_dir, f))
  return copied
