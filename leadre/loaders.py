"""Loaders from public formats into the canonical tables (DESIGN §3).

Neither MovieLens nor a plain interaction log has ads, eCPM or advertisers. Each item becomes an ad and the
missing columns are derived deterministically; `DERIVED_ECPM` documents the rule and the data manifest marks
every derived column. The derived eCPM counts interactions of the training window only (the split the data
directory records), so validation and test targets do not raise their own ads' eCPM: DPO's preferences and
eCPM@K read it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from leadre.schema import DataError, Tables, parse_timestamps
from leadre.split import DEFAULT_MIN_POSITIVES, SplitSettings

DERIVED_ECPM = (
    "derived: ecpm = 1000 * bid * pctr, bid = 0.2 + 4.8 * u(ad_id) with u a SHA-1 hash of the id mapped to [0, 1), "
    "pctr = 0.05 * (n + 1) / (n + 50) with n the ad's interaction count in the training window (events before "
    "each user's validation target)"
)

ML1M_AGES = {1: "Under 18", 18: "18-24", 25: "25-34", 35: "35-44", 45: "45-49", 50: "50-55", 56: "56+"}
ML1M_OCCUPATIONS = [
    "other", "academic/educator", "artist", "clerical/admin", "college/grad student", "customer service",
    "doctor/health care", "executive/managerial", "farmer", "homemaker", "K-12 student", "lawyer", "programmer",
    "retired", "sales/marketing", "scientist", "self-employed", "technician/engineer", "tradesman/craftsman",
    "unemployed", "writer",
]


def derive_ecpm(ad_ids: pd.Series, events: pd.DataFrame, split: SplitSettings) -> np.ndarray:
    """A deterministic eCPM per ad for datasets without one; see `DERIVED_ECPM`. `events` is the whole log (with
    the canonical columns); only its training window under `split` counts."""
    train = split.split(events).train_events()
    counts = train["item_id"].astype(str).value_counts().reindex(ad_ids.to_numpy(), fill_value=0).to_numpy()
    u = np.array([int.from_bytes(hashlib.sha1(str(a).encode()).digest()[:8], "big") / 2**64 for a in ad_ids])
    bid = 0.2 + 4.8 * u
    pctr = 0.05 * (counts + 1) / (counts + 50)
    return np.round(1000.0 * bid * pctr, 4)


def _open_text(path: Path, encoding: str) -> io.StringIO:
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    return io.StringIO(raw.decode(encoding))


def _find(folder: Path, *names: str) -> Path | None:
    for name in names:
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _read_delimited(path: Path, sep: str, names: list[str], table: str, encoding: str = "latin-1") -> pd.DataFrame:
    """Read a headerless delimited file; a line with the wrong field count is an error naming its row."""
    lines = [line for line in _open_text(path, encoding).read().splitlines() if line.strip()]
    rows = [line.split(sep) for line in lines]
    for i, row in enumerate(rows):
        if len(row) < len(names):
            raise DataError(table, None, i, f"{path.name}: expected {len(names)} fields separated by {sep!r}, got {len(row)}")
    return pd.DataFrame([row[: len(names)] for row in rows], columns=names)


def _int_column(df: pd.DataFrame, column: str, table: str) -> pd.Series:
    values = pd.to_numeric(df[column], errors="coerce")
    bad = values.isna().to_numpy()
    if bad.any():
        row = int(np.argmax(bad))
        raise DataError(table, column, row, f"not an integer ({df[column].iloc[row]!r})")
    return values.astype("int64")


def _movie_ads(movies: pd.DataFrame, events: pd.DataFrame, genres: pd.Series, split: SplitSettings) -> pd.DataFrame:
    year = movies["title"].str.extract(r"\((\d{4})\)\s*$", expand=False)
    decade = (pd.to_numeric(year, errors="coerce") // 10 * 10).astype("Int64").astype(str).replace("<NA>", "unknown")
    genre_text = genres.str.join(", ")
    return pd.DataFrame({
        "ad_id": movies["movie_id"].astype(str).to_numpy(),
        "title": movies["title"].to_numpy(),
        "description": (movies["title"] + ". Genres: " + genre_text + ".").to_numpy(),
        "category": genres.str[0].fillna("unknown").to_numpy(),
        "advertiser": (decade + "s releases").where(decade != "unknown", "unknown release").to_numpy(),
        "genres": genre_text.to_numpy(),
        "ecpm": derive_ecpm(movies["movie_id"].astype(str), events, split),
        "active": True,
    })


def _rating_events(ratings: pd.DataFrame, last: int | None) -> pd.DataFrame:
    for column in ("user_id", "movie_id", "rating", "ts"):
        ratings[column] = _int_column(ratings, column, "events")
    if last is not None:  # a stable sort keeps file order among equal timestamps, as the split does
        ratings = ratings.sort_values("ts", kind="stable").groupby("user_id", sort=False).tail(last).sort_index()
    return pd.DataFrame({
        "user_id": ratings["user_id"].astype(str),
        "item_id": ratings["movie_id"].astype(str),
        "item_type": "ad",
        "action": "rating",
        "rating": ratings["rating"].astype("int8"),
        "ts": parse_timestamps(ratings["ts"], unit="s"),
    })


def _keep_active_users(users: pd.DataFrame, events: pd.DataFrame) -> pd.DataFrame:
    """Users with at least one interaction (ML-1M files here hold ratings of a subset of users.dat)."""
    return users[users["user_id"].isin(events["user_id"])].reset_index(drop=True)


MOVIELENS_POSITIVE_ACTIONS = ("rating",)


def load_movielens(path: str | Path, min_positives: int = DEFAULT_MIN_POSITIVES,
                   last: int | None = None) -> tuple[Tables, dict[str, str]]:
    """MovieLens-1M (`*.dat`, `::`) or -100K (`u.data`, `u.user`, `u.item`); returns tables and derived columns.
    Every rating is a positive ('rating'); `min_positives` is the split's, which the derived eCPM depends on.
    `last` keeps only each user's `last` latest ratings: a sparse cut (a few positives per user, many ads nobody
    rated), on which the derived eCPM is computed too."""
    if last is not None and last < 1:
        raise ValueError(f"last must be at least 1, got {last}")
    split = SplitSettings(MOVIELENS_POSITIVE_ACTIONS, min_positives)
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such MovieLens directory")
    if (folder / "movies.dat").is_file():
        tables = _load_ml1m(folder, split, last)
    elif (folder / "u.item").is_file():
        tables = _load_ml100k(folder, split, last)
    else:
        raise FileNotFoundError(f"{folder}: neither MovieLens-1M (movies.dat) nor MovieLens-100K (u.item) files found")
    derived = {
        "ecpm": DERIVED_ECPM,
        "advertiser": "release decade from the title (MovieLens has no advertiser)",
        "category": "first listed genre",
        "events.action": "every rating is one positive interaction ('rating'); the value is in events.rating",
    }
    return tables, derived


def _load_ml1m(folder: Path, split: SplitSettings, last: int | None) -> Tables:
    ratings_file = _find(folder, "ratings.dat") or next(iter(sorted(folder.glob("ratings*.dat*"))), None)
    if ratings_file is None:
        raise FileNotFoundError(f"{folder}: no ratings.dat (or ratings*.dat.gz)")
    movies = _read_delimited(folder / "movies.dat", "::", ["movie_id", "title", "genres"], "ads")
    movies["movie_id"] = _int_column(movies, "movie_id", "ads")
    ratings = _read_delimited(ratings_file, "::", ["user_id", "movie_id", "rating", "ts"], "events")
    events = _rating_events(ratings, last)
    users = _read_delimited(folder / "users.dat", "::", ["user_id", "gender", "age", "occupation", "zip"], "users")
    age, occupation = _int_column(users, "age", "users"), _int_column(users, "occupation", "users")
    users = pd.DataFrame({
        "user_id": _int_column(users, "user_id", "users").astype(str),
        "gender": users["gender"].map({"F": "female", "M": "male"}).fillna("unknown"),
        "age_bucket": age.map(ML1M_AGES).fillna("unknown"),
        "occupation": occupation.map(dict(enumerate(ML1M_OCCUPATIONS))).fillna("other"),
        "zip_prefix": users["zip"].str[:3],
    })
    ads = _movie_ads(movies, events, movies["genres"].str.split("|"), split)
    return Tables(ads=ads, contents=_no_contents(), users=_keep_active_users(users, events), events=events)


def _age_bucket(age: pd.Series) -> pd.Series:
    """MovieLens-100K gives ages in years; bucket them the way MovieLens-1M does."""
    bins = [0, 18, 25, 35, 45, 50, 56, 200]
    return pd.cut(age, bins=bins, right=False, labels=list(ML1M_AGES.values())).astype(str)


def _load_ml100k(folder: Path, split: SplitSettings, last: int | None) -> Tables:
    data = _find(folder, "u.data")
    if data is None:
        raise FileNotFoundError(f"{folder}: no u.data (or u.data.gz)")
    genre_names = [g.split("|")[0] for g in (folder / "u.genre").read_text(encoding="latin-1").splitlines() if g.strip()]
    item_cols = ["movie_id", "title", "release", "video_release", "url"] + genre_names
    movies = _read_delimited(folder / "u.item", "|", item_cols, "ads")
    movies["movie_id"] = _int_column(movies, "movie_id", "ads")
    flags = movies[genre_names].to_numpy() == "1"
    genres = pd.Series([[g for g, on in zip(genre_names, row) if on] or ["unknown"] for row in flags])
    ratings = _read_delimited(data, "\t", ["user_id", "movie_id", "rating", "ts"], "events")
    events = _rating_events(ratings, last)
    raw = _read_delimited(folder / "u.user", "|", ["user_id", "age", "gender", "occupation", "zip"], "users")
    users = pd.DataFrame({
        "user_id": _int_column(raw, "user_id", "users").astype(str),
        "gender": raw["gender"].map({"F": "female", "M": "male"}).fillna("unknown"),
        "age_bucket": _age_bucket(_int_column(raw, "age", "users")),
        "occupation": raw["occupation"],
        "zip_prefix": raw["zip"].str[:3],
    })
    ads = _movie_ads(movies, events, genres, split)
    return Tables(ads=ads, contents=_no_contents(), users=_keep_active_users(users, events), events=events)


def _no_contents() -> pd.DataFrame:
    return pd.DataFrame({"content_id": pd.Series(dtype=str), "title": pd.Series(dtype=str), "category": pd.Series(dtype=str)})


def read_table(path: str | Path, sep: str | None = None) -> pd.DataFrame:
    """A CSV, TSV or parquet file, optionally gzipped; the separator comes from the suffix unless given."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    name = path.name.lower().removesuffix(".gz")
    if name.endswith(".parquet"):
        return pd.read_parquet(path)
    if sep is None:
        sep = "\t" if name.endswith((".tsv", ".tab")) else ","
    try:
        return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, na_values=[""], compression="infer")
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot parse as {sep!r}-separated text: {e}") from None


