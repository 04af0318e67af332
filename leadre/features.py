"""The feature store (DESIGN §2, §5): Feast over `feature_repo/`, with the reads and writes the predictors make.

`apply` and `materialize` write the repository's offline sources (parquet under `<repo>/data/`) from a canonical
data directory, then register the definitions or copy the latest values to the online store (SQLite locally, Redis
in production). The other functions are the serving hot path: one `get_online_features` call per batch, with the
feature references resolved once here, and for the recall service a read below it (`OnlineReader`). A failing
online store raises `FeatureStoreUnavailable`, the one type the predictors catch to degrade to their fallback.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import re
import runpy
import sqlite3
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from redis.exceptions import RedisError

from leadre.schema import positive_actions_of, read_data_dir
from leadre.split import mark_positives, order_events

if TYPE_CHECKING:
    from feast import FeatureStore

log = logging.getLogger(__name__)

LOCAL_CONFIG, PRODUCTION_CONFIG = "feature_store.yaml", "feature_store.production.yaml"
DEFINITIONS = "definitions.py"
SOURCES = "data"  # the offline sources, relative to the repository (as in definitions.py)
MAX_RECENT = 256  # items per behaviour list; the prompt shows far fewer, the rest only shapes the interest summary
BATCH_VIEWS = ("user_profile", "user_behaviour", "ad_status")
RECALL_PUSH = "recall_push"

PROFILE_REFS = ["user_profile:profile", "user_behaviour:recent_ads", "user_behaviour:recent_contents"]
# What the recall service logs of a user for drift monitoring: the profile and the behaviour lists' lengths only.
PROFILE_SUMMARY_REFS = ["user_profile:profile", "user_behaviour:n_recent_ads", "user_behaviour:n_recent_contents"]
RECALL_REFS = ["recall_list:ad_ids", "recall_list:scores", "recall_list:model_version", "recall_list:generated_at"]
AD_STATUS_REFS = ["ad_status:active", "ad_status:ecpm"]
RECALL_COLUMNS = ("user_id", "ad_ids", "scores", "model_version", "generated_at")

UTC_TIME = pa.timestamp("us", tz="UTC")
RECALL_SCHEMA = pa.schema([("user_id", pa.string()), ("ad_ids", pa.list_(pa.string())), ("scores", pa.list_(pa.float64())),
                           ("model_version", pa.string()), ("generated_at", UTC_TIME), ("event_timestamp", UTC_TIME)])
_ENV_VAR = re.compile(r"\$\{(\w+)\}|\$(\w+)")


class FeatureStoreError(ValueError):
    """A feature repository, its configuration or its input data is missing or wrong."""


class FeatureStoreUnavailable(RuntimeError):
    """The online store could not be read or written (Redis down, SQLite file gone): callers fall back."""


_UNAVAILABLE = (RedisError, sqlite3.Error, ConnectionError, TimeoutError)  # what the online stores raise when down


@contextlib.contextmanager
def _online_store(error: type[Exception] = FeatureStoreUnavailable) -> Iterator[None]:
    """Turn the online store's connection errors into `error` (commands report a FeatureStoreError instead)."""
    try:
        yield
    except _UNAVAILABLE as e:
        raise error(f"online store unavailable: {type(e).__name__}: {e}") from e


def _config_file(repo: str | Path, production: bool) -> Path:
    repo = Path(repo)
    if not repo.is_dir():
        raise FeatureStoreError(f"{repo}: no such feature repository (a copy of feature_repo/)")
    config = repo / (PRODUCTION_CONFIG if production else LOCAL_CONFIG)
    if not config.is_file():
        raise FeatureStoreError(f"{repo}: no {config.name}; not a Feast feature repository (copy feature_repo/)")
    if production:
        # Feast expands ${VAR} with os.path.expandvars, which leaves an unset one in place as literal text.
        text = re.sub(r"(?m)^\s*#.*$", "", config.read_text())
        missing = sorted({a or b for a, b in _ENV_VAR.findall(text)} - set(os.environ))
        if missing:
            raise FeatureStoreError(f"{config}: environment variable(s) {', '.join(missing)} not set "
                                    "(e.g. REDIS_CONNECTION_STRING=redis:6379, FEAST_REGISTRY_PATH=/data/registry.db)")
    return config


