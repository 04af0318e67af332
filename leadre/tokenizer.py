"""Tokenizers that know the S-ID vocabulary: one token per (level, code), e.g. `<a_17>`.

A model built from a preset gets a byte-level BPE trained here on the prompt corpus; a local pretrained model keeps
its own tokenizer. Either way every S-ID token from `sid.vocabulary` is added as one token.

S-ID tokens are *normal* added tokens, not special ones: `decode(..., skip_special_tokens=True)` must keep them,
because the generated S-IDs are the answer. `normalized=False` keeps any normalizer from rewriting them, and no
lstrip/rstrip keeps the spaces around them as their own tokens, so decoding gives back the exact text.
Added tokens are matched before BPE runs, so text next to an S-ID splits at the S-ID boundary the same way every
time: `"Ads: <a_1><b_2>"` → `Ads`, `:`, `Ġ`, `<a_1>`, `<b_2>`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from leadre.sid import sid_token, vocabulary

# Only pad and eos: prompts need no bos, and a pad distinct from eos keeps eos a token the model learns to emit.
PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"
DEFAULT_BPE_VOCAB_SIZE = 4096
SID_TOKEN_PATTERN = re.compile(r"<[a-z]_\d+>")


def train_tokenizer(
    texts: Iterable[str], level_sizes: Sequence[int], vocab_size: int = DEFAULT_BPE_VOCAB_SIZE
) -> PreTrainedTokenizerFast:
    """A byte-level BPE of at most `vocab_size` tokens (pad, eos, 256 bytes, merges) plus every S-ID token.

    S-IDs in `texts` are cut out before training: they become single added tokens, so merges such as `<a_` or
    `17>` would only waste the BPE vocabulary.
    """
    bpe = Tokenizer(models.BPE())
    # Qwen2's normalizer and pre-tokenizer, exactly: AutoTokenizer loads any directory whose config says `qwen2`
    # as a Qwen2Tokenizer, which rebuilds this pipeline around the saved vocabulary and merges.
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[PAD_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_text_between_sids(texts), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, pad_token=PAD_TOKEN, eos_token=EOS_TOKEN, clean_up_tokenization_spaces=False
    )
    extend_tokenizer(tokenizer, level_sizes)
    return tokenizer


def _text_between_sids(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        yield from SID_TOKEN_PATTERN.split(text)


def extend_tokenizer(tokenizer: PreTrainedTokenizerBase, level_sizes: Sequence[int]) -> list[int]:
    """Add every S-ID token to `tokenizer` in place; return the ids of the tokens its vocabulary did not have.

    Those are the rows a pretrained model's embeddings must grow by and initialise; adding twice adds nothing.
    A token the base vocabulary already holds is still made an added token: only added tokens are matched before
    BPE, and BPE could otherwise merge across S-ID boundaries (`><` is a common merge).
    """
    vocab, added = tokenizer.get_vocab(), tokenizer.get_added_vocab()
    tokens = vocabulary(level_sizes)
    tokenizer.add_tokens([AddedToken(token, normalized=False, special=False) for token in tokens if token not in added])
    return tokenizer.convert_tokens_to_ids([token for token in tokens if token not in vocab])


def sid_token_ids(tokenizer: PreTrainedTokenizerBase, level_sizes: Sequence[int]) -> list[np.ndarray]:
    """Per level, the token id of each code: `ids[level][code]`. Raises ValueError naming S-ID tokens it lacks."""
    added = tokenizer.get_added_vocab()
    missing = [token for token in vocabulary(level_sizes) if token not in added]
    if missing:
        raise ValueError(f"tokenizer lacks {len(missing)} S-ID tokens for level sizes {tuple(level_sizes)}, "
                         f"e.g. {', '.join(missing[:5])}; was it extended with these level sizes?")
    return [np.array([added[sid_token(level, code)] for code in range(size)], dtype=np.int64)
            for level, size in enumerate(level_sizes)]
