"""Semantic IDs for ads (DESIGN §4 step 2): residual k-means over ad vectors, then a collision level.

An ad's vector is its text embedding, optionally blended with a behaviour embedding (item co-occurrence among
training positives) because text alone knows nothing about what users consume together (DESIGN §8). Residual
k-means (RQ-KMeans) quantises the vectors into L levels of K codes (`quantizer: tree` instead splits each code by
its own k-means, see `tree_kmeans`); a last level numbers the ads that share all L codes (0, 1, 2, ... per bucket)
so that every ad's S-ID is unique. The codebooks are frozen in the artifact:
`assign_sids` gives new ads S-IDs from them without retraining.

Artifact (`sids build` / `sids assign`): `sids.parquet` (see `leadre.sid`), `codebooks.safetensors` (per level
the centroids and each centroid's parent row in the level above, -1 where the codebook is shared; the metadata
says how vectors are made), `stats.json`, `manifest.json`.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from safetensors import safe_open
from safetensors.numpy import save_file
from scipy.sparse.linalg import svds

from leadre.artifacts import read_manifest, write_artifact
from leadre.embed import Encoder, MiniLMEncoder, ad_texts, embed_texts
from leadre.loaders import read_table
from leadre.schema import ID_COLUMN, TEXT_COLUMNS, DataError, read_data_dir, split_settings_of
from leadre.sid import LEVEL_LETTERS, SidTable, load_sid_table
from leadre.split import Split

log = logging.getLogger(__name__)

DEFAULT_LEVELS = 3
DEFAULT_CODES = 256
# Measured on MovieLens-1M and the synthetic marketplace: 0.3 roughly doubles how often a user's next ad shares the
# first-level code of the previous one (0.13 → 0.23 and 0.10 → 0.53) at the price of more collisions before the last
# level (15% → 27%, 49% → 68%); higher weights add little and leave ads without behaviour colliding far more often.
DEFAULT_BEHAVIOUR_WEIGHT = 0.3
CODEBOOKS = "codebooks.safetensors"
STATS = "stats.json"
SID_STEPS = ("sids build", "sids assign")
AD_COLUMNS = (ID_COLUMN["ads"], *TEXT_COLUMNS["ads"])
# Rows of the distance matrix computed at once: bounds memory at ~64 MiB for K = 256 whatever the catalogue size.
_CHUNK = 65536


@dataclass(frozen=True)
class SidSettings:
    """The `sids` section of a config file: `build_sids`'s settings."""

    levels: int = DEFAULT_LEVELS
    codes: int = DEFAULT_CODES
    seed: int = 0
    iters: int = 25
    behaviour_weight: float = DEFAULT_BEHAVIOUR_WEIGHT
    behaviour_dim: int = 64
    window: int = 5
    quantizer: str = "residual"  # residual: one codebook per level; tree: one per code of the level above

    def __post_init__(self) -> None:
        _check_parameters(self.levels, self.codes, self.behaviour_weight, self.behaviour_dim, self.window, self.iters,
                          self.quantizer)


# ---------------------------------------------------------------------------------------------------- k-means / RQ

def effective_codes(n_ads: int, codes: int) -> int:
    """Codes per level for a catalogue of `n_ads`: min(codes, ceil(sqrt(n_ads))).

    With K ≈ sqrt(N) two levels can already address every ad, so the first level groups ~sqrt(N) similar ads per
    code and the deeper levels (and the collision level) separate them; a larger K would spread a small catalogue
    over tokens that the LLM then sees too rarely to learn. MovieLens-1M (3.9k movies) gets 63, 65k+ ads get 256.
    """
    return max(1, min(codes, math.ceil(math.sqrt(n_ads))))


