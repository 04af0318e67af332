from __future__ import annotations

import itertools

import numpy as np
import pytest
from transformers import AutoTokenizer

from leadre.sid import render, vocabulary
from leadre.synth import CATALOGUE
from leadre.tokenizer import EOS_TOKEN, PAD_TOKEN, extend_tokenizer, sid_token_ids, train_tokenizer

LEVEL_SIZES = (16, 16, 4)


def prompt_corpus() -> list[str]:
    """Prompt-like lines: ad text from the synthetic catalogue with S-IDs in between."""
    nouns = [noun for subtopics in CATALOGUE.values() for products in subtopics.values() for noun in products]
    return [f"User profile: age 25-34, region north.\nAds clicked: {noun} {render((i % 16, i * 7 % 16, i % 4))} "
            f"then {nouns[(i + 1) % len(nouns)]}.\nNext ad:"
            for i, noun in enumerate(nouns * 3)]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(prompt_corpus(), LEVEL_SIZES, vocab_size=600)


def test_bpe_is_trained_on_the_corpus(tokenizer) -> None:
    sids = len(vocabulary(LEVEL_SIZES))
    assert 258 < len(tokenizer) - sids <= 600  # pad, eos, 256 bytes, then merges up to the budget
    assert tokenizer.tokenize("User profile: region north.\nNext ad:") == \
        ["User", "Ġprofile", ":", "Ġregion", "Ġnorth", ".Ċ", "Next", "Ġad", ":"]
    # S-IDs were cut out of the corpus, so no merge spells part of one
    assert not [t for t in tokenizer.get_vocab() if ("<a" in t or "_1>" in t) and t not in vocabulary(LEVEL_SIZES)]


def test_special_tokens(tokenizer) -> None:
    assert (tokenizer.pad_token, tokenizer.eos_token) == (PAD_TOKEN, EOS_TOKEN)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer("hello")["input_ids"] == tokenizer.encode("hello", add_special_tokens=False)


def test_every_sid_round_trips_as_single_tokens(tokenizer) -> None:
    ids = sid_token_ids(tokenizer, LEVEL_SIZES)
    assert [len(level) for level in ids] == list(LEVEL_SIZES)
    assert len(np.unique(np.concatenate(ids))) == sum(LEVEL_SIZES)
    for codes in itertools.product(*(range(size) for size in LEVEL_SIZES)):
        text = render(codes)
        encoded = tokenizer.encode(text, add_special_tokens=False)
        assert encoded == [int(ids[level][code]) for level, code in enumerate(codes)]
        assert tokenizer.decode(encoded) == text


def test_text_next_to_sids_tokenises_predictably(tokenizer) -> None:
    text = f"Ads: <a_1><b_2><c_3> <a_4><b_5><c_0>.\nNext:<a_7><b_0><c_1>{EOS_TOKEN}"
    tokens = tokenizer.tokenize(text)
    sids = [t for t in tokens if t.startswith("<") and t.endswith(">") and t != EOS_TOKEN]
    assert sids == ["<a_1>", "<b_2>", "<c_3>", "<a_4>", "<b_5>", "<c_0>", "<a_7>", "<b_0>", "<c_1>"]
    assert tokens[tokens.index("<a_1>") - 1] == "Ġ"  # the space before an S-ID stays its own token
    assert tokens[tokens.index("<a_4>") - 1] == "Ġ"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    # S-IDs are normal added tokens: skipping special tokens drops eos and keeps the answer
    assert tokenizer.decode(ids, skip_special_tokens=True) == text.removesuffix(EOS_TOKEN)


def test_save_and_load_round_trip(tokenizer, tmp_path) -> None:
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    text = "Ads clicked: flight deals <a_3><b_15><c_2> then <a_0><b_0><c_0>"
    assert loaded.encode(text) == tokenizer.encode(text)
    assert loaded.decode(loaded.encode(text)) == text
    assert [a.tolist() for a in sid_token_ids(loaded, LEVEL_SIZES)] == \
        [a.tolist() for a in sid_token_ids(tokenizer, LEVEL_SIZES)]


def test_extend_a_base_tokenizer() -> None:
    base = train_tokenizer(prompt_corpus(), (), vocab_size=400)
    size = len(base)
    new_ids = extend_tokenizer(base, LEVEL_SIZES)
    assert new_ids == list(range(size, size + sum(LEVEL_SIZES)))
    assert extend_tokenizer(base, LEVEL_SIZES) == []
    assert len(base.encode(render((15, 15, 3)), add_special_tokens=False)) == 3


def test_missing_sid_tokens_are_named(tokenizer) -> None:
    with pytest.raises(ValueError, match=r"lacks 1 S-ID tokens.*<c_4>"):
        sid_token_ids(tokenizer, (16, 16, 5))