def _store(repo: str | Path, production: bool) -> FeatureStore:
    from feast import FeatureStore
    from feast.repo_config import FeastConfigError

    config = _config_file(repo, production)
    try:
        return FeatureStore(repo_path=str(Path(repo).resolve()), fs_yaml_file=config.resolve())
    except FeastConfigError as e:
        raise FeatureStoreError(f"{config}: {e}") from None


def open_store(repo: str | Path, production: bool = False) -> FeatureStore:
    """The applied feature store of `repo` (local: feature_store.yaml; production: the Redis configuration)."""
    from feast.errors import FeatureViewNotFoundException

    store = _store(repo, production)
    try:
        for name in BATCH_VIEWS + ("recall_list",):
            store.get_feature_view(name)
    except FeatureViewNotFoundException:
        raise FeatureStoreError(f"{repo}: feature view {name!r} is not registered; run `leadre features apply` "
                                "first") from None
    return store


# --- offline sources -------------------------------------------------------------------------------------------


def behaviour_lists(events: pd.DataFrame, positive_actions: Iterable[str], max_items: int = MAX_RECENT) -> pd.DataFrame:
    """Per user with events: `recent_ads` (positive ad interactions without repeats) and `recent_contents`, in stable
    time order, oldest first, the last `max_items` of each, and their lengths (`n_recent_ads`, `n_recent_contents`);
    `event_timestamp` is the user's latest event. The batch form of `leadre.bundle.history_from_events` (same
    `order_events` and `mark_positives`)."""
    ordered = order_events(events)
    positive = mark_positives(ordered, list(positive_actions))

    def recent(mask: pd.Series) -> pd.Series:
        return ordered[mask].groupby("user_id", sort=False)["item_id"].agg(lambda s: s.tolist()[-max_items:])

    users = ordered.groupby("user_id", sort=False)["ts"].max().rename("event_timestamp")
    out = pd.concat([users, recent(positive).rename("recent_ads"),
                     recent(ordered["item_type"] == "content").rename("recent_contents")], axis=1)
    for column in ("recent_ads", "recent_contents"):
        out[column] = [v if isinstance(v, list) else [] for v in out[column]]
        out[f"n_{column}"] = out[column].map(len).astype("int64")
    return out.rename_axis("user_id").reset_index()[["user_id", "recent_ads", "recent_contents", "n_recent_ads",
                                                     "n_recent_contents", "event_timestamp"]]


def _write_sources(repo: Path, data_dir: str | Path) -> dict[str, int]:
    """Write the repository's parquet sources from a data directory; returns rows per source."""
    if not Path(data_dir).is_dir():
        raise FeatureStoreError(f"{data_dir}: no such data directory")
    tables = read_data_dir(data_dir)
    now = pd.Timestamp.now(tz="UTC").floor("us")
    fields = [c for c in tables.users.columns if c != "user_id"]
    # The same strings training put in prompts (leadre.prompts: users' profile columns `.astype(str)`).
    profiles = tables.users[fields].astype(str).to_dict("records")
    frames = {
        "user_profile": pd.DataFrame({"user_id": tables.users["user_id"],
                                      "profile": [json.dumps(p, ensure_ascii=False) for p in profiles],
                                      "event_timestamp": now}),
        "user_behaviour": behaviour_lists(tables.events, positive_actions_of(data_dir)),
        # Stamped now: newer than any earlier `set_ad_status`, so re-materialising restores the data's status.
        "ad_status": tables.ads[["ad_id", "active", "ecpm"]].assign(event_timestamp=now),
    }
    sources = repo / SOURCES
    sources.mkdir(parents=True, exist_ok=True)
    for name, df in frames.items():
        tmp = sources / f".{name}.parquet.tmp"
        df.to_parquet(tmp, index=False)
        os.replace(tmp, sources / f"{name}.parquet")  # a materialisation running now reads the old or the new file
    recall = sources / "recall_list.parquet"
    if not recall.exists():  # the push source's schema; pushes go to the online store only
        pq.write_table(RECALL_SCHEMA.empty_table(), recall)
    counts = {name: len(df) for name, df in frames.items()}
    log.info("features: wrote offline sources under %s %s", sources, counts)
    return counts