def _nearest(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(index of the nearest centroid, squared distance to it) for each row of x."""
    c_sq = (centroids * centroids).sum(1)
    index = np.empty(len(x), dtype=np.int64)
    dist = np.empty(len(x), dtype=np.float32)
    for start in range(0, len(x), _CHUNK):
        xs = x[start:start + _CHUNK]
        d = (xs * xs).sum(1)[:, None] - 2.0 * (xs @ centroids.T) + c_sq[None, :]
        index[start:start + _CHUNK] = d.argmin(1)
        dist[start:start + _CHUNK] = np.maximum(d[np.arange(len(xs)), index[start:start + _CHUNK]], 0.0)
    return index, dist


def _kmeans_pp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    centroids = np.empty((k, x.shape[1]), dtype=x.dtype)
    centroids[0] = x[rng.integers(len(x))]
    dist = ((x - centroids[0]) ** 2).sum(1, dtype=np.float64)
    for i in range(1, k):
        cumulative = np.cumsum(dist)
        # All points already sit on a centroid (fewer distinct points than k): any point will do.
        if cumulative[-1] <= 0:
            pick = rng.integers(len(x))
        else:
            pick = min(int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right")), len(x) - 1)
        centroids[i] = x[pick]
        dist = np.minimum(dist, ((x - centroids[i]) ** 2).sum(1, dtype=np.float64))
    return centroids


def kmeans(x: np.ndarray, k: int, seed: int = 0, iters: int = 25) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means with k-means++ init: (centroids (k, D), assignment (N,)). Deterministic by seed.

    A cluster that empties is re-seeded with the point farthest from its centroid, so all k codes stay in use
    while there are at least k distinct points.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not 1 <= k <= len(x):
        raise ValueError(f"k-means: k={k} must be between 1 and the number of points ({len(x)})")
    centroids = _kmeans_pp(x, k, np.random.default_rng(seed))
    previous = None
    for _ in range(iters):
        assign, dist = _nearest(x, centroids)
        if previous is not None and np.array_equal(assign, previous):
            return centroids, assign
        counts = np.bincount(assign, minlength=k)
        sums = sp.csr_matrix((np.ones(len(x), dtype=np.float32), (assign, np.arange(len(x)))), shape=(k, len(x))) @ x
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None]
        empty = np.flatnonzero(~filled)
        if len(empty):
            centroids[empty] = x[np.argsort(-dist, kind="stable")[:len(empty)]]
        previous = assign
    return centroids, _nearest(x, centroids)[0]


# A level's codebook is (centroids (M, D), parent (M,)): parent -1 marks a codebook shared by every node of the level
# above (residual k-means); otherwise parent[j] is the row of the level above whose members centroid j splits (tree
# k-means), and a code is the index among its parent's centroids. One representation, one `quantize`, for both.
Codebook = tuple[np.ndarray, np.ndarray]


def residual_kmeans(x: np.ndarray, levels: int, k: int, seed: int = 0, iters: int = 25) -> tuple[list[Codebook], np.ndarray]:
    """RQ-KMeans: k-means on x, then on what each level leaves unexplained. (codebooks, codes (N, levels))."""
    residual = np.array(x, dtype=np.float32)
    codebooks, codes = [], []
    for level in range(levels):
        centroids, assign = kmeans(residual, k, seed + level, iters)
        residual -= centroids[assign]
        codebooks.append((centroids, np.full(k, -1, dtype=np.int64)))
        codes.append(assign)
    return codebooks, np.stack(codes, axis=1)


def tree_kmeans(x: np.ndarray, levels: int, k: int, seed: int = 0, iters: int = 25) -> tuple[list[Codebook], np.ndarray]:
    """Hierarchical k-means: each code of a level is split by its own k-means (min(k, members) codes) on its members'
    residuals, so a deeper code means something only under its parent. With a shared codebook (residual k-means)
    two levels of K codes address far fewer than K² groups of a small catalogue; per-parent codebooks use them all.
    """
    residual = np.array(x, dtype=np.float32)
    centroids, node = kmeans(residual, k, seed, iters)
    residual -= centroids[node]
    codebooks, codes = [(centroids, np.full(k, -1, dtype=np.int64))], [node]
    for level in range(1, levels):
        level_centroids, parents = [], []
        code, child = np.empty(len(x), dtype=np.int64), np.empty(len(x), dtype=np.int64)
        for parent in np.unique(node):
            members = np.flatnonzero(node == parent)
            centroids, assign = kmeans(residual[members], min(k, len(members)), seed + level, iters)
            code[members], child[members] = assign, len(parents) + assign  # child: the row in this level's codebook
            residual[members] -= centroids[assign]
            level_centroids.append(centroids)
            parents += [parent] * len(centroids)
        codebooks.append((np.concatenate(level_centroids), np.array(parents, dtype=np.int64)))
        codes.append(code)
        node = child
    return codebooks, np.stack(codes, axis=1)


QUANTIZERS = {"residual": residual_kmeans, "tree": tree_kmeans}  # the `sids.quantizer` setting


def quantize(x: np.ndarray, codebooks: list[Codebook]) -> np.ndarray:
    """Codes of vectors under frozen codebooks: per level, the nearest centroid among those of the vector's parent
    (all of them where the level's codebook is shared), on the residuals."""
    residual = np.array(x, dtype=np.float32)
    node = np.zeros(len(x), dtype=np.int64)  # the row each vector took in the level above
    codes = []
    for level, (centroids, parent) in enumerate(codebooks):
        code, chosen = np.full(len(x), -1, dtype=np.int64), np.empty(len(x), dtype=np.int64)
        for owner in np.unique(parent):
            candidates = np.flatnonzero(parent == owner)
            rows = np.arange(len(x)) if owner < 0 else np.flatnonzero(node == owner)
            if len(rows):
                code[rows] = _nearest(residual[rows], centroids[candidates])[0]
                chosen[rows] = candidates[code[rows]]
        if (code < 0).any():
            raise ValueError(f"codebooks: level {level} has no centroid under the level-{level - 1} code of "
                             f"{int((code < 0).sum())} vectors (a corrupt codebook file)")
        residual -= centroids[chosen]
        node = chosen
        codes.append(code)
    return np.stack(codes, axis=1)


def separate_collisions(prefix: np.ndarray, taken: np.ndarray | None = None,
                        priority: np.ndarray | None = None) -> np.ndarray:
    """The last level: ads sharing a code tuple get 0, 1, 2, ... by descending `priority` (ties, and without a
    priority: row order). Numbering by training popularity gives the last token a meaning the model can learn
    (0 is the ad of the bucket that users engage with most) instead of an arbitrary one.

    `taken` holds full S-IDs (prefix + last code) already given out: new ads continue after the largest last code
    in their bucket, so they never collide with existing ads.
    """
    columns = list(range(prefix.shape[1]))
    order = np.arange(len(prefix)) if priority is None else np.argsort(-np.asarray(priority), kind="stable")
    new = pd.DataFrame(prefix)
    last = np.empty(len(prefix), dtype=np.int64)
    last[order] = new.iloc[order].groupby(columns, sort=False).cumcount().to_numpy(dtype=np.int64)
    if taken is not None and len(taken):
        old = pd.DataFrame(taken[:, :-1])
        old["next"] = taken[:, -1] + 1
        start = old.groupby(columns, sort=False)["next"].max().reset_index()
        last += new.merge(start, on=columns, how="left")["next"].fillna(0).to_numpy(dtype=np.int64)
    return last


# ------------------------------------------------------------------------------------------------------- behaviour

def cooccurrence_embedding(users: np.ndarray, items: np.ndarray, n_items: int, dim: int = 64, window: int = 5,
                           seed: int = 0) -> np.ndarray:
    """Item vectors (n_items, dim) from a truncated SVD of the PPMI item-item matrix; rows L2-normalised.

    `users` and `items` (item indices) are positive interactions grouped by user, each user's in time order; two
    items co-occur when at most `window` positions apart. Context counts are smoothed (power 0.75) as in word2vec,
    which keeps rare items from dominating PMI. Items that never co-occur get zero rows.
    """
    a, b = [], []
    for offset in range(1, window + 1):
        same = (users[offset:] == users[:-offset]) & (items[offset:] != items[:-offset])
        a.append(items[:-offset][same])
        b.append(items[offset:][same])
    rows, cols = np.concatenate(a + b), np.concatenate(b + a)
    out = np.zeros((n_items, dim), dtype=np.float32)
    if len(rows) == 0:
        return out
    counts = sp.coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n_items, n_items)).tocsr()
    counts.sum_duplicates()
    row_sum = np.asarray(counts.sum(1)).ravel()
    context = row_sum ** 0.75
    coo = counts.tocoo()
    pmi = np.log(coo.data * context.sum() / (row_sum[coo.row] * context[coo.col]))
    keep = pmi > 0
    ppmi = sp.csr_matrix((pmi[keep], (coo.row[keep], coo.col[keep])), shape=(n_items, n_items))
    k = min(dim, n_items - 2)
    if k < 1:
        return out
    if n_items <= 2000:  # small: the exact dense SVD is cheaper than ARPACK and has no lower bound on n_items
        u, s, _ = np.linalg.svd(ppmi.toarray())
    else:
        u, s, _ = svds(ppmi, k=k, random_state=seed)
        order = np.argsort(-s)
        u, s = u[:, order], s[order]
    vectors = u[:, :k] * np.sqrt(s[:k])
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    out[:, :k] = np.where(norms > 1e-9, vectors / np.maximum(norms, 1e-9), 0.0)
    return out


