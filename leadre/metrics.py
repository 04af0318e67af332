"""Offline recall metrics (DESIGN §3, §4 step 6) and the leave-one-out evaluation of any recaller.

Protocol: per user, one target (the validation or test positive of `leadre.split`), a ranked list of ads from
the recaller (best first, full ranking over the catalogue), and metrics at K in `KS`:

- recall@K: the share of users whose target is in their top K (one target per user, so recall = hit rate).
- NDCG@K: 1 / log2(rank + 2) for a target at 0-based rank < K, else 0; averaged over users.
- eCPM@K: per user, the mean eCPM of the ads in their top K (hit or not), averaged over the users with at least
  one ad there (0 when no user has one). It is the value of what recall hands to ranking: the quantity DPO tilts
  toward and the promotion gate guards.
- coverage@K: distinct ads in anyone's top K / active ads in the catalogue.
- invalid_id_rate: generated IDs that name no ad or an inactive ad / all generated IDs. Invalid IDs are then
  dropped from the ranking (serving drops them too), so the valid ones behind them move up.

Two variants: `seen_kept` ranks everything; `seen_excluded` removes the user's history (positive ad interactions
before the target) from the ranking. A target that already occurs in the history is then unreachable: it counts
as a miss, as in the standard protocol (and the evaluator enforces the exclusion even if a recaller ignores it).
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pandas as pd

from leadre.split import Split

KS = (1, 5, 10, 20, 50)
VARIANTS = ("seen_kept", "seen_excluded")


@dataclass(frozen=True)
class Catalogue:
    """Ads by index: the id, eCPM and active flag of ad `i` are `ids[i]`, `ecpm[i]`, `active[i]`."""

    ids: pd.Index
    ecpm: np.ndarray
    active: np.ndarray

    @classmethod
    def from_ads(cls, ads: pd.DataFrame) -> Catalogue:
        return cls(ids=pd.Index(ads["ad_id"].astype(str).to_numpy(dtype=object)),
                   ecpm=ads["ecpm"].to_numpy(dtype=np.float64), active=ads["active"].to_numpy(dtype=bool))

    def codes(self, ad_ids: Sequence[str | None] | np.ndarray) -> np.ndarray:
        """Ad index of each id; -1 for None and ids that name no ad."""
        return self.ids.get_indexer(np.asarray(ad_ids, dtype=object))


@dataclass(frozen=True)
class Recalled:
    """One batch of recall lists, best first; `ad_ids[u][i]` is None where a generated ID names no ad."""

    ad_ids: list[Sequence[str | None]]
    scores: list[Sequence[float]]


class Recaller(Protocol):
    """What every recaller offers (baselines, the LLM): per user an input (the baselines read the time-ordered
    positive ad history; an LLM wrapper may read a prompt), the top `n` ads out; `exclude[u]` are ads user u must
    not get (None: exclude nothing)."""

    def __call__(self, histories: Sequence[Any], n: int,
                 exclude: Sequence[Collection[str]] | None = None) -> Recalled: ...


def encode_lists(lists: Sequence[Collection[str | None]], catalogue: Catalogue) -> tuple[np.ndarray, np.ndarray]:
    """(row, ad index) of every entry of every list, in order; index -1 where the id names no ad."""
    lengths = np.fromiter((len(x) for x in lists), dtype=np.int64, count=len(lists))
    flat = np.fromiter(itertools.chain.from_iterable(lists), dtype=object, count=int(lengths.sum()))
    return np.repeat(np.arange(len(lists)), lengths), catalogue.codes(flat)


def _pad(rows: np.ndarray, codes: np.ndarray, n_rows: int) -> np.ndarray:
    """Ragged rows (non-decreasing `rows`) as an (n_rows, longest) matrix padded with -1; at least one column,
    so that row-wise argmax works when every list is empty."""
    counts = np.bincount(rows, minlength=n_rows)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    matrix = np.full((n_rows, max(int(counts.max(initial=0)), 1)), -1, dtype=np.int64)
    matrix[rows, np.arange(len(rows)) - starts[rows]] = codes
    return matrix


def target_ranks(ranked: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """0-based rank of each user's target in their row of `ranked` (ad indices, -1 padded); -1 if absent."""
    hits = (ranked == targets[:, None]) & (ranked >= 0)
    return np.where(hits.any(axis=1), hits.argmax(axis=1), -1)


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else 0.0


def recall_at(ranks: np.ndarray, k: int) -> float:
    return _mean((ranks >= 0) & (ranks < k))


def ndcg_at(ranks: np.ndarray, k: int) -> float:
    hit = (ranks >= 0) & (ranks < k)
    return _mean(np.where(hit, 1.0 / np.log2(np.maximum(ranks, 0) + 2), 0.0))


