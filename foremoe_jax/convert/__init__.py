"""Hugging Face checkpoints (Qwen3-MoE, OLMoE): config mapping, shard-aware safetensors load, export back,
and the tokenizer hook. See docs/hf.md."""
from foremoe_jax.convert.hf_config import hf_config, merge_with_overrides, model_config_from_hf, read_config
from foremoe_jax.convert.hf_weights import Checkpoint, export_model, load_model, tensor_specs
from foremoe_jax.convert.tokenizer import HFTokenizer, copy_tokenizer_files, load_tokenizer

__all__ = ["Checkpoint", "HFTokenizer", "copy_tokenizer_files", "export_model", "hf_config", "load_model",
           "load_tokenizer", "merge_with_overrides", "model_config_from_hf", "read_config", "tensor_specs"]