def blend(text: np.ndarray, behaviour: np.ndarray | None, weight: float) -> np.ndarray:
    """[sqrt(1-w)·text, sqrt(w)·behaviour]: for unit parts, the dot product is (1-w)·text cos + w·behaviour cos.

    Rows without behaviour (zeros) keep only their text part, which is how new ads are treated by `assign_sids`.
    """
    if behaviour is None or weight == 0:
        return np.asarray(text, dtype=np.float32)
    return np.hstack([math.sqrt(1 - weight) * text, math.sqrt(weight) * behaviour]).astype(np.float32)


def behaviour_vectors(split_events: pd.DataFrame, ad_ids: pd.Index, dim: int, window: int, seed: int) -> np.ndarray:
    """`cooccurrence_embedding` over training positives (`Split.train_targets()`), rows in `ad_ids` order."""
    users = pd.factorize(split_events["user_id"])[0]
    items = ad_ids.get_indexer(split_events["item_id"])
    known = items >= 0
    return cooccurrence_embedding(users[known], items[known], len(ad_ids), dim, window, seed)


# ----------------------------------------------------------------------------------------------------------- stats

def _first_code_cosines(text: np.ndarray, first: np.ndarray) -> tuple[float, float]:
    """(mean cosine of pairs sharing a first-level code, mean cosine of all pairs), exact from cluster sums."""
    n = len(text)
    self_dots = (text * text).sum(1)
    sums = sp.csr_matrix((np.ones(n), (first, np.arange(n))), shape=(int(first.max()) + 1, n)) @ text
    sizes = np.bincount(first)
    same_pairs = float((sizes * (sizes - 1)).sum())
    same = (float((sums * sums).sum()) - float(self_dots.sum())) / same_pairs if same_pairs else float("nan")
    total = text.sum(0)
    every = (float(total @ total) - float(self_dots.sum())) / (n * (n - 1)) if n > 1 else float("nan")
    return same, every


