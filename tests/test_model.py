from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from leadre.artifacts import ArtifactError
from leadre.model import (METADATA, PRESETS, build_model, count_parameters, create_model, load_model,
                          qwen2_config, resolve_config, save_model)
from leadre.sid import render, vocabulary
from leadre.tokenizer import sid_token_ids, train_tokenizer

LEVEL_SIZES = (8, 8, 4)
CORPUS = [f"User profile: age {age}, region {region}. Ads clicked: {render((age % 8, age * 3 % 8, age % 4))}."
          for age in range(20, 60) for region in ("north", "south", "east")]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return create_model("tiny", LEVEL_SIZES, CORPUS)


def batch(tokenizer) -> torch.Tensor:
    texts = ["Ads clicked: <a_1><b_2><c_3> then <a_4><b_5><c_0>", "User profile: age 30. Ads: <a_7><b_7><c_3>"]
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    return encoded["input_ids"]


@pytest.mark.parametrize("preset, low, high", [("tiny", 0, 1_000_000), ("small", 10_000_000, 30_000_000)])
def test_preset_sizes(preset: str, low: int, high: int) -> None:
    config = resolve_config(preset)
    # the reference vocabulary: the full BPE budget plus 4 levels of 256 S-ID codes
    vocab_size = config["bpe_vocab_size"] + len(vocabulary((256, 256, 256, 256)))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(qwen2_config(config, vocab_size))
    assert low < count_parameters(model) <= high
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_tiny_model_matches_its_tokenizer(tiny) -> None:
    model, tokenizer = tiny
    assert model.config.vocab_size == len(tokenizer)
    assert (model.config.pad_token_id, model.config.eos_token_id) == (tokenizer.pad_token_id, tokenizer.eos_token_id)
    assert count_parameters(model, trainable_only=True) == count_parameters(model) < 1_000_000


def test_eager_and_sdpa_agree(tiny) -> None:
    model, tokenizer = tiny
    config = resolve_config("tiny")
    ids = batch(tokenizer)
    logits = {}
    for implementation in ("eager", "sdpa"):
        other = build_model(config, tokenizer, attn_implementation=implementation)
        other.load_state_dict(model.state_dict())
        assert other.config._attn_implementation == implementation
        with torch.no_grad():
            logits[implementation] = other.eval()(ids).logits
    assert logits["eager"].shape == (*ids.shape, len(tokenizer))
    torch.testing.assert_close(logits["eager"], logits["sdpa"], atol=1e-5, rtol=1e-4)


def test_overrides_and_their_errors(tmp_path: Path) -> None:
    config = resolve_config("tiny", {"num_hidden_layers": 3, "attention_dropout": 0.1})
    assert config["num_hidden_layers"] == 3 and config["hidden_size"] == PRESETS["tiny"]["hidden_size"]
    file = tmp_path / "sft.yaml"
    file.write_text("model:\n  hidden_size: 96\n  num_attention_heads: 6\ntrain:\n  epochs: 2\n")
    assert resolve_config("small", yaml.safe_load(file.read_text())["model"])["hidden_size"] == 96
    with pytest.raises(ValueError, match="unknown model setting.*'hidden_sise'.*known: bpe_vocab_size"):
        resolve_config("tiny", {"hidden_sise": 128})
    with pytest.raises(ValueError, match="'num_hidden_layers': invalid value '2'"):
        resolve_config("tiny", {"num_hidden_layers": "2"})
    with pytest.raises(ValueError, match="'attention_dropout': invalid value 1.5"):
        resolve_config("tiny", {"attention_dropout": 1.5})
    with pytest.raises(ValueError, match="'hidden_size' .90. must be a multiple of 'num_attention_heads' .4."):
        resolve_config("tiny", {"hidden_size": 90})
    with pytest.raises(ValueError, match="must be even for rotary embeddings"):
        resolve_config("tiny", {"hidden_size": 100})
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        resolve_config("huge")


