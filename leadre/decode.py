"""Trie-constrained beam search over a model step function: users × beams batched, one prefill per user.

The search sees the model only through `StepModel` (prefill a batch of prompts; advance chosen rows by one token),
so PyTorch, ONNX Runtime and TensorRT backends share it.

Scores are sums of log-probabilities under the model's full-vocabulary softmax, as Hugging Face's beam search
computes them and as teacher forcing would: the trie removes invalid continuations but does not renormalise
over the allowed ones, so an ad's score is the model's probability of generating exactly its S-ID.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, PreTrainedModel

from leadre.trie import Trie


class StepModel(Protocol):
    device: torch.device  # where its logits come out: the trie belongs there (`Trie.to`)

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Left-padded prompts (U, T) → next-token logits (U, V) and a decoder state with one row per prompt."""
        ...

    def step(self, tokens: torch.Tensor, rows: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        """Row i of the new state continues row `rows[i]` of `state` with `tokens[i]`; returns logits (len(rows), V).
        The same call expands prompts to beams and reorders beams. `state` may be consumed."""
        ...


@dataclass
class CacheState:
    cache: DynamicCache
    attention_mask: torch.Tensor  # (rows, T)
    next_position: torch.Tensor  # (rows,) position id of the next token


class HFStepModel:
    """`StepModel` over a Hugging Face causal LM and its KV cache."""

    def __init__(self, model: PreTrainedModel):
        self.model = model.eval()

    @property
    def device(self) -> torch.device:
        return self.model.device

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, CacheState]:
        input_ids, attention_mask = input_ids.to(self.model.device), attention_mask.to(self.model.device)
        # left padding: positions count real tokens only, so a prompt scores the same padded or alone
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=DynamicCache(config=self.model.config),
            use_cache=True,
            logits_to_keep=1,
        )
        state = CacheState(out.cache, attention_mask, attention_mask.sum(-1))
        return out.logits[:, -1].float(), state

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, rows: torch.Tensor, state: CacheState) -> tuple[torch.Tensor, CacheState]:
        tokens, rows = tokens.to(self.model.device), rows.to(self.model.device)
        state.cache.reorder_cache(rows)
        mask = state.attention_mask[rows]
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
        positions = state.next_position[rows]
        out = self.model(
            input_ids=tokens[:, None],
            attention_mask=mask,
            position_ids=positions[:, None],
            cache=state.cache,
            use_cache=True,
        )
        return out.logits[:, -1].float(), CacheState(out.cache, mask, positions + 1)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists → (input_ids, attention_mask), padded on the left so every prompt ends at the last column."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p) :] = torch.as_tensor(p, dtype=torch.long)
        attention_mask[i, width - len(p) :] = 1
    return input_ids, attention_mask


