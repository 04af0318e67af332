"""The model factory: `--preset tiny|small|PATH` → a causal LM and a tokenizer that knows the S-ID tokens.

- `tiny` / `small`: Qwen2-style decoders built from the settings in `PRESETS` and trained from scratch, with a
  byte-level BPE trained on the prompt corpus. Tied input/output embeddings and a modest width (DESIGN §8).
- PATH: a local Hugging Face causal-LM directory (safetensors only). Its tokenizer gains the S-ID tokens, its
  embeddings grow to match, and it is wrapped with LoRA whose trainable tokens are the S-ID rows of the input
  embeddings and of the output layer (the same rows once, when the two are tied).

A saved model directory is self-contained: LoRA is merged into the base before saving, so serving and ONNX export
load one plain `save_pretrained` directory (safetensors weights, tokenizer, `leadre_model.json`) and never need the
base model's path. Pickled weights are refused everywhere: loading them can run arbitrary code.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase,
                          Qwen2Config)

from leadre.artifacts import ArtifactError
from leadre.tokenizer import extend_tokenizer, sid_token_ids, train_tokenizer

# Settings a `--config` YAML may override (its `model:` section). `bpe_vocab_size` sizes the tokenizer trained for
# the preset; every other key is a transformers.Qwen2Config field. The vocabulary size comes from the tokenizer.
COMMON_SETTINGS: dict[str, Any] = {
    "max_position_embeddings": 1024,
    "tie_word_embeddings": True,
    "attention_dropout": 0.0,
    "rms_norm_eps": 1e-6,
    "initializer_range": 0.02,
}
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"bpe_vocab_size": 2048, "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, **COMMON_SETTINGS},
    "small": {"bpe_vocab_size": 4096, "hidden_size": 384, "intermediate_size": 2048, "num_hidden_layers": 4,
              "num_attention_heads": 6, "num_key_value_heads": 2, **COMMON_SETTINGS},
}
# What a PATH preset's `model:` section may override: peft.LoraConfig fields.
LORA_DEFAULTS: dict[str, Any] = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"}
# New S-ID rows start at the mean existing embedding plus this fraction of the per-dimension spread: near the
# mean so no new token dominates the softmax at first, with enough noise that the new tokens are told apart.
NEW_TOKEN_NOISE = 0.1
METADATA = "leadre_model.json"
PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt")


def resolve_config(preset: str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The preset's settings with `overrides` applied; ValueError names an unknown key or an invalid value."""
    if preset in PRESETS:
        defaults = PRESETS[preset]
    elif Path(preset).is_dir():
        defaults = LORA_DEFAULTS
    else:
        raise ValueError(f"unknown preset {preset!r}: expected {', '.join(PRESETS)} or a local model directory")
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise ValueError(f"unknown model setting(s) {', '.join(map(repr, unknown))} for preset {preset!r}; "
                         f"known: {', '.join(defaults)}")
    for key, value in overrides.items():
        _check_value(key, value, defaults[key])
    config = {**defaults, **overrides}
    if preset in PRESETS:
        _check_shape(config)
    return config


def _check_value(key: str, value: Any, default: Any) -> None:
    if isinstance(default, bool) or isinstance(value, bool):
        valid = type(value) is type(default)
    elif isinstance(default, int):
        valid = isinstance(value, int) and value > 0
    elif isinstance(default, float):
        valid = isinstance(value, (int, float)) and value >= 0 and not (key.endswith("dropout") and value >= 1)
    else:  # strings and lists (LoRA target modules) are checked by peft itself
        valid = True
    if not valid:
        raise ValueError(f"model setting {key!r}: invalid value {value!r} (the default is {default!r})")


