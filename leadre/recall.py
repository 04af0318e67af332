"""The LLM recaller: prompts in, top-N active ads out, through trie-constrained beam search.

One object bundles what every caller needs — tokenizer, decoder step (PyTorch, ONNX Runtime or TensorRT) and the
trie of active ads — and is shared by validation during training, `leadre evaluate`, DPO pair mining and the
near-line service.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from leadre.decode import HFStepModel, StepModel, search
from leadre.sid import SidTable
from leadre.tokenizer import sid_token_ids
from leadre.trie import Trie, trie_from_table


@dataclass(frozen=True)
class LLMRecaller:
    step: StepModel
    tokenizer: PreTrainedTokenizerBase
    trie: Trie
    batch_size: int = 32

    @classmethod
    def from_model(cls, model, tokenizer: PreTrainedTokenizerBase, sids: SidTable,
                   active_ads: Collection[str] | None = None, batch_size: int = 32) -> LLMRecaller:
        """A PyTorch recaller over the S-IDs of `active_ads` (default: every ad in the table)."""
        trie = trie_from_table(sids, sid_token_ids(tokenizer, sids.level_sizes), active_ads)
        return cls(HFStepModel(model), tokenizer, trie, batch_size)

    @classmethod
    def from_dir(cls, model_dir: str | Path, sids: SidTable, active_ads: Collection[str] | None = None,
                 batch_size: int = 32) -> LLMRecaller:
        from leadre.model import load_model

        model, tokenizer, _ = load_model(model_dir)
        return cls.from_model(model, tokenizer, sids, active_ads, batch_size)

    def with_trie(self, trie: Trie) -> LLMRecaller:
        """The same model over another trie (ads started or paused); the old recaller keeps working."""
        return replace(self, trie=trie)

    def recall(self, prompts: Sequence[str], top_n: int, beam_width: int | None = None,
               exclude: Sequence[Collection[str]] | None = None, progress: bool = False,
               renormalize: bool = False) -> list[list[tuple[str, float]]]:
        """Per prompt, the top `top_n` distinct active ads with their log-probabilities, best first."""
        ids = self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
        return search(self.step, self.trie, ids, top_n, beam_width, exclude, self.batch_size,
                      pad_id=self.tokenizer.pad_token_id, progress=progress, renormalize=renormalize)