def sid_stats(codes: np.ndarray, level_sizes: list[int], text: np.ndarray | None = None) -> dict[str, Any]:
    """Collision rate before the last level, code usage per level, largest bucket and (with text) a sanity score:
    mean text cosine of ad pairs sharing a first-level code against that of all pairs."""
    n, levels = len(codes), len(level_sizes) - 1
    prefix = pd.DataFrame(codes[:, :levels])
    usage = []
    for level in range(levels + 1):
        counts = np.bincount(codes[:, level], minlength=level_sizes[level])
        p = counts[counts > 0] / n
        entropy = float(-(p * np.log2(p)).sum())
        usage.append({"level": LEVEL_LETTERS[level], "size": int(level_sizes[level]), "used": int((counts > 0).sum()),
                      "usage": round(float((counts > 0).mean()), 4), "entropy_bits": round(entropy, 3),
                      "perplexity": round(2 ** entropy, 1), "largest_share": round(float(counts.max() / n), 4)})
    stats: dict[str, Any] = {
        "ads": n,
        "collision_rate": round(float(prefix.duplicated(keep=False).mean()), 4),
        "distinct_prefixes": int(len(prefix.drop_duplicates())),
        "largest_bucket": int(codes[:, -1].max()) + 1,
        "code_usage": usage,
    }
    if text is not None:
        same, every = _first_code_cosines(text.astype(np.float64), codes[:, 0])
        stats["sanity"] = {"same_first_code_cosine": round(same, 4), "random_pair_cosine": round(every, 4),
                           "gap": round(same - every, 4)}
    return stats