def _require(df: pd.DataFrame, columns: list[str], path: Path, option: str) -> None:
    for column in columns:
        if column not in df.columns:
            raise ValueError(f"{path.name}: no column {column!r} (set {option}; columns are {', '.join(map(str, df.columns))})")


TIME_UNITS = ("auto", "s", "ms", "us", "iso")


def _log_timestamps(values: pd.Series, column: str, unit: str) -> pd.Series:
    """`auto`: Unix seconds when every value is a number, else dates; `s`/`ms`/`us`: Unix time; `iso`: dates."""
    if unit not in TIME_UNITS:
        raise ValueError(f"time unit {unit!r}: expected one of {TIME_UNITS}")
    numeric = pd.to_numeric(values, errors="coerce")
    if unit == "iso" or (unit == "auto" and numeric.isna().any()):
        return parse_timestamps(values, column=column)
    bad = (numeric.isna() & values.notna()).to_numpy()
    if bad.any():
        row = int(np.argmax(bad))
        raise DataError("events", column, row, f"unparsable timestamp ({values.iloc[row]!r}); expected Unix time in {unit}")
    return parse_timestamps(numeric, column=column, unit="s" if unit == "auto" else unit)


def load_interactions(
    interactions: str | Path,
    items: str | Path,
    user_col: str = "user_id",
    item_col: str = "item_id",
    time_col: str = "timestamp",
    time_unit: str = "auto",
    action_col: str | None = None,
    item_id_col: str | None = None,
    title_col: str = "title",
    text_cols: tuple[str, ...] = (),
    category_col: str | None = None,
    advertiser_col: str | None = None,
    ecpm_col: str | None = None,
    sep: str | None = None,
    positive_actions: Sequence[str] | None = None,
    min_positives: int = DEFAULT_MIN_POSITIVES,
) -> tuple[Tables, dict[str, str]]:
    """Any (user, item, timestamp) log plus an item table. Returns tables and the columns that were derived.
    The split (`interaction_split`) matters only to a derived eCPM."""
    interactions, items = Path(interactions), Path(items)
    log_df, item_df = read_table(interactions, sep), read_table(items, sep)
    item_id_col = item_id_col or item_col
    _require(log_df, [user_col, item_col, time_col] + ([action_col] if action_col else []), interactions, "--user-col/--item-col/--time-col/--action-col")
    _require(item_df, [item_id_col, title_col, *text_cols] + [c for c in (category_col, advertiser_col, ecpm_col) if c], items, "--item-id-col/--title-col/--text-cols/--category-col/--advertiser-col/--ecpm-col")

    derived: dict[str, str] = {}
    events = pd.DataFrame({
        "user_id": log_df[user_col],
        "item_id": log_df[item_col],
        "item_type": "ad",
        "action": log_df[action_col] if action_col else "interaction",
        "ts": _log_timestamps(log_df[time_col], time_col, time_unit),
    })
    if not action_col:
        derived["events.action"] = "every row is one positive interaction ('interaction')"
    title = item_df[title_col].fillna("").astype(str)
    description = title
    for column in text_cols:
        description = description + ". " + item_df[column].fillna("").astype(str)
    ads = pd.DataFrame({
        "ad_id": item_df[item_id_col],
        "title": title,
        "description": description,
        "category": item_df[category_col] if category_col else "unknown",
        "advertiser": item_df[advertiser_col] if advertiser_col else "unknown",
        "active": True,
    })
    if ecpm_col:
        ads["ecpm"] = item_df[ecpm_col]
    else:
        split = interaction_split(events, positive_actions, min_positives)
        ads["ecpm"] = derive_ecpm(ads["ad_id"].astype(str), events.astype({"user_id": str, "item_id": str}), split)
        derived["ecpm"] = DERIVED_ECPM
    for column, option in (("category", category_col), ("advertiser", advertiser_col)):
        if not option:
            derived[column] = "not in the input: 'unknown'"
    users = pd.DataFrame({"user_id": pd.unique(events["user_id"].dropna().astype(str))})
    return Tables(ads=ads, contents=_no_contents(), users=users, events=events), derived


def interaction_split(events: pd.DataFrame, positive_actions: Sequence[str] | None = None,
                      min_positives: int = DEFAULT_MIN_POSITIVES) -> SplitSettings:
    """The split of a loaded log: the given positive actions, or every action in it (without an action column
    that is the single action 'interaction')."""
    return SplitSettings(tuple(positive_actions or sorted(events["action"].astype(str).unique())), min_positives)
