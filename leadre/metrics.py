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
- list_length: the mean length of the users' lists as ranked (after dropping invalid and, when excluded, seen
  ads); a recaller asked for max(KS) ads should hand back that many wherever the catalogue allows.

Two variants: `seen_excluded` (the headline: the usual full-ranking protocol) removes the user's history
(positive ad interactions before the target) from the ranking; `seen_kept` ranks everything. A target that
already occurs in the history is unreachable when seen ads are excluded: it counts as a miss, as in the standard
protocol (and the evaluator enforces the exclusion even if a recaller ignores it).

Uncertainty: `rank_intervals` gives bootstrap-over-users confidence intervals of Recall@K and NDCG@K, and
`bootstrap_gain` the paired bootstrap of one model's gain over another on the same users (the promotion gate's
test); `user_metric` gives the per-user values both are means of.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pandas as pd

from leadre.split import Split

KS = (1, 5, 10, 20, 50)
VARIANTS = ("seen_excluded", "seen_kept")  # the headline variant first


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


def hits_at(ranks: np.ndarray, k: int) -> np.ndarray:
    """Per user: 1.0 if the target is in the top k, else 0.0 (recall@k is their mean)."""
    return ((ranks >= 0) & (ranks < k)).astype(np.float64)


def gains_at(ranks: np.ndarray, k: int) -> np.ndarray:
    """Per user: 1 / log2(rank + 2) for a target in the top k, else 0 (NDCG@k is their mean)."""
    return np.where((ranks >= 0) & (ranks < k), 1.0 / np.log2(np.maximum(ranks, 0) + 2), 0.0)


def user_ecpm_at(ranked: np.ndarray, ecpm: np.ndarray, k: int) -> np.ndarray:
    """Per user: the mean eCPM of the ads in their top k; NaN for a user with none."""
    top = ranked[:, :k]
    present = top >= 0
    n = present.sum(axis=1)
    total = np.where(present, ecpm[np.maximum(top, 0)], 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, total / np.maximum(n, 1), np.nan)


def recall_at(ranks: np.ndarray, k: int) -> float:
    return _mean(hits_at(ranks, k))


def ndcg_at(ranks: np.ndarray, k: int) -> float:
    return _mean(gains_at(ranks, k))


def ecpm_at(ranked: np.ndarray, ecpm: np.ndarray, k: int) -> float:
    values = user_ecpm_at(ranked, ecpm, k)
    return _mean(values[~np.isnan(values)])


def coverage_at(ranked: np.ndarray, catalogue_size: int, k: int) -> float:
    top = ranked[:, :k]
    return np.count_nonzero(np.bincount(top[top >= 0])) / catalogue_size if catalogue_size else 0.0


def _servable(codes: np.ndarray, catalogue: Catalogue) -> np.ndarray:
    servable = codes >= 0
    servable[servable] = catalogue.active[codes[servable]]
    return servable


def invalid_id_rate(generated: Sequence[Sequence[str | None]], catalogue: Catalogue) -> float:
    return _mean(~_servable(encode_lists(generated, catalogue)[1], catalogue))


@dataclass(frozen=True)
class Ranked:
    """Users' lists as the metrics see them: the ad indices of each list without invalid IDs (and without seen ads
    in the `seen_excluded` variant), best first, -1 padded; each user's target rank in it (-1: absent)."""

    matrix: np.ndarray  # (users, longest list)
    ranks: np.ndarray  # (users,)
    invalid_id_rate: float

    @property
    def lengths(self) -> np.ndarray:
        return (self.matrix >= 0).sum(axis=1)


def rank_lists(
    ranked: Sequence[Sequence[str | None]],
    targets: Sequence[str],
    catalogue: Catalogue,
    seen: Sequence[Collection[str]] | None = None,
) -> Ranked:
    """Per-user ranked lists (raw recaller output) against their targets; `seen[u]`, when given, is removed from
    user u's list first (the `seen_excluded` variant)."""
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
    return Ranked(matrix, target_ranks(matrix, catalogue.codes(list(targets))), _mean(~servable))


def summarize(r: Ranked, catalogue: Catalogue, ks: Sequence[int] = KS) -> dict[str, float]:
    """Every metric of the module docstring."""
    n_active = int(catalogue.active.sum())
    metrics = {f"recall@{k}": recall_at(r.ranks, k) for k in ks}
    metrics |= {f"ndcg@{k}": ndcg_at(r.ranks, k) for k in ks}
    metrics |= {f"ecpm@{k}": ecpm_at(r.matrix, catalogue.ecpm, k) for k in ks}
    metrics |= {f"coverage@{k}": coverage_at(r.matrix, n_active, k) for k in ks}
    metrics["invalid_id_rate"] = r.invalid_id_rate
    metrics["list_length"] = _mean(r.lengths)
    metrics["users"] = len(r.ranks)
    return metrics


def recall_metrics(
    ranked: Sequence[Sequence[str | None]],
    targets: Sequence[str],
    catalogue: Catalogue,
    ks: Sequence[int] = KS,
    seen: Sequence[Collection[str]] | None = None,
) -> dict[str, float]:
    """Every metric of the module docstring for per-user ranked lists (raw recaller output) and targets;
    `seen[u]`, when given, is removed from user u's list first (the `seen_excluded` variant)."""
    return summarize(rank_lists(ranked, targets, catalogue, seen), catalogue, ks)