def next_ad_first_code(split: Split, ad_ids: pd.Index, first: np.ndarray) -> dict[str, float]:
    """How often a user's validation target shares its first-level code with the user's previous positive, and
    that rate by chance: a cheap proxy for how much the first S-ID token follows behaviour."""
    previous = split.train_targets().groupby("user_id", sort=False).tail(1)[["user_id", "item_id"]]
    pairs = split.targets("validation").merge(previous, on="user_id")
    if pairs.empty:
        return {"pairs": 0}
    a = first[ad_ids.get_indexer(pairs["item_id"])]
    b = first[ad_ids.get_indexer(pairs["ad_id"])]
    size = int(first.max()) + 1
    chance = float(np.bincount(a, minlength=size) @ np.bincount(b, minlength=size)) / len(pairs) ** 2
    rate = float((a == b).mean())
    return {"pairs": int(len(pairs)), "rate": round(rate, 4), "chance": round(chance, 4),
            "lift": round(rate / chance, 2) if chance else float("nan")}


# ------------------------------------------------------------------------------------------------- build / assign

def _check_parameters(levels: int, codes: int, behaviour_weight: float, behaviour_dim: int, window: int,
                      iters: int, quantizer: str) -> None:
    if quantizer not in QUANTIZERS:
        raise ValueError(f"quantizer must be one of {', '.join(QUANTIZERS)}, got {quantizer!r}")
    if not 1 <= levels <= len(LEVEL_LETTERS) - 1:
        raise ValueError(f"levels must be between 1 and {len(LEVEL_LETTERS) - 1} (one letter per level plus the collision level), got {levels}")
    if codes < 1:
        raise ValueError(f"codes must be at least 1, got {codes}")
    if not 0 <= behaviour_weight < 1:
        raise ValueError(f"behaviour weight must be in [0, 1) (1 would leave new ads without any vector), got {behaviour_weight}")
    if behaviour_dim < 1 or window < 1 or iters < 1:
        raise ValueError(f"behaviour dim, window and iterations must be at least 1, got {behaviour_dim}, {window}, {iters}")


def _save_codebooks(folder: Path, codebooks: list[Codebook], vectors: dict[str, Any]) -> None:
    tensors = {}
    for i, (centroids, parent) in enumerate(codebooks):
        tensors[f"level_{i}"], tensors[f"level_{i}_parent"] = np.ascontiguousarray(centroids), np.ascontiguousarray(parent)
    save_file(tensors, str(folder / CODEBOOKS), metadata={"vectors": json.dumps(vectors, sort_keys=True)})


def load_codebooks(folder: str | Path) -> tuple[list[Codebook], dict[str, Any]]:
    """(codebooks, how vectors are made: encoder, text_dim, behaviour_weight, behaviour_dim) of an S-ID artifact."""
    file = Path(folder) / CODEBOOKS
    if not file.is_file():
        raise FileNotFoundError(f"{folder}: no {CODEBOOKS}; was it written by `leadre sids build`?")
    with safe_open(str(file), framework="numpy") as f:
        vectors = json.loads(f.metadata()["vectors"])
        keys = set(f.keys())
        codebooks = []
        for i in range(sum(1 for key in keys if not key.endswith("_parent"))):
            centroids = f.get_tensor(f"level_{i}")
            # Artifacts written before tree k-means have one shared codebook per level and no parent tensors.
            shared = np.full(len(centroids), -1, dtype=np.int64)
            codebooks.append((centroids, f.get_tensor(f"level_{i}_parent") if f"level_{i}_parent" in keys else shared))
    return codebooks, vectors