def ecpm_at(ranked: np.ndarray, ecpm: np.ndarray, k: int) -> float:
    top = ranked[:, :k]
    present = top >= 0
    n = present.sum(axis=1)
    total = np.where(present, ecpm[np.maximum(top, 0)], 0.0).sum(axis=1)
    return _mean(total[n > 0] / n[n > 0])


def coverage_at(ranked: np.ndarray, catalogue_size: int, k: int) -> float:
    top = ranked[:, :k]
    return np.count_nonzero(np.bincount(top[top >= 0])) / catalogue_size if catalogue_size else 0.0


def _servable(codes: np.ndarray, catalogue: Catalogue) -> np.ndarray:
    servable = codes >= 0
    servable[servable] = catalogue.active[codes[servable]]
    return servable


def invalid_id_rate(generated: Sequence[Sequence[str | None]], catalogue: Catalogue) -> float:
    return _mean(~_servable(encode_lists(generated, catalogue)[1], catalogue))


def recall_metrics(
    ranked: Sequence[Sequence[str | None]],
    targets: Sequence[str],
    catalogue: Catalogue,
    ks: Sequence[int] = KS,
    seen: Sequence[Collection[str]] | None = None,
) -> dict[str, float]:
    """Every metric of the module docstring for per-user ranked lists (raw recaller output) and targets;
    `seen[u]`, when given, is removed from user u's list first (the `seen_excluded` variant)."""
    rows, codes = encode_lists(ranked, catalogue)
    servable = _servable(codes, catalogue)
    keep = servable.copy()
    if seen is not None:
        seen_rows, seen_codes = encode_lists(seen, catalogue)
        known = seen_codes >= 0
        n_ads = len(catalogue.ids)
        # pandas hashes; np.isin sorts and is several times slower at 100k users × 50
        keep &= ~pd.Series(rows * n_ads + codes).isin(seen_rows[known] * n_ads + seen_codes[known]).to_numpy()
    matrix = _pad(rows[keep], codes[keep], len(ranked))
    ranks = target_ranks(matrix, catalogue.codes(list(targets)))
    n_active = int(catalogue.active.sum())
    metrics = {f"recall@{k}": recall_at(ranks, k) for k in ks}
    metrics |= {f"ndcg@{k}": ndcg_at(ranks, k) for k in ks}
    metrics |= {f"ecpm@{k}": ecpm_at(matrix, catalogue.ecpm, k) for k in ks}
    metrics |= {f"coverage@{k}": coverage_at(matrix, n_active, k) for k in ks}
    metrics["invalid_id_rate"] = _mean(~servable)
    metrics["users"] = len(ranked)
    return metrics


def user_histories(split: Split, which: str) -> tuple[pd.DataFrame, list[list[str]]]:
    """The `which` targets and, aligned with them, each user's positive ad ids before the target, in time order."""
    targets = split.targets(which)
    before = split.before(which)
    positives = before[before["positive"].to_numpy()]
    users = pd.Index(targets["user_id"]).get_indexer(positives["user_id"])
    evaluated = users >= 0  # the validation cut keeps whole timelines of users who are not evaluated
    users, items = users[evaluated], positives["item_id"].to_numpy(dtype=object)[evaluated]
    order = np.argsort(users, kind="stable")  # stable: keeps each user's time order
    bounds = np.cumsum(np.bincount(users, minlength=len(targets)))[:-1]
    return targets, [h.tolist() for h in np.split(items[order], bounds)]


def evaluate_recaller(
    recaller: Recaller,
    histories: Sequence[Sequence[str]],
    targets: Sequence[str],
    catalogue: Catalogue,
    ks: Sequence[int] = KS,
    variants: Sequence[str] = VARIANTS,
    batch_size: int = 256,
    inputs: Sequence[Any] | None = None,
) -> dict[str, dict[str, float]]:
    """{variant: metrics} for `recaller` asked for the top max(ks) ads per user; on a split:

        targets, histories = user_histories(split, "test")
        evaluate_recaller(recaller, histories, targets["ad_id"].tolist(), catalogue)

    (computed once per split for all models; slice both alike to evaluate a sample of users). The recaller reads
    `inputs[u]` (e.g. prompts; default: the histories); the histories define what the user has already seen."""
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise ValueError(f"variants {sorted(unknown)}: expected some of {VARIANTS}")
    inputs = histories if inputs is None else inputs
    if not len(histories) == len(targets) == len(inputs):
        raise ValueError(f"{len(histories)} histories, {len(targets)} targets and {len(inputs)} inputs: one each per user")
    results = {}
    for variant in variants:
        seen = [set(h) for h in histories] if variant == "seen_excluded" else None
        ranked: list[Sequence[str | None]] = []
        for start in range(0, len(histories), batch_size):
            batch = slice(start, start + batch_size)
            ranked += recaller(inputs[batch], max(ks), seen[batch] if seen else None).ad_ids
        results[variant] = recall_metrics(ranked, targets, catalogue, ks, seen)
    return results
