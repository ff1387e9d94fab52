"""Named presets: `get_config(name) -> TrainConfig`, `apply_overrides(cfg, ["model.d_model=128", ...])`.

One module per preset, each with `get_config()`. Overrides use dotted field paths through nested groups
(`model.moe.num_experts=16`) and are typed by the dataclass field (int, float, bool, str, `X | None` takes
"none"). A key naming a field of a group one level down (`model.num_experts`) fails, suggesting the full key.
"""
import dataclasses
import difflib
import importlib
import types
import typing

from foremoe_jax.model import ModelConfig
from foremoe_jax.rl.config import RLConfig

PRESETS = ("cpu_tiny", "cpu_text", "gpu_1", "gpu_2", "gpu_4", "gpu_8", "qwen3_30b_a3b", "qwen3_30b_a3b_L8")


@dataclasses.dataclass(frozen=True)
class TaskConfig:
  kind: str = "arithmetic"  # "arithmetic" (character tokenizer) | "text" (foremoe_jax/text: real tokenizer)
  num_digits: int = 2
  ops: str = "+"
  # kind="text": "qwen3" (bundled vocabulary) or a checkpoint directory (train.py --init-from sets it).
  tokenizer: str = "qwen3"
  data: str = "gsm_symbolic"  # a generator (foremoe_jax/text/gsm.py) or a .jsonl / .parquet / .tsv file
  num_problems: int = 256  # problems a generator makes
  max_prompt_tokens: int = 96  # chat-formatted; longer problems are dropped (logged)
  max_answer_tokens: int = 12  # SFT target `\boxed{answer}`, EOS excluded
  format_weight: float = 0.1  # reward + this when the response holds exactly one \boxed{}
  system: str = ""  # system prompt of the chat template


@dataclasses.dataclass(frozen=True)
class SFTConfig:
  steps: int = 300
  batch_size: int = 64
  lr: float = 3e-3
  warmup_steps: int = 20
  weight_decay: float = 0.01
  aux_loss_weight: float = 0.01
  log_every: int = 10
  ckpt_every: int = 100
  eval_prompts: int = 128


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  name: str
  model: ModelConfig
  mesh_data: int = 1
  mesh_expert: int = 8
  seed: int = 0
  task: TaskConfig = TaskConfig()
  sft: SFTConfig = SFTConfig()
  rl: RLConfig = RLConfig()

  def validate(self) -> "TrainConfig":
    if self.mesh_data < 1 or self.mesh_expert < 1:
      raise ValueError(f"mesh_data and mesh_expert must be >= 1, got {self.mesh_data}, {self.mesh_expert}")
    self.model.validate(self.mesh_expert)
    s = self.sft
    bad = [f"sft.{n}={getattr(s, n)}" for n in ("batch_size", "log_every", "ckpt_every", "eval_prompts")
           if getattr(s, n) < 1] + ([f"sft.steps={s.steps}"] if s.steps < 0 else [])
    if bad or s.lr <= 0 or s.warmup_steps < 0:
      raise ValueError("need sft.steps >= 0, sft.lr > 0, sft.warmup_steps >= 0 and the rest >= 1, got "
                       + ", ".join(bad + [f"sft.lr={s.lr}", f"sft.warmup_steps={s.warmup_steps}"]))
    if self.task.kind not in ("arithmetic", "text"):
      raise ValueError(f"task.kind={self.task.kind!r}: expected 'arithmetic' or 'text'")
    shards = self.mesh_data * self.mesh_expert
    if self.sft.batch_size % shards:
      raise ValueError(f"sft.batch_size={self.sft.batch_size} is not divisible by the {shards} devices")
    if self.sft.eval_prompts % shards:
      raise ValueError(f"sft.eval_prompts={self.sft.eval_prompts} is not divisible by the {shards} devices")
    self.rl.validate(shards)
    return self


def get_config(name: str) -> TrainConfig:
  if name not in PRESETS:
    near = difflib.get_close_matches(name, PRESETS, n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    raise ValueError(f"unknown preset {name!r}{hint}; known presets: {', '.join(PRESETS)}")
  return importlib.import_module(f"configs.{name}").get_config()


def _parse(value: str, annotation, key: str):
  args = typing.get_args(annotation)
  if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
    if value.lower() == "none" and type(None) in args:
      return None
    annotation = next(a for a in args if a is not type(None))
  try:
    if annotation is bool:
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(value)
      return value.lower() in ("true", "1")
    return annotation(value)
  except ValueError:
    raise ValueError(f"--set {key}={value}: expected a {annotation.__name__}") from None


def _override(obj, path: list[str], value: str, key: str):
  names = {f.name: f for f in dataclasses.fields(obj)}
  field = names.get(path[0])
  if field is None:
    # a field that moved into a group (model.num_experts -> model.moe.num_experts) names its new key
    groups = [n for n in names if dataclasses.is_dataclass(getattr(obj, n))
              and path[0] in {f.name for f in dataclasses.fields(getattr(obj, n))}]
    prefix = key[:len(key) - len(".".join(path))]
    near = [f"{prefix}{groups[0]}.{'.'.join(path)}"] if groups else difflib.get_close_matches(path[0], names, n=1)
    hint = f"did you mean {near[0]!r}? " if near else ""
    raise ValueError(f"--set {key}: unknown key {path[0]!r} in {type(obj).__name__}; {hint}valid keys: "
                     f"{', '.join(sorted(names))}")
  current = getattr(obj, path[0])
  if dataclasses.is_dataclass(current):
    if len(path) == 1:
      raise ValueError(f"--set {key}: {path[0]!r} is a group; set one of its fields, e.g. {path[0]}.<field>")
    return dataclasses.replace(obj, **{path[0]: _override(current, path[1:], value, key)})
  if len(path) > 1:
    raise ValueError(f"--set {key}: {path[0]!r} has no sub-keys")
  return dataclasses.replace(obj, **{path[0]: _parse(value, field.type, key)})


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
  """`["sft.steps=50", "model.dtype=bfloat16"]` -> a new config; clear ValueError on a bad key or value."""
  for item in overrides:
    key, sep, value = item.partition("=")
    if not sep or not key:
      raise ValueError(f"--set expects key=value, got {item!r}")
    cfg = _override(cfg, key.strip().split("."), value.strip(), key.strip())
  return cfg