def test_save_and_load_a_preset_model(tiny, tmp_path: Path) -> None:
    model, tokenizer = tiny
    written = save_model(model, tokenizer, tmp_path, {"base": "tiny", "level_sizes": list(LEVEL_SIZES),
                                                      "data_version": "v1"})
    assert not [p for p in tmp_path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    loaded, loaded_tokenizer, metadata = load_model(tmp_path, attn_implementation="eager")
    assert metadata == json.loads((tmp_path / METADATA).read_text()) == written
    assert metadata["model"]["parameters"] == count_parameters(model)
    assert loaded.config._attn_implementation == "eager" and not loaded.training
    # AutoTokenizer rebuilds a `qwen2` directory's tokenizer as a Qwen2Tokenizer: it must tokenise alike
    text = f"Café  déjà-vu\t42 items!\n\n<a_1><b_0><c_3> <a_2>{tokenizer.eos_token}"
    assert loaded_tokenizer.encode(text) == tokenizer.encode(text)
    assert loaded_tokenizer.decode(loaded_tokenizer.encode(text)) == text
    ids = batch(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model.eval()(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.fixture(params=[True, False], ids=["tied", "untied"])
def pretrained_dir(request, tmp_path: Path) -> Path:
    """A stand-in for a user's pretrained model: a tiny Qwen2 and its own tokenizer, with spare embedding rows."""
    torch.manual_seed(1)
    tokenizer = train_tokenizer(CORPUS, (), vocab_size=400)
    config = {**resolve_config("tiny"), "tie_word_embeddings": request.param}
    model = AutoModelForCausalLM.from_config(qwen2_config(config, len(tokenizer) + 3, tokenizer.pad_token_id,
                                                          tokenizer.eos_token_id))
    path = tmp_path / "base"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_pretrained_path_trains_only_lora_and_sid_rows(pretrained_dir: Path, tmp_path: Path) -> None:
    model, tokenizer = create_model(str(pretrained_dir), LEVEL_SIZES, iter(()), {"r": 4})
    sid_ids = np.concatenate(sid_token_ids(tokenizer, LEVEL_SIZES))
    old_size = len(AutoModelForCausalLM.from_pretrained(pretrained_dir).get_input_embeddings().weight) - 3
    assert sid_ids.min() == old_size and model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name or "trainable_tokens_delta" in name for name in trainable)

    before = [model.get_input_embeddings().weight.detach().clone(), model.get_output_embeddings().weight.detach().clone()]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = batch(tokenizer)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    after = [model.get_input_embeddings().weight.detach(), model.get_output_embeddings().weight.detach()]
    for old, new in zip(before, after):
        changed = (old != new).any(dim=1).nonzero().flatten().numpy()
        assert set(changed) == set(sid_ids)

    save_model(model, tokenizer, tmp_path / "sft", {"base": str(pretrained_dir), "level_sizes": list(LEVEL_SIZES)})
    loaded, loaded_tokenizer, metadata = load_model(tmp_path / "sft")
    assert metadata["base"] == str(pretrained_dir)
    text = "Ads clicked: <a_7><b_0><c_3> <a_1>"
    assert loaded_tokenizer.encode(text) == tokenizer.encode(text)
    assert loaded_tokenizer.decode(loaded_tokenizer.encode(text)) == text
    assert metadata["model"]["parameters"] == count_parameters(loaded) < count_parameters(model)
    model.eval()
    with torch.no_grad():  # LoRA merged into the weights: equal up to float rounding
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
    assert any(p.requires_grad for p in model.parameters())  # saving merged a copy, not the training model


def test_pickled_weights_are_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(ArtifactError, match=r"refusing pickled weights \(pytorch_model.bin\)"):
        create_model(str(tmp_path), LEVEL_SIZES, iter(()))
    with pytest.raises(ArtifactError, match="refusing pickled weights"):
        load_model(tmp_path)
    (tmp_path / "pytorch_model.bin").unlink()
    with pytest.raises(ArtifactError, match=r"no \*.safetensors weights"):
        load_model(tmp_path)