@torch.inference_mode()
def search_batch(
    model: StepModel,
    trie: Trie,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    top_n: int,
    beam_width: int,
    excluded: torch.Tensor | None = None,
    renormalize: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Beam search for U users at once → (leaf nodes (U, n), scores (U, n)), best first, n ≤ top_n. The trie, the
    masks, the top-k and the results live on the device of the model's logits, so no level waits for the host (a
    trie elsewhere is copied there for this call: `LLMRecaller` places its trie once).

    `excluded` holds keys `user * len(trie) + leaf` of complete S-IDs that user must not get. They are taken out
    at every level, not only the last: a prefix is allowed for a user only while an active ad below it is not
    excluded for that user, so no beam is spent on a prefix that leads nowhere and lists come back full wherever
    `top_n` allowed ads exist. Where fewer exist the tail has score -inf (and a meaningless leaf). `renormalize`
    scores each code by its softmax over the allowed codes only, so mass the model puts on invalid tokens costs no
    prefix anything."""
    n_users = len(input_ids)
    logits, state = model.prefill(input_ids, attention_mask)
    device = logits.device
    trie = trie.to(device)
    scores = torch.zeros(n_users, 1, device=device)
    nodes = torch.zeros(n_users, dtype=torch.long, device=device)
    blocked = None if excluded is None else trie.exclusion_index(excluded)
    for level in range(trie.levels):
        size, beams = trie.level_sizes[level], scores.shape[1]
        last = level == trie.levels - 1
        # the full-vocabulary softmax, then this level's K columns (renormalised scoring takes its softmax below
        # instead, over the allowed codes only)
        level_scores = logits if renormalize else torch.log_softmax(logits, dim=-1)
        log_probs = level_scores.index_select(1, trie.token_ids[level])
        allowed, children = trie.allowed(level, nodes)
        if blocked is not None:  # the user's own count of active ads below each child must stay above 0
            users = torch.arange(n_users, device=device).repeat_interleave(beams)[:, None]
            allowed &= trie.active_counts[level][children] > trie.excluded_below(level, children, users, blocked)
        if renormalize:  # a row that allows nothing gets NaNs here; the mask below turns them into -inf
            log_probs = log_probs.masked_fill(~allowed, -torch.inf).log_softmax(dim=-1)
        candidates = torch.where(allowed, scores.view(-1, 1) + log_probs, -torch.inf).view(n_users, -1)
        width = min(top_n if last else beam_width, candidates.shape[1])
        scores, picked = candidates.topk(width, dim=1)
        nodes = children.view(n_users, -1).gather(1, picked).view(-1)
        if not last:
            rows = (torch.arange(n_users, device=device)[:, None] * beams + picked // size).view(-1)
            logits, state = model.step(trie.token_ids[level][picked % size].view(-1), rows, state)
    return nodes.view(n_users, -1), scores


def search(
    model: StepModel,
    trie: Trie,
    prompts: Sequence[Sequence[int]],
    top_n: int,
    beam_width: int | None = None,
    exclude: Sequence[Collection[str]] | None = None,
    batch_size: int = 32,
    pad_id: int = 0,
    progress: bool = True,
    renormalize: bool = False,
) -> list[list[tuple[str, float]]]:
    """Per prompt (token ids), the top `top_n` distinct active ads with their scores, best first.

    `beam_width` (at least, and by default, `top_n`) may be larger for a better search; `exclude[i]` are ads
    prompt i must not get (e.g. already seen). Lists are shorter where fewer valid ads exist."""
    beam_width = max(beam_width or top_n, top_n)
    # similar lengths share a batch, so little compute goes to padding
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[list[tuple[str, float]]] = [[] for _ in prompts]
    with tqdm(total=len(prompts), desc="beam search", unit="user", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            input_ids, attention_mask = left_pad([prompts[i] for i in chunk], pad_id)
            excluded = None if exclude is None else exclusion_keys(trie, [exclude[i] for i in chunk])
            leaves, scores = search_batch(model, trie, input_ids, attention_mask, top_n, beam_width, excluded, renormalize)
            ads, scores = trie.ads_at(leaves), scores.cpu()  # the batch's answers come to the host at once
            for i, user_ads, user_scores in zip(chunk, ads, scores):
                valid = torch.isfinite(user_scores)
                results[i] = list(zip(user_ads[valid.numpy()].tolist(), user_scores[valid].tolist()))
            bar.update(len(chunk))
    return results


def exclusion_keys(trie: Trie, exclude: Sequence[Collection[str]]) -> torch.Tensor:
    """The `excluded` argument of `search_batch`: one key per (user in the batch, excluded ad the trie holds), on
    the trie's device (gathered on the host, so the batch's ads cross once)."""
    held = [[ad for ad in ads if ad in trie.row_of] for ads in exclude]
    users = torch.arange(len(held)).repeat_interleave(torch.tensor([len(ads) for ads in held], dtype=torch.long))
    return users.to(trie.device) * len(trie) + trie.leaves_of(ad for ads in held for ad in ads)
