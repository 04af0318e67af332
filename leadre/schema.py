"""The canonical data contract (DESIGN §3): four tables, validated with errors that name table, column and row.

A data directory holds `ads.parquet`, `contents.parquet`, `users.parquet`, `events.parquet` and `manifest.json`.
Every loader builds a `Tables`, and `write_data_dir` validates it before anything reaches the disk.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from leadre.artifacts import read_manifest, write_artifact
from leadre.split import DEFAULT_MIN_POSITIVES, SplitSettings

ITEM_TYPES = ("ad", "content")
DEFAULT_POSITIVE_ACTIONS = ("click", "conversion")

# table -> required columns; extra columns are kept (profile fields, ratings, bids, ...).
REQUIRED = {
    "ads": ("ad_id", "title", "description", "category", "advertiser", "ecpm", "active"),
    "contents": ("content_id", "title", "category"),
    "users": ("user_id",),
    "events": ("user_id", "item_id", "item_type", "action", "ts"),
}
ID_COLUMN = {"ads": "ad_id", "contents": "content_id", "users": "user_id"}
TEXT_COLUMNS = {
    "ads": ("title", "description", "category", "advertiser"),
    "contents": ("title", "category"),
}
DATA_STEPS = ("data synth", "data movielens", "data interactions")


class DataError(ValueError):
    """Bad input data; the message names the table, column, row and problem."""

    def __init__(self, table: str, column: str | None, row: int | None, problem: str):
        self.table, self.column, self.row, self.problem = table, column, row, problem
        where = table + (f".{column}" if column else "") + (f", row {row}" if row is not None else "")
        super().__init__(f"{where}: {problem}")


@dataclasses.dataclass
class Tables:
    ads: pd.DataFrame
    contents: pd.DataFrame
    users: pd.DataFrame
    events: pd.DataFrame

    def items(self) -> Iterable[tuple[str, pd.DataFrame]]:
        return ((f.name, getattr(self, f.name)) for f in dataclasses.fields(self))


def _first_bad(mask: np.ndarray | pd.Series) -> tuple[int, int]:
    """(row position of the first True, how many are True)."""
    mask = np.asarray(mask, dtype=bool)
    n = int(mask.sum())
    return (int(np.argmax(mask)) if n else -1), n


def _fail(table: str, column: str, mask: Any, problem: str, values: pd.Series | None = None) -> None:
    row, n = _first_bad(mask)
    if n == 0:
        return
    shown = f" ({values.iloc[row]!r})" if values is not None else ""
    more = f"; {n} rows in all" if n > 1 else ""
    raise DataError(table, column, row, f"{problem}{shown}{more}")


def parse_timestamps(values: pd.Series, table: str = "events", column: str = "ts", unit: str | None = None) -> pd.Series:
    """Timestamps as tz-aware UTC. Integers are Unix time in `unit` (default seconds); naive times are UTC."""
    if pd.api.types.is_datetime64_any_dtype(values):
        ts = values
    elif pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
        _fail(table, column, values.isna(), "missing timestamp")
        ts = pd.to_datetime(values, unit=unit or "s", errors="coerce")
        _fail(table, column, ts.isna(), "timestamp out of range", values)
    else:
        text = values.astype("string")
        _fail(table, column, text.isna(), "missing timestamp")
        ts = pd.to_datetime(text, errors="coerce", utc=True, format="mixed")
        _fail(table, column, ts.isna(), "unparsable timestamp", values)
    ts = ts.dt.tz_localize("UTC") if ts.dt.tz is None else ts.dt.tz_convert("UTC")
    _fail(table, column, ts.isna(), "missing timestamp")
    return ts.astype("datetime64[us, UTC]")


def _check_ids(name: str, df: pd.DataFrame, column: str) -> pd.Series:
    _fail(name, column, df[column].isna(), "null id")
    ids = df[column].astype(str)
    _fail(name, column, ids.str.strip() == "", "empty id")
    _fail(name, column, ids.duplicated(), "duplicate id", ids)
    return ids


def normalize(tables: Tables) -> Tables:
    """Check every rule of the contract and return tables with canonical dtypes (raises `DataError`)."""
    for name, df in tables.items():
        if not isinstance(df, pd.DataFrame):
            raise DataError(name, None, None, f"expected a table, got {type(df).__name__}")
        for column in REQUIRED[name]:
            if column not in df.columns:
                raise DataError(name, column, None, f"missing column (has: {', '.join(map(str, df.columns))})")
    for name in ("ads", "users", "events"):
        if len(getattr(tables, name)) == 0:
            raise DataError(name, None, None, "no rows")

    out = {}
    for name, df in tables.items():
        df = df.reset_index(drop=True).copy()
        if name in ID_COLUMN:
            df[ID_COLUMN[name]] = _check_ids(name, df, ID_COLUMN[name])
        for column in TEXT_COLUMNS.get(name, ()):
            df[column] = df[column].fillna("").astype(str)
        out[name] = df

    ads = out["ads"]
    ecpm = pd.to_numeric(ads["ecpm"], errors="coerce")
    _fail("ads", "ecpm", ecpm.isna() & ads["ecpm"].notna(), "not a number", ads["ecpm"])
    _fail("ads", "ecpm", ecpm.isna(), "missing eCPM")
    _fail("ads", "ecpm", ~np.isfinite(ecpm), "eCPM is not finite", ecpm)
    _fail("ads", "ecpm", ecpm < 0, "negative eCPM", ecpm)
    ads["ecpm"] = ecpm.astype("float64")
    active = ads["active"]
    if not pd.api.types.is_bool_dtype(active):
        ok = active.isin([True, False, 0, 1]) & active.notna()
        _fail("ads", "active", ~ok, "not a boolean", active)
    ads["active"] = active.astype(bool)

    ev = out["events"]
    for column in ("user_id", "item_id", "action"):
        _fail("events", column, ev[column].isna(), "null value")
        ev[column] = ev[column].astype(str)
    _fail("events", "item_type", ~ev["item_type"].isin(ITEM_TYPES), f"unknown item_type (expected one of {ITEM_TYPES})", ev["item_type"])
    ev["item_type"] = ev["item_type"].astype(str)
    ev["ts"] = parse_timestamps(ev["ts"])
    _fail("events", "user_id", ~ev["user_id"].isin(out["users"]["user_id"]), "unknown user", ev["user_id"])
    is_ad = ev["item_type"] == "ad"
    _fail("events", "item_id", is_ad & ~ev["item_id"].isin(ads["ad_id"]), "unknown ad", ev["item_id"])
    _fail("events", "item_id", ~is_ad & ~ev["item_id"].isin(out["contents"]["content_id"]), "unknown content", ev["item_id"])
    return Tables(**out)


def write_data_dir(
    tables: Tables,
    out: str | Path,
    step: str,
    parameters: dict[str, Any],
    positive_actions: Iterable[str] = DEFAULT_POSITIVE_ACTIONS,
    derived: dict[str, str] | None = None,
    inputs: dict[str, str | Path] | None = None,
    min_positives: int = DEFAULT_MIN_POSITIVES,
) -> Tables:
    """Validate and write a data directory atomically; `derived` documents columns the loader made up. The split
    settings (positive actions, `min_positives`) are chosen here, once, and recorded for every later step."""
    tables = normalize(tables)
    split = SplitSettings(tuple(positive_actions), min_positives)
    positive_actions = list(split.positive_actions)
    actions = set(tables.events["action"].unique())
    if not actions & set(positive_actions):
        raise DataError("events", "action", None, f"no event has a positive action {positive_actions} (actions: {sorted(actions)})")
    with write_artifact(out, step, inputs=inputs, parameters=parameters) as (tmp, manifest):
        for name, df in tables.items():
            df.to_parquet(tmp / f"{name}.parquet", index=False)
        manifest["positive_actions"] = positive_actions
        manifest["split"] = split.as_dict()
        manifest["derived"] = derived or {}
        manifest["counts"] = {name: len(df) for name, df in tables.items()}
    return tables


def positive_actions_of(data_dir: str | Path) -> list[str]:
    return list(read_manifest(data_dir, DATA_STEPS).get("positive_actions", DEFAULT_POSITIVE_ACTIONS))


def split_settings_of(data_dir: str | Path) -> SplitSettings:
    """The split settings the data step recorded (its manifest's "split")."""
    return SplitSettings.from_dict(read_manifest(data_dir, DATA_STEPS).get("split"), f"data directory {data_dir}")


def read_data_dir(path: str | Path, validate: bool = True) -> Tables:
    """Read a data directory; with `validate`, every contract rule is checked again (files can be edited)."""
    path = Path(path)
    read_manifest(path, DATA_STEPS)
    frames = {}
    for name in REQUIRED:
        file = path / f"{name}.parquet"
        if not file.is_file():
            raise DataError(name, None, None, f"missing file {file}")
        try:
            frames[name] = pd.read_parquet(file)
        except Exception as e:  # pyarrow raises several unrelated types for a damaged file
            raise DataError(name, None, None, f"unreadable parquet file {file}: {e}") from None
    tables = Tables(**frames)
    return normalize(tables) if validate else tables