def user_values(r: Ranked, catalogue: Catalogue, ks: Sequence[int] = KS) -> dict[str, np.ndarray]:
    """What per-user metrics need, one array per column: the target `rank`, the list `length` and `ecpm@K`."""
    return {"rank": r.ranks, "length": r.lengths} | {f"ecpm@{k}": user_ecpm_at(r.matrix, catalogue.ecpm, k) for k in ks}


def parse_user_metric(metric: str) -> tuple[str, int]:
    """(name, K) of a metric that is a mean over users: recall@K, ndcg@K or ecpm@K; ValueError for any other."""
    name, _, k = metric.partition("@")
    if not k.isdigit() or name not in ("recall", "ndcg", "ecpm"):
        raise ValueError(f"metric {metric!r}: per-user values exist for recall@K, ndcg@K and ecpm@K only")
    return name, int(k)


def user_metric(values: pd.DataFrame | dict[str, np.ndarray], metric: str) -> np.ndarray:
    """Per-user values of a mean-over-users metric (recall@K, ndcg@K, ecpm@K) from `user_values` columns; NaN
    where a user has no value (eCPM of an empty list)."""
    name, k = parse_user_metric(metric)
    if name == "ecpm":
        if metric not in values:
            raise ValueError(f"metric {metric!r}: no per-user column (evaluated at other K)")
        return np.asarray(values[metric], dtype=np.float64)
    ranks = np.asarray(values["rank"])
    return hits_at(ranks, k) if name == "recall" else gains_at(ranks, k)


def confidence_interval(samples: np.ndarray, confidence: float) -> list[float]:
    """The central `confidence` interval [low, high] of bootstrap samples (NaN samples left out)."""
    tail = (1.0 - confidence) / 2
    low, high = np.nanquantile(samples, [tail, 1.0 - tail])
    return [float(low), float(high)]


def rank_intervals(ranks: np.ndarray, ks: Sequence[int] = KS, confidence: float = 0.95, resamples: int = 2000,
                   seed: int = 0) -> dict[str, list[float]]:
    """Bootstrap-over-users `confidence` intervals [low, high] of recall@K and ndcg@K.

    Both are means over users of a function of the user's target rank, so drawing users with replacement is
    drawing ranks: a multinomial draw over the histogram of ranks is the same bootstrap, exact, at a cost that
    does not grow with the number of users."""
    if len(ranks) == 0:
        return {}
    values, counts = np.unique(ranks, return_counts=True)
    shares = np.random.default_rng(seed).multinomial(len(ranks), counts / len(ranks), size=resamples) / len(ranks)
    intervals = {}
    for name, per_rank in (("recall", hits_at), ("ndcg", gains_at)):
        intervals |= {f"{name}@{k}": confidence_interval(shares @ per_rank(values, k), confidence) for k in ks}
    return intervals


def bootstrap_gain(candidate: np.ndarray, current: np.ndarray, relative: bool = False, resamples: int = 2000,
                   seed: int = 0) -> tuple[float, np.ndarray]:
    """The gain of `candidate` over `current`, per-user values of the same users in the same order (NaN: no value,
    left out of that side's mean), and its paired bootstrap: users drawn with replacement, both sides together.
    The gain is the difference of the means, or with `relative` their ratio minus one. Returns (gain, samples)."""
    if candidate.shape != current.shape or candidate.ndim != 1 or len(candidate) == 0:
        raise ValueError(f"paired values: expected two equal non-empty vectors, got {candidate.shape} and {current.shape}")

    def gain(c: np.ndarray, o: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN samples: NaN, dropped by the quantiles
            new, old = np.nanmean(c, axis=-1), np.nanmean(o, axis=-1)
            return (new - old) / old if relative else new - old

    rng = np.random.default_rng(seed)
    n = len(candidate)
    chunk = max(1, 4_000_000 // n)  # resamples drawn together: a few million indices at a time
    samples = []
    for start in range(0, resamples, chunk):
        users = rng.integers(n, size=(min(chunk, resamples - start), n))
        samples.append(gain(candidate[users], current[users]))
    return float(gain(candidate, current)), np.concatenate(samples)


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
    ranked = rank_recaller(recaller, histories, targets, catalogue, max(ks), variants, batch_size, inputs)
    return {variant: summarize(r, catalogue, ks) for variant, r in ranked.items()}


def rank_recaller(
    recaller: Recaller,
    histories: Sequence[Sequence[str]],
    targets: Sequence[str],
    catalogue: Catalogue,
    n: int = max(KS),
    variants: Sequence[str] = VARIANTS,
    batch_size: int = 256,
    inputs: Sequence[Any] | None = None,
) -> dict[str, Ranked]:
    """{variant: `Ranked`} for `recaller` asked for its top `n` ads per user (see `evaluate_recaller`)."""
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
            ranked += recaller(inputs[batch], n, seen[batch] if seen else None).ad_ids
        results[variant] = rank_lists(ranked, targets, catalogue, seen)
    return results