def build_sids(
    data_dir: str | Path,
    out: str | Path,
    levels: int = SidSettings.levels,
    codes: int = SidSettings.codes,
    seed: int = SidSettings.seed,
    iters: int = SidSettings.iters,
    behaviour_weight: float = SidSettings.behaviour_weight,
    behaviour_dim: int = SidSettings.behaviour_dim,
    window: int = SidSettings.window,
    quantizer: str = SidSettings.quantizer,
    encoder: Encoder | None = None,
    cache_dir: str | Path | None = None,
    batch_size: int = 64,
    progress: bool = True,
) -> dict[str, Any]:
    """Build the S-ID artifact of a data directory; returns its manifest."""
    _check_parameters(levels, codes, behaviour_weight, behaviour_dim, window, iters, quantizer)
    t0 = time.perf_counter()
    tables = read_data_dir(data_dir)
    settings = split_settings_of(data_dir)
    ads = tables.ads
    ad_ids = pd.Index(ads["ad_id"])
    encoder = encoder or MiniLMEncoder()
    text, embedded = embed_texts(ad_texts(ads), encoder, cache_dir, batch_size, progress)
    t_embed = time.perf_counter() - t0

    # Behaviour comes from training positives only: validation and test targets must not shape the codes.
    split = settings.split(tables.events)
    train_targets = split.train_targets()
    behaviour, with_behaviour = None, 0
    if behaviour_weight > 0:
        behaviour = behaviour_vectors(train_targets, ad_ids, behaviour_dim, window, seed)
        with_behaviour = int((np.abs(behaviour).sum(1) > 0).sum())
    x = blend(text, behaviour, behaviour_weight)
    k = effective_codes(len(ads), codes)
    codebooks, prefix = QUANTIZERS[quantizer](x, levels, k, seed, iters)
    popularity = train_targets["item_id"].value_counts().reindex(ad_ids, fill_value=0).to_numpy()
    all_codes = np.column_stack([prefix, separate_collisions(prefix, priority=popularity)])
    level_sizes = [k] * levels + [int(all_codes[:, -1].max()) + 1]
    t_total = time.perf_counter() - t0

    stats = sid_stats(all_codes, level_sizes, text)
    stats["next_ad_first_code"] = next_ad_first_code(split, ad_ids, all_codes[:, 0])
    stats["ads_with_behaviour"] = with_behaviour
    stats["seconds"] = {"embed": round(t_embed, 1), "total": round(t_total, 1)}
    vectors = {"encoder": encoder.name, "text_dim": int(text.shape[1]), "behaviour_weight": behaviour_weight,
               "behaviour_dim": behaviour_dim if behaviour is not None else 0}
    parameters = {"levels": levels, "codes": codes, "seed": seed, "iters": iters, "behaviour_weight": behaviour_weight,
                  "behaviour_dim": behaviour_dim, "window": window, "quantizer": quantizer, "encoder": encoder.name}
    table = SidTable(ad_ids=ads["ad_id"].to_numpy(dtype=str), codes=all_codes, level_sizes=tuple(level_sizes))
    with write_artifact(out, "sids build", inputs={"data": data_dir}, parameters=parameters) as (tmp, manifest):
        table.save(tmp)
        _save_codebooks(tmp, codebooks, vectors)
        (tmp / STATS).write_text(json.dumps(stats, indent=2) + "\n")
        manifest.update(level_sizes=level_sizes, levels=levels, codes=k, vectors=vectors, stats=stats,
                        split=settings.as_dict(),
                        counts={"ads": len(ads), "embedded": embedded, "with_behaviour": with_behaviour})
    log.info("sids build: %s", summary(stats))
    return manifest


def summary(stats: dict[str, Any]) -> str:
    """One line: ads, collision rate, code usage, largest bucket, sanity."""
    usage = " ".join(f"{u['level']}:{u['used']}/{u['size']}" for u in stats["code_usage"])
    line = (f"{stats['ads']:,} ads, collision rate {stats['collision_rate']:.1%} before the last level, "
            f"codes used {usage}, largest bucket {stats['largest_bucket']}")
    if "sanity" in stats:
        s = stats["sanity"]
        line += f", text cosine same first code {s['same_first_code_cosine']:.3f} vs random {s['random_pair_cosine']:.3f}"
    return line


def read_ads_file(path: str | Path) -> pd.DataFrame:
    """New ads from a parquet/CSV/TSV file (optionally .gz) or a data directory's ads.parquet."""
    path = Path(path)
    if path.is_dir():
        path = path / "ads.parquet"
        if not path.is_file():
            raise FileNotFoundError(f"{path.parent}: a directory of ads must hold ads.parquet")
    name = path.name.lower().removesuffix(".gz")
    if not name.endswith((".parquet", ".csv", ".tsv", ".tab")):
        raise ValueError(f"{path}: unknown file type (expected .parquet, .csv or .tsv, optionally .gz, or a data directory)")
    return read_table(path)