def _check_shape(config: Mapping[str, Any]) -> None:
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    if config["hidden_size"] % heads:
        raise ValueError(f"model setting 'hidden_size' ({config['hidden_size']}) must be a multiple of "
                         f"'num_attention_heads' ({heads})")
    if heads % kv_heads:
        raise ValueError(f"model setting 'num_attention_heads' ({heads}) must be a multiple of "
                         f"'num_key_value_heads' ({kv_heads})")
    if (config["hidden_size"] // heads) % 2:
        raise ValueError("model settings: hidden_size / num_attention_heads must be even for rotary embeddings")


def qwen2_config(config: Mapping[str, Any], vocab_size: int, pad_token_id: int | None = None,
                 eos_token_id: int | None = None) -> Qwen2Config:
    """The transformers config of a built-in preset (as `resolve_config` returns it) for a vocabulary size."""
    architecture = {key: value for key, value in config.items() if key != "bpe_vocab_size"}
    return Qwen2Config(**architecture, vocab_size=vocab_size, pad_token_id=pad_token_id, eos_token_id=eos_token_id,
                       bos_token_id=None)


def build_model(config: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase,
                attn_implementation: str = "sdpa") -> PreTrainedModel:
    """A freshly initialised decoder of a built-in preset, sized to `tokenizer`.

    `attn_implementation="eager"` is what ONNX export with a KV cache needs; "sdpa" is faster for training.
    """
    model_config = qwen2_config(config, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
    return AutoModelForCausalLM.from_config(model_config, attn_implementation=attn_implementation)


def create_model(preset: str, level_sizes: Sequence[int], texts: Iterable[str],
                 overrides: Mapping[str, Any] | None = None,
                 attn_implementation: str = "sdpa") -> tuple[PreTrainedModel | PeftModel, PreTrainedTokenizerBase]:
    """The model and tokenizer `leadre train sft --preset` starts from.

    `texts` (the prompt corpus) trains the BPE of a built-in preset; a PATH preset brings its own tokenizer and
    never reads them, so pass a lazy iterable.
    """
    config = resolve_config(preset, overrides)
    if preset in PRESETS:
        tokenizer = train_tokenizer(texts, level_sizes, config["bpe_vocab_size"])
        return build_model(config, tokenizer, attn_implementation), tokenizer
    return load_pretrained_with_lora(preset, level_sizes, config, attn_implementation)


def load_pretrained_with_lora(model_dir: str | Path, level_sizes: Sequence[int],
                              lora_settings: Mapping[str, Any] = LORA_DEFAULTS,
                              attn_implementation: str = "sdpa") -> tuple[PeftModel, PreTrainedTokenizerBase]:
    """A local pretrained causal LM with the S-ID tokens added and LoRA (plus the S-ID token rows) trainable."""
    model_dir = Path(model_dir)
    _require_safetensors(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    new_ids = extend_tokenizer(tokenizer, level_sizes)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = _from_pretrained(model_dir, attn_implementation)
    _add_token_rows(model, len(tokenizer), new_ids)
    model.config.pad_token_id = tokenizer.pad_token_id
    sid_ids = np.concatenate(sid_token_ids(tokenizer, level_sizes)).tolist()
    return add_lora(model, sid_ids, lora_settings), tokenizer


def _add_token_rows(model: PreTrainedModel, vocab_size: int, new_ids: Sequence[int]) -> None:
    """Grow the embeddings to `vocab_size` rows and initialise the rows of the new tokens.

    Base models often carry unused padding rows past their tokenizer, so new tokens may land in existing rows:
    those are re-initialised too. New ids follow the base tokenizer's, so the rows before them are real tokens.
    """
    if vocab_size > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(vocab_size, mean_resizing=False)
    if not new_ids:
        return
    generator = torch.Generator().manual_seed(0)
    weights = {id(w): w for w in (model.get_input_embeddings().weight, model.get_output_embeddings().weight)}
    with torch.no_grad():
        for weight in weights.values():
            existing = weight[: min(new_ids)]
            noise = torch.randn(len(new_ids), weight.shape[1], generator=generator, dtype=weight.dtype)
            weight[list(new_ids)] = existing.mean(dim=0) + NEW_TOKEN_NOISE * existing.std(dim=0) * noise


def add_lora(model: PreTrainedModel, token_ids: Sequence[int], lora_settings: Mapping[str, Any]) -> PeftModel:
    """Wrap `model` with LoRA; the rows of `token_ids` in the input embeddings and output layer train too.

    With tied embeddings peft trains one set of rows and ties the output layer to it; untied, each layer gets its
    own trainable rows, since the output rows are what scores the S-ID tokens.
    """
    names = {module: name for name, module in model.named_modules()}
    embeddings, output = model.get_input_embeddings(), model.get_output_embeddings()
    token_ids = [int(t) for t in token_ids]
    if output.weight is embeddings.weight:
        trainable_tokens: list[int] | dict[str, list[int]] = token_ids
    else:
        trainable_tokens = {names[embeddings]: token_ids, names[output]: token_ids}
    config = LoraConfig(task_type="CAUSAL_LM", trainable_token_indices=trainable_tokens, **lora_settings)
    return get_peft_model(model, config)


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Parameters counted once each (tied embeddings are one matrix)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def model_summary(model: PreTrainedModel) -> dict[str, Any]:
    """The config fields and parameter count `leadre_model.json` records under `model`."""
    config = model.config
    keys = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "vocab_size", "max_position_embeddings", "tie_word_embeddings")
    return {key: getattr(config, key, None) for key in keys} | {"parameters": count_parameters(model)}


def save_model(model: PreTrainedModel | PeftModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path,
               metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Write a self-contained model directory: safetensors weights, tokenizer and `leadre_model.json`.

    `metadata` must hold `level_sizes`; callers add `base` (preset or path), the data version and metrics. A LoRA
    model is merged into a copy of its base, so the caller's model keeps training. Writes into `out_dir` as is:
    atomicity is the caller's `write_artifact`. Returns the metadata written.
    """
    if "level_sizes" not in metadata:
        raise ValueError("save_model: metadata needs 'level_sizes' (the S-ID level sizes the tokenizer knows)")
    sid_token_ids(tokenizer, metadata["level_sizes"])
    merged = copy.deepcopy(model).merge_and_unload() if isinstance(model, PeftModel) else model
    out_dir = Path(out_dir)
    merged.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    written = {**metadata, "model": model_summary(merged)}
    (out_dir / METADATA).write_text(json.dumps(written, indent=2, sort_keys=True, default=str) + "\n")
    return written


def load_model(model_dir: str | Path,
               attn_implementation: str = "sdpa") -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict[str, Any]]:
    """Read a directory `save_model` wrote: (model in eval mode, tokenizer, metadata)."""
    model_dir = Path(model_dir)
    _require_safetensors(model_dir)
    if not (model_dir / METADATA).is_file():
        raise ArtifactError(f"{model_dir}: no {METADATA}; not a model directory written by LEADRE's training")
    metadata = json.loads((model_dir / METADATA).read_text())
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    sid_token_ids(tokenizer, metadata["level_sizes"])
    return _from_pretrained(model_dir, attn_implementation).eval(), tokenizer, metadata


def _from_pretrained(model_dir: Path, attn_implementation: str) -> PreTrainedModel:
    # float32: CPU training and parity checks want it, whatever dtype the checkpoint was stored in.
    return AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, use_safetensors=True,
                                                dtype=torch.float32, attn_implementation=attn_implementation)


def _require_safetensors(model_dir: Path) -> None:
    """Check the weight files before anything is loaded."""
    if not model_dir.is_dir():
        raise ArtifactError(f"{model_dir}: no such model directory")
    if any(model_dir.glob("*.safetensors")):
        return
    pickled = sorted(p.name for pattern in PICKLED_WEIGHTS for p in model_dir.glob(pattern))
    if pickled:
        raise ArtifactError(f"{model_dir}: refusing pickled weights ({', '.join(pickled)}): unpickling can run "
                            "arbitrary code; convert the checkpoint to safetensors")
    raise ArtifactError(f"{model_dir}: no *.safetensors weights")
