"""Semantic IDs as text: one token per (level, code), e.g. `<a_17><b_203><c_5><d_0>`.

This module owns rendering and parsing, the token vocabulary, and the ad → S-ID table an S-ID artifact holds.
Level letters run a, b, c, ...; the last level separates ads whose codes would otherwise collide.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from leadre.artifacts import read_manifest

LEVEL_LETTERS = string.ascii_lowercase
TOKEN_RE = re.compile(r"<([a-z])_(\d+)>")
SID_TABLE = "sids.parquet"


def sid_token(level: int, code: int) -> str:
    return f"<{LEVEL_LETTERS[level]}_{code}>"


def render(codes: Sequence[int]) -> str:
    """`(17, 203, 5, 0)` → `<a_17><b_203><c_5><d_0>`."""
    return "".join(sid_token(level, int(code)) for level, code in enumerate(codes))


def parse(text: str) -> tuple[int, ...]:
    """The inverse of `render`; raises ValueError on anything that is not a well-formed S-ID."""
    text = text.strip()
    codes, end = [], 0
    for level, match in enumerate(TOKEN_RE.finditer(text)):
        if match.start() != end:
            raise ValueError(f"not an S-ID: unexpected text {text[end:match.start()]!r} in {text!r}")
        if match.group(1) != LEVEL_LETTERS[level]:
            raise ValueError(f"not an S-ID: level {level} should be '{LEVEL_LETTERS[level]}', got {match.group(0)!r} in {text!r}")
        codes.append(int(match.group(2)))
        end = match.end()
    if not codes or end != len(text):
        raise ValueError(f"not an S-ID: {text!r}")
    return tuple(codes)


def vocabulary(level_sizes: Sequence[int]) -> list[str]:
    """Every S-ID token, level by level: what the tokenizer adds."""
    return [sid_token(level, code) for level, size in enumerate(level_sizes) for code in range(size)]


@dataclass
class SidTable:
    """The ad → S-ID mapping of one S-ID artifact."""

    ad_ids: np.ndarray  # (N,) str
    codes: np.ndarray  # (N, L) int64; row i is the S-ID of ad_ids[i]
    level_sizes: tuple[int, ...]  # codes per level, the last one the collision level

    def __post_init__(self) -> None:
        self._row = {a: i for i, a in enumerate(self.ad_ids)}
        self._by_codes = {tuple(c): a for a, c in zip(self.ad_ids, self.codes.tolist())}

    @property
    def levels(self) -> int:
        return len(self.level_sizes)

    def __len__(self) -> int:
        return len(self.ad_ids)

    def sid_of(self, ad_id: str) -> str:
        """The rendered S-ID of an ad; KeyError names an unknown ad."""
        if ad_id not in self._row:
            raise KeyError(f"unknown ad {ad_id!r}: not in the S-ID table")
        return render(self.codes[self._row[ad_id]])

    def ad_of(self, codes: Sequence[int]) -> str | None:
        """The ad with these codes, or None for an S-ID that names no ad."""
        return self._by_codes.get(tuple(int(c) for c in codes))

    def rows(self, ad_ids: Sequence[str]) -> np.ndarray:
        return np.array([self._row[a] for a in ad_ids], dtype=np.int64)

    def frame(self) -> pd.DataFrame:
        df = pd.DataFrame({"ad_id": self.ad_ids, "sid": [render(c) for c in self.codes]})
        for level in range(self.levels):
            df[f"code_{level}"] = self.codes[:, level]
        return df

    def save(self, folder: Path) -> None:
        self.frame().to_parquet(Path(folder) / SID_TABLE, index=False)


def load_sid_table(folder: str | Path) -> SidTable:
    """Read the S-ID table of an artifact written by `sids build` or `sids assign`."""
    folder = Path(folder)
    manifest = read_manifest(folder, ("sids build", "sids assign"))
    df = pd.read_parquet(folder / SID_TABLE)
    level_sizes = tuple(int(k) for k in manifest["level_sizes"])
    codes = df[[f"code_{level}" for level in range(len(level_sizes))]].to_numpy(dtype=np.int64)
    return SidTable(ad_ids=df["ad_id"].astype(str).to_numpy(), codes=codes, level_sizes=level_sizes)
