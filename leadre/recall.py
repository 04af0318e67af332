"""The LLM recaller: prompts in, top-N active ads out, through trie-constrained beam search.

One object bundles what every caller needs — tokenizer, decoder step (PyTorch, ONNX Runtime or TensorRT) and the
trie of active ads — and is shared by validation during training, `leadre evaluate`, DPO pair mining and the
near-line service.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from leadre.decode import HFStepModel, StepModel, search
from leadre.sid import SidTable
from leadre.tokenizer import sid_token_ids
from leadre.trie import Trie, trie_from_table

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LLMRecaller:
    step: StepModel
    tokenizer: PreTrainedTokenizerBase
    trie: Trie
    batch_size: int = 32
    backend: str = "torch"  # which leadre.backends backend `step` is
    backend_reason: str = "the PyTorch model as given"

    def __post_init__(self) -> None:
        # the trie goes where the step's logits come out, once here rather than in every search
        object.__setattr__(self, "trie", self.trie.to(self.step.device))

    @classmethod
    def from_model(cls, model, tokenizer: PreTrainedTokenizerBase, sids: SidTable,
                   active_ads: Collection[str] | None = None, batch_size: int = 32) -> LLMRecaller:
        """A PyTorch recaller, on the model's device, over the S-IDs of `active_ads` (default: every ad)."""
        trie = trie_from_table(sids, sid_token_ids(tokenizer, sids.level_sizes), active_ads)
        return cls(HFStepModel(model), tokenizer, trie, batch_size)

    @classmethod
    def from_dir(cls, model_dir: str | Path, sids: SidTable, active_ads: Collection[str] | None = None,
                 batch_size: int = 32, device: str = "auto", backend: str = "auto",
                 compiled_dir: str | Path | None = None) -> LLMRecaller:
        """A recaller of a saved model on `device` (auto | cpu | cuda) through `backend` (auto or one of
        leadre.backends.BACKENDS; the compiled ones need `compiled_dir`, a `leadre compile` artifact of this model).
        `auto` takes the fastest backend the compile step measured on this kind of device, else TensorRT on a GPU,
        ONNX Runtime on the CPU, PyTorch otherwise; the choice and its reason are logged and kept on the recaller."""
        from leadre.backends import choose_backend, load_step_model
        from leadre.devices import inference_dtype, resolve_device
        from leadre.export import read_compiled
        from leadre.model import load_model

        target = resolve_device(device)
        if backend == "auto":
            measured = read_compiled(compiled_dir)["parity"]["backends"] if compiled_dir is not None else None
            backend, reason = choose_backend(target, compiled_dir, measured)
        else:
            reason = "asked for"
        log.info("recall: %s backend on %s (%s)", backend, target, reason)
        model, tokenizer, _ = load_model(model_dir)
        if backend.startswith("torch"):
            model.to(target, dtype=inference_dtype(target))
        step = load_step_model(backend, target, model, compiled_dir)
        trie = trie_from_table(sids, sid_token_ids(tokenizer, sids.level_sizes), active_ads)
        return cls(step, tokenizer, trie, batch_size, backend, reason)

    def with_trie(self, trie: Trie) -> LLMRecaller:
        """The same model over another trie (ads started or paused), moved to the model's device; the old recaller
        keeps working."""
        return replace(self, trie=trie)

    def recall(self, prompts: Sequence[str], top_n: int, beam_width: int | None = None,
               exclude: Sequence[Collection[str]] | None = None, progress: bool = False,
               renormalize: bool = False) -> list[list[tuple[str, float]]]:
        """Per prompt, the top `top_n` distinct active ads with their log-probabilities, best first."""
        ids = self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
        return search(self.step, self.trie, ids, top_n, beam_width, exclude, self.batch_size,
                      pad_id=self.tokenizer.pad_token_id, progress=progress, renormalize=renormalize)