def _definitions(repo: str | Path) -> list[Any]:
    """The Feast objects of the repository's definitions.py (every object it defines at module level)."""
    from feast import Entity, FeatureService, FeatureView, OnDemandFeatureView, Project
    from feast.data_source import DataSource

    path = Path(repo) / DEFINITIONS
    if not path.is_file():
        raise FeatureStoreError(f"{repo}: no {DEFINITIONS} (the Feast definitions; copy feature_repo/)")
    kinds = (Project, Entity, DataSource, FeatureView, OnDemandFeatureView, FeatureService)
    objects: list[Any] = []
    for obj in runpy.run_path(str(path), run_name="leadre_feature_definitions").values():
        if isinstance(obj, kinds) and not any(obj is o for o in objects):
            objects.append(obj)
            source = obj.batch_source if isinstance(obj, FeatureView) else None
            if source is not None and not any(source is o for o in objects):
                objects.append(source)  # sources defined inline are registered too, as `feast apply` does
    return objects


def apply(repo: str | Path, data_dir: str | Path, production: bool = False) -> dict[str, int]:
    """`leadre features apply`: write the offline sources, register the definitions, create the online tables."""
    store = _store(repo, production)
    objects = _definitions(repo)
    counts = _write_sources(Path(repo), data_dir)
    with _online_store(FeatureStoreError), warnings.catch_warnings():
        # The ranks are computed online only; the warning is about offline retrieval at scale.
        warnings.filterwarnings("ignore", "On demand feature view is an experimental feature")
        store.apply(objects)
    log.info("features: applied %d objects to %s", len(objects), store.config.registry.path)
    return counts


def materialize(repo: str | Path, data_dir: str | Path, production: bool = False) -> dict[str, int]:
    """`leadre features materialize`: refresh the offline sources, then copy their latest values online."""
    store = open_store(repo, production)
    counts = _write_sources(Path(repo), data_dir)
    frames = [pd.read_parquet(Path(repo) / SOURCES / f"{name}.parquet", columns=["event_timestamp"])
              for name in BATCH_VIEWS]
    start = min(f["event_timestamp"].min() for f in frames) - pd.Timedelta(seconds=1)
    end = pd.Timestamp.now(tz="UTC") + pd.Timedelta(seconds=1)
    with _online_store(FeatureStoreError):
        store.materialize(start.to_pydatetime(), end.to_pydatetime(), feature_views=list(BATCH_VIEWS))
    return counts


# --- the serving hot path --------------------------------------------------------------------------------------


def _online(store: FeatureStore, refs: list[str], key: str, ids: Sequence[str]) -> dict[str, list[Any]]:
    """One online read for a batch of entity ids: feature name -> values, aligned with `ids`."""
    with _online_store():
        return store.get_online_features(features=refs, entity_rows={key: list(ids)}).to_dict()


def _profiles(user_ids: Sequence[str], values: dict[str, list[Any]]) -> dict[str, dict[str, Any]]:
    out = {}
    for user_id, profile, ads, contents in zip(user_ids, values["profile"], values["recent_ads"],
                                               values["recent_contents"]):
        if profile is None and ads is None:
            continue
        out[user_id] = {"profile": json.loads(profile) if profile else {}, "ads": list(ads or []),
                        "contents": list(contents or [])}
    return out


def _recall_rows(user_ids: Sequence[str], values: dict[str, list[Any]]) -> dict[str, dict[str, Any]]:
    out = {}
    for user_id, ads, scores, version, generated in zip(user_ids, values["ad_ids"], values["scores"],
                                                        values["model_version"], values["generated_at"]):
        if ads is None:
            continue
        out[user_id] = {"ad_ids": list(ads), "scores": list(scores or []), "model_version": version,
                        "generated_at": generated}  # Feast returns an aware UTC datetime (whole seconds)
    return out