def check_new_ads(ads: pd.DataFrame) -> pd.DataFrame:
    """The columns S-IDs need (ad_id and the text columns), non-empty unique ids; raises `DataError`."""
    for column in AD_COLUMNS:
        if column not in ads.columns:
            raise DataError("ads", column, None, f"missing column (has: {', '.join(map(str, ads.columns))})")
    if len(ads) == 0:
        raise DataError("ads", None, None, "no rows")
    ids = ads["ad_id"]
    for mask, problem in ((ids.isna(), "null id"), (ids.astype(str).str.strip() == "", "empty id"),
                          (ids.astype(str).duplicated(), "duplicate id")):
        if mask.any():
            row = int(np.argmax(mask.to_numpy()))
            raise DataError("ads", "ad_id", row, f"{problem} ({ids.iloc[row]!r})")
    ads = ads.reset_index(drop=True).copy()
    ads["ad_id"] = ads["ad_id"].astype(str)
    return ads


def assign_sids(
    sids_dir: str | Path,
    ads: pd.DataFrame,
    out: str | Path,
    encoder: Encoder | None = None,
    cache_dir: str | Path | None = None,
    batch_size: int = 64,
    progress: bool = True,
    inputs: dict[str, str | Path] | None = None,
) -> dict[str, Any]:
    """S-IDs for new ads from frozen codebooks; writes the union of old and new ads; returns the manifest.

    Ads already in the table keep their S-IDs. New ads have no behaviour yet, so only their text part is set,
    as `build_sids` does for ads without training positives.
    """
    ads = check_new_ads(ads)
    previous = read_manifest(sids_dir, SID_STEPS)
    table = load_sid_table(sids_dir)
    codebooks, vectors = load_codebooks(sids_dir)
    encoder = encoder or MiniLMEncoder()
    if encoder.name != vectors["encoder"]:
        raise ValueError(f"{sids_dir}: codebooks were built on {vectors['encoder']!r} vectors, not {encoder.name!r}")

    new = ads[~ads["ad_id"].isin(table.ad_ids)]
    new_codes = np.empty((0, table.levels), dtype=np.int64)
    embedded = 0
    if len(new):
        text, embedded = embed_texts(ad_texts(new), encoder, cache_dir, batch_size, progress)
        no_behaviour = np.zeros((len(new), vectors["behaviour_dim"]), dtype=np.float32) if vectors["behaviour_dim"] else None
        prefix = quantize(blend(text, no_behaviour, vectors["behaviour_weight"]), codebooks)
        new_codes = np.column_stack([prefix, separate_collisions(prefix, table.codes)])
    all_codes = np.concatenate([table.codes, new_codes])
    level_sizes = list(table.level_sizes)
    level_sizes[-1] = max(level_sizes[-1], int(all_codes[:, -1].max()) + 1)
    if level_sizes[-1] > table.level_sizes[-1]:
        log.warning("sids assign: the collision level grew from %d to %d codes; a model trained on the old "
                    "vocabulary has no token for the new ones", table.level_sizes[-1], level_sizes[-1])
    union = SidTable(ad_ids=np.concatenate([table.ad_ids, new["ad_id"].to_numpy(dtype=str)]), codes=all_codes,
                     level_sizes=tuple(level_sizes))
    stats = sid_stats(all_codes, level_sizes)
    with write_artifact(out, "sids assign", inputs={"sids": sids_dir, **(inputs or {})},
                        parameters={"encoder": encoder.name}) as (tmp, manifest):
        union.save(tmp)
        shutil.copy2(Path(sids_dir) / CODEBOOKS, tmp / CODEBOOKS)
        (tmp / STATS).write_text(json.dumps(stats, indent=2) + "\n")
        manifest.update(level_sizes=level_sizes, levels=previous["levels"], codes=previous["codes"], vectors=vectors,
                        stats=stats, split=previous.get("split"),
                        collision_level_grew=level_sizes[-1] > table.level_sizes[-1],
                        counts={"ads": len(union), "new": len(new), "kept": len(ads) - len(new), "embedded": embedded})
    log.info("sids assign: %d new ads, %d already had S-IDs; %s", len(new), len(ads) - len(new), summary(stats))
    return manifest