def user_features(store: FeatureStore, user_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """user_id -> {"profile": dict, "ads": [...], "contents": [...]} (oldest first); unknown users are absent."""
    return _profiles(user_ids, _online(store, PROFILE_REFS, "user_id", user_ids)) if user_ids else {}


def recall_lists(store: FeatureStore, user_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """user_id -> {"ad_ids", "scores", "model_version", "generated_at" (aware UTC datetime)}; users without a
    list are absent. A stale list is one whose `generated_at` is older than the caller's limit."""
    return _recall_rows(user_ids, _online(store, RECALL_REFS, "user_id", user_ids)) if user_ids else {}


class OnlineReader:
    """Feature references of one entity, read straight from the online store: the recall service's hot path.

    `get_online_features` resolves the references against the registry, checks the entity rows and builds a
    response table on every call, which costs more than the read itself for one user; here the feature views and
    the online store are resolved once, and each call is one `online_read` per view (on Redis, one pipeline on its
    asyncio client for all views), decoded from Feast's value protos. Values are what
    `get_online_features(...).to_dict()` gives, without the join key. The views' names and features are fixed by
    `feature_repo/`, so a later `features apply` does not change what this reads."""

    def __init__(self, store: FeatureStore, refs: Sequence[str], join_key: str):
        from feast.infra.online_stores.online_store import OnlineStore

        self.config, self.join_key = store.config, join_key
        self.online = store._get_provider().online_store
        by_view: dict[str, list[str]] = {}
        for ref in refs:
            view, name = ref.split(":")
            by_view.setdefault(view, []).append(name)
        self.views = [(store.get_feature_view(view), names) for view, names in by_view.items()]
        # Redis has its own asyncio client; SQLite, a local file, does not (its read runs in place)
        self.use_async = type(self.online).online_read_async is not OnlineStore.online_read_async
        self._redis_fields = None  # per view: (stored name, hash fields, names they decode to), timestamp last
        if self.config.online_store.type == "redis" and self.config.online_store.redis_type == "redis":
            from feast.infra.online_stores.redis import _versioned_fv_name

            self._redis_fields = []
            for view, names in self.views:
                stored = _versioned_fv_name(view, self.config)
                decoded, hset_keys = self.online._generate_hset_keys_for_features(view, list(names), fv_name_override=stored)
                self._redis_fields.append((stored, hset_keys, decoded))

    def _keys(self, ids: Sequence[str]) -> list[Any]:
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value

        return [EntityKey(join_keys=[self.join_key], entity_values=[Value(string_val=i)]) for i in ids]

    def _values(self, rows_per_view: Sequence[Sequence[tuple[Any, dict[str, Any] | None]]]) -> dict[str, list[Any]]:
        from feast.type_map import feast_value_type_to_python_type

        values: dict[str, list[Any]] = {}
        for (_, names), rows in zip(self.views, rows_per_view):
            for name in names:
                values[name] = [None if found is None or name not in found else
                                feast_value_type_to_python_type(found[name]) for _, found in rows]
        return values

    def read(self, ids: Sequence[str]) -> dict[str, list[Any]]:
        """Feature name -> values aligned with `ids` (None where an entity has no value)."""
        keys = self._keys(ids)
        with _online_store():  # a fresh list of names per call: Redis' online_read appends to it
            return self._values([self.online.online_read(self.config, view, keys, list(names))
                                 for view, names in self.views])

    async def read_async(self, ids: Sequence[str]) -> dict[str, list[Any]]:
        """`read` on the caller's event loop: through the store's asyncio client where it has one, else in place
        (a local SQLite read takes a fraction of a millisecond, less than handing it to a thread and back)."""
        if not self.use_async:
            return self.read(ids)
        keys = self._keys(ids)
        with _online_store():
            if self._redis_fields is not None:
                return self._values(await self._read_redis(keys))
            return self._values(await asyncio.gather(*(self.online.online_read_async(self.config, view, keys, list(names))
                                                       for view, names in self.views)))

    async def _read_redis(self, keys: Sequence[Any]) -> list[list[tuple[Any, dict[str, Any] | None]]]:
        """Every view of an entity sits in one Redis hash: one HMGET per entity for all views, in one pipeline
        (Feast's `online_read_async` makes one pipeline, so one round trip, per view). Uses the Redis store's
        key and field layout; `tests/test_features.py` checks it against `get_online_features` on a real Redis."""
        client = await self.online._get_client_async(self.config.online_store)
        redis_keys = self.online._generate_redis_keys_for_entities(self.config, keys)
        fields = [f for _, hset_keys, _ in self._redis_fields for f in hset_keys]
        async with client.pipeline(transaction=False) as pipe:
            for key in redis_keys:
                pipe.hmget(key, fields)
            replies = await pipe.execute()
        rows, start = [], 0
        for view_name, hset_keys, names in self._redis_fields:
            values = [reply[start:start + len(hset_keys)] for reply in replies]
            rows.append(self.online._convert_redis_values_to_protobuf(values, view_name, list(names)))
            start += len(hset_keys)
        return rows


def recall_reader(store: FeatureStore) -> OnlineReader:
    """The reader of `recall_view`: the recall lists and the profile summary of users."""
    return OnlineReader(store, RECALL_REFS + PROFILE_SUMMARY_REFS, "user_id")


async def recall_view(reader: OnlineReader, user_ids: Sequence[str]
                      ) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """The recall service's one online read (`reader` from `recall_reader`): `recall_lists` of `user_ids`, and per
    known user {"profile", "n_ads", "n_contents"} (the behaviour lists' lengths, not the lists)."""
    if not user_ids:
        return {}, {}
    values = await reader.read_async(user_ids)
    summaries = {u: {"profile": json.loads(profile) if profile else {}, "n_ads": int(n_ads or 0),
                     "n_contents": int(n_contents or 0)}
                 for u, profile, n_ads, n_contents in zip(user_ids, values["profile"], values["n_recent_ads"],
                                                          values["n_recent_contents"])
                 if profile is not None or n_ads is not None}
    return _recall_rows(user_ids, values), summaries


def push_recall_lists(store: FeatureStore, rows: list[dict[str, Any]]) -> None:
    """Publish recall lists: rows of {"user_id", "ad_ids", "scores", "model_version", "generated_at"?} (the
    generation time defaults to now). Raises ValueError naming the row and field of a malformed row."""
    if not rows:
        return
    now = dt.datetime.now(dt.timezone.utc)
    clean = []
    for i, row in enumerate(rows):
        missing = [c for c in RECALL_COLUMNS if c != "generated_at" and c not in row]
        if missing:
            raise ValueError(f"recall list row {i}: missing {', '.join(missing)}")
        if len(row["ad_ids"]) != len(row["scores"]):
            raise ValueError(f"recall list row {i} (user {row['user_id']!r}): {len(row['ad_ids'])} ad_ids but "
                             f"{len(row['scores'])} scores")
        clean.append({"user_id": str(row["user_id"]), "ad_ids": [str(a) for a in row["ad_ids"]],
                      "scores": [float(s) for s in row["scores"]], "model_version": str(row["model_version"]),
                      "generated_at": row.get("generated_at") or now})
    df = pd.DataFrame(clean, columns=list(RECALL_COLUMNS))
    df["generated_at"] = pd.to_datetime(df["generated_at"], utc=True)
    with _online_store():
        # The event timestamp is the generation time: Redis keeps the newer of two lists pushed out of order.
        store.push(RECALL_PUSH, df.assign(event_timestamp=df["generated_at"]))


def ad_status(store: FeatureStore, ad_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """ad_id -> {"active": bool, "ecpm": float}; ads the store does not know are absent."""
    if not ad_ids:
        return {}
    values = _online(store, AD_STATUS_REFS, "ad_id", ad_ids)
    return {a: {"active": bool(active), "ecpm": float(ecpm)}
            for a, active, ecpm in zip(ad_ids, values["active"], values["ecpm"]) if active is not None}


def set_ad_status(store: FeatureStore, ads_df: pd.DataFrame) -> None:
    """Write ads' status to the online store now: `ads_df` has ad_id, active and ecpm (pause, resume, new ads)."""
    missing = sorted({"ad_id", "active", "ecpm"} - set(ads_df.columns))
    if missing:
        raise ValueError(f"ad status: missing column(s) {', '.join(missing)}")
    df = ads_df[["ad_id", "active", "ecpm"]].astype({"ad_id": str, "active": bool, "ecpm": "float64"})
    df["event_timestamp"] = pd.Timestamp.now(tz="UTC")
    with _online_store():
        store.write_to_online_store("ad_status", df)
