"""Serving logic shared by the KServe predictors (DESIGN §5): request validation, the segment-popularity fallback,
the answer of the recall service, near-line batching and the refresh queue between the two services.

The predictors in `leadre.predictors` only load, parse and call into this module, so all of it is testable without
a server. Nothing here imports kserve (its import parses `sys.argv`).

- A *snapshot* is what a request reads: the bundle plus lookup tables derived from its catalogue (active ads,
  titles, categories) and the fallback popularity. Ad status changes and bundle reloads build a new snapshot and
  swap one reference, so a request in flight keeps the catalogue it started with.
- The fallback ranks ads by their share of positive interactions within the user's *segment*
  (`leadre.bundle.SegmentPopularity`): the bundle carries it, by the segment fields it was built with (default: the
  first profile field, e.g. `age_bucket`); serving with other `segment_fields` recomputes it from `--data`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from leadre.bundle import RecallBundle, SegmentPopularity
from leadre.prompts import UserHistory
from leadre.sid import SidTable

log = logging.getLogger(__name__)

LLM, FALLBACK = "llm", "fallback"
# Why a recall answer is or is not the user's LLM list (the `recall_list` field of an answer).
FRESH, MISSING, STALE, UNAVAILABLE = "fresh", "missing", "stale", "unavailable"


@dataclass(frozen=True)
class ServingSettings:
    """The `serving` section of a config file."""

    default_k: int = 10  # ads per user when a request gives no k
    max_k: int = 100
    max_users: int = 256  # users per request
    max_body_bytes: int = 1 << 20
    max_age_s: float = 86400.0  # a recall list older than this is stale
    status_poll_s: float = 5.0  # how often ad status is read from the feature store (0: never)
    segment_fields: tuple[str, ...] = ()  # profile fields of a fallback segment (default: the bundle's)
    list_length: int = 50  # ads per recall list the near-line side computes and publishes
    beam_width: int | None = None  # near-line beam width (default: the list length)
    max_batch: int = 32  # users per near-line model call
    max_wait_ms: float = 5.0  # how long the near-line batcher waits for more users
    refresh_batch: int = 64  # users per refresh request sent to the near-line service
    refresh_interval_s: float = 0.2
    refresh_ttl_s: float = 60.0  # a user queued for refresh is not queued again within this time
    refresh_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if not 1 <= self.default_k <= self.max_k:
            raise ValueError(f"default_k must be in 1..max_k ({self.max_k}), got {self.default_k}")
        for name in ("max_users", "max_body_bytes", "list_length", "max_batch", "refresh_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


class RequestError(ValueError):
    """A bad request: answered with a 4xx whose JSON names the offending field."""

    def __init__(self, field_name: str, problem: str, status: int = 400):
        super().__init__(f"{field_name}: {problem}")
        self.field = field_name
        self.problem = problem
        self.status = status

    def payload(self) -> dict[str, str]:
        return {"error": str(self), "field": self.field}


@dataclass(frozen=True)
class Query:
    user_id: str
    k: int


def _check_k(where: str, value: Any, max_k: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(where, f"expected an integer, got {value!r}")
    if not 1 <= value <= max_k:
        raise RequestError(where, f"must be in 1..{max_k}, got {value}")
    return value


def _check_user(where: str, value: Any) -> str:
    if not isinstance(value, str) or not value or len(value) > 256:
        raise RequestError(where, f"expected a non-empty string of at most 256 characters, got {value!r}")
    return value


def _check_count(where: str, n: int, max_users: int) -> None:
    if n == 0:
        raise RequestError(where, "no users given")
    if n > max_users:
        raise RequestError(where, f"{n} users in one request, at most {max_users}", status=413)


def parse_v1(body: Any, default_k: int, max_k: int, max_users: int) -> list[Query]:
    """`{"instances": [{"user_id": "u1", "k": 10}, ...]}` → queries; a RequestError names the first bad field."""
    if not isinstance(body, dict):
        raise RequestError("body", f"expected a JSON object with 'instances', got {type(body).__name__}")
    unknown = sorted(set(body) - {"instances"})
    if unknown:
        raise RequestError(unknown[0], "unknown field (expected only 'instances')")
    if "instances" not in body:
        raise RequestError("instances", "missing")
    instances = body["instances"]
    if not isinstance(instances, list):
        raise RequestError("instances", f"expected a list, got {type(instances).__name__}")
    _check_count("instances", len(instances), max_users)
    queries = []
    for i, instance in enumerate(instances):
        where = f"instances[{i}]"
        if not isinstance(instance, dict):
            raise RequestError(where, f"expected an object, got {type(instance).__name__}")
        unknown = sorted(set(instance) - {"user_id", "k"})
        if unknown:
            raise RequestError(f"{where}.{unknown[0]}", "unknown field (expected user_id, k)")
        if "user_id" not in instance:
            raise RequestError(f"{where}.user_id", "missing")
        user = _check_user(f"{where}.user_id", instance["user_id"])
        k = _check_k(f"{where}.k", instance.get("k", default_k), max_k)
        queries.append(Query(user, k))
    return queries


@dataclass(frozen=True)
class Tensor:
    """A V2 input tensor as the predictors hand it over (kserve's InferInput, without kserve)."""

    name: str
    datatype: str
    shape: list[int]
    data: list[Any]


def parse_v2(inputs: Sequence[Tensor], default_k: int, max_k: int, max_users: int) -> list[Query]:
    """V2 inputs `user_id` (BYTES, shape [n]) and optional `k` (an integer type, shape [1] or [n]) → queries."""
    by_name = {t.name: t for t in inputs}
    unknown = sorted(set(by_name) - {"user_id", "k"})
    if unknown:
        raise RequestError(f"inputs.{unknown[0]}", "unknown input (expected user_id, k)")
    if "user_id" not in by_name:
        raise RequestError("inputs.user_id", "missing")
    users = by_name["user_id"]
    if users.datatype != "BYTES":
        raise RequestError("inputs.user_id.datatype", f"expected BYTES, got {users.datatype}")
    data = users.data if isinstance(users.data, list) else [users.data]
    if len(users.shape) != 1 or users.shape[0] != len(data):
        raise RequestError("inputs.user_id.shape", f"expected [{len(data)}] for {len(data)} ids, got {users.shape}")
    _check_count("inputs.user_id", len(data), max_users)
    ids = [_check_user(f"inputs.user_id.data[{i}]", u.decode() if isinstance(u, bytes) else u)
           for i, u in enumerate(data)]
    ks = [default_k] * len(ids)
    if "k" in by_name:
        k = by_name["k"]
        if not (k.datatype.startswith("INT") or k.datatype.startswith("UINT")):
            raise RequestError("inputs.k.datatype", f"expected an integer type such as INT32, got {k.datatype}")
        values = k.data if isinstance(k.data, list) else [k.data]
        if len(values) not in (1, len(ids)):
            raise RequestError("inputs.k.shape", f"expected [1] or [{len(ids)}], got {k.shape}")
        ks = [_check_k(f"inputs.k.data[{i}]", v, max_k) for i, v in enumerate(values)]
        ks = ks * len(ids) if len(ks) == 1 else ks
    return [Query(u, k) for u, k in zip(ids, ks)]


@dataclass(frozen=True)
class Snapshot:
    """What one request reads; replaced as a whole (one reference assignment) on a status change or reload."""

    bundle: RecallBundle
    popularity: SegmentPopularity
    active: frozenset[str]
    titles: dict[str, str]
    categories: dict[str, str]

    @classmethod
    def build(cls, bundle: RecallBundle, popularity: SegmentPopularity) -> Snapshot:
        ads = bundle.ads
        return cls(bundle, popularity, frozenset(ads.index[ads["active"].astype(bool)]),
                   dict(zip(ads["ad_id"], ads["title"])), dict(zip(ads["ad_id"], ads["category"])))

    @property
    def model_version(self) -> str:
        return self.bundle.model_version

    def with_status(self, ads: pd.DataFrame, sids: SidTable | None = None) -> Snapshot:
        return Snapshot.build(self.bundle.with_status(ads, sids), self.popularity)


def load_popularity(bundle: RecallBundle, data_dir: str | Path | None, configured: Sequence[str]) -> SegmentPopularity:
    """The fallback: the bundle's own; recounted from the training data directory when one is given (required for
    `configured` segment fields other than the bundle's)."""
    if data_dir is None:
        if configured and tuple(configured) != bundle.popularity.fields:
            raise ValueError(f"segment fields {list(configured)}: the bundle's fallback is by "
                             f"{list(bundle.popularity.fields)}; serve with --data DIR to recount it, or configure "
                             "the bundle's fields")
        return bundle.popularity
    from leadre.schema import read_data_dir

    # a bundle built before it carried its fallback: the first profile field, as `leadre bundle` defaults to
    fields = tuple(configured) or bundle.popularity.fields or tuple(bundle.manifest.get("profile_fields", [])[:1])
    tables = read_data_dir(data_dir, validate=False)
    return SegmentPopularity.from_data(tables.users, tables.events, bundle.positive_actions, fields,
                                       bundle.ads.reset_index(drop=True))


def status_changes(bundle: RecallBundle, status: dict[str, dict[str, Any]]) -> pd.DataFrame | None:
    """The rows of `status` (ad_id → {active, ecpm}, as the feature store holds it) that differ from the bundle's
    catalogue, as a frame for `RecallBundle.with_status`; None when nothing changed. Ads the bundle does not know
    are ignored here: a new ad needs its S-ID (`POST /leadre/admin/reload` with `sids` and `ads`)."""
    rows = [(a, bool(s["active"]), float(s["ecpm"])) for a, s in status.items() if a in bundle.ads.index]
    if not rows:
        return None
    new = pd.DataFrame(rows, columns=["ad_id", "active", "ecpm"]).set_index("ad_id", drop=False)
    old = bundle.ads.loc[new.index]
    changed = (new["active"] != old["active"].astype(bool)) | ~pd.Series(
        [math.isclose(a, b, rel_tol=1e-6) for a, b in zip(new["ecpm"], old["ecpm"].astype(float))], index=new.index)
    return new[changed].reset_index(drop=True) if changed.any() else None


def recall_answer(snapshot: Snapshot, query: Query, row: dict[str, Any] | None, profile: dict[str, Any] | None,
                  max_age_s: float, now: float, store_ok: bool = True) -> dict[str, Any]:
    """One user's recall answer: the active ads of a fresh LLM list, topped up from the segment fallback.

    `row` is the user's recall list from the feature store (None when absent); it is used only when it was made by
    the bundle's model and is at most `max_age_s` old. The answer's `recall_list` says which (fresh, missing,
    stale, unavailable: the store could not be read); missing and stale users are for the near-line side."""
    if not store_ok:
        status = UNAVAILABLE
    elif row is None or not row.get("ad_ids"):
        status = MISSING
    elif row.get("model_version") != snapshot.model_version or now - _timestamp(row.get("generated_at")) > max_age_s:
        status = STALE
    else:
        status = FRESH
    ranked: list[tuple[str, float, str]] = []
    if status == FRESH:
        for ad, score in zip(row["ad_ids"], row["scores"]):
            if ad in snapshot.active:
                ranked.append((ad, float(score), LLM))
                if len(ranked) == query.k:
                    break
    if len(ranked) < query.k:
        taken = {a for a, _, _ in ranked}
        fallback = snapshot.popularity.top(profile, query.k - len(ranked), snapshot.active, taken)
        ranked += [(a, s, FALLBACK) for a, s in fallback]
    ads = [{"ad_id": a, "title": snapshot.titles.get(a, ""), "score": s, "rank": r, "source": src}
           for r, (a, s, src) in enumerate(ranked, 1)]
    return {"user_id": query.user_id, "model_version": snapshot.model_version, "recall_list": status, "ads": ads}


def _timestamp(value: Any) -> float:
    """Seconds since the epoch from what a feature store returns for `generated_at` (datetime, number or text)."""
    if value is None:
        return -math.inf
    if isinstance(value, (int, float)):
        return float(value)
    ts = pd.Timestamp(value)
    if ts.tzinfo is None:
        ts = ts.tz_localize("UTC")
    return ts.timestamp()


def history_from_features(bundle: RecallBundle, user_id: str, features: dict[str, Any]) -> tuple[UserHistory, int]:
    """A user's history from feature-store lists (profile, recent positive ads, recent contents; oldest first).
    Items the bundle does not know (ads created after it was built) are skipped and counted, as in
    `leadre.bundle.history_from_events`."""
    ads = list(features.get("ads") or [])
    contents = list(features.get("contents") or [])
    kept_ads = [a for a in ads if a in bundle.prompt_catalogue.sid]
    kept_contents = [c for c in contents if c in bundle.prompt_catalogue.content_label]
    profile = {k: str(v) for k, v in (features.get("profile") or {}).items()}
    skipped = len(ads) - len(kept_ads) + len(contents) - len(kept_contents)
    return UserHistory(user_id, profile, kept_ads, kept_contents), skipped


def log_record(model: str, answer: dict[str, Any], profile: dict[str, Any] | None, n_ads: int, n_contents: int,
               categories: dict[str, str]) -> dict[str, Any]:
    """One request-log record (`leadre.monitor.RECORD_FIELDS`; the log stamps the time) for an answered user."""
    ads = [a["ad_id"] for a in answer["ads"]]
    sources = {a["source"] for a in answer["ads"]}
    return {"model": model, "model_version": answer["model_version"], "user_id": answer["user_id"],
            "profile": {k: str(v) for k, v in (profile or {}).items()}, "n_ads": n_ads, "n_contents": n_contents,
            "ads": ads, "categories": [categories.get(a, "") for a in ads],
            "source": LLM if sources == {LLM} else FALLBACK}


@dataclass
class Batcher:
    """Gathers the users of concurrent requests into batches of at most `max_batch`, waiting at most `max_wait_s`
    for a batch to fill, and runs `fn` on each batch in `executor` (never on the event loop: a model call there
    would stall every other request and the health checks, kserve#3950). `fn` maps user ids to one result each."""

    fn: Callable[[list[str]], dict[str, Any]]
    executor: Executor
    max_batch: int
    max_wait_s: float
    _queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    batches: list[int] = field(default_factory=list)  # sizes of the last batches run (for tests and metrics)

    async def submit(self, user_ids: Sequence[str]) -> list[Any]:
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in user_ids]
        for user, future in zip(user_ids, futures):
            self._queue.put_nowait((user, future))
        return list(await asyncio.gather(*futures))

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            try:
                first = await asyncio.wait_for(self._queue.get(), timeout=0.5)
            except TimeoutError:
                continue
            batch = [first]
            deadline = loop.time() + self.max_wait_s
            while len(batch) < self.max_batch:
                if not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), timeout=remaining))
                except TimeoutError:
                    break
            users = list(dict.fromkeys(u for u, _ in batch))
            self.batches = (self.batches + [len(users)])[-100:]
            try:
                results = await loop.run_in_executor(self.executor, self.fn, users)
            except Exception as e:  # every waiting request gets the error; the batcher keeps running
                for _, future in batch:
                    if not future.done():
                        future.set_exception(e)
                continue
            for user, future in batch:
                if not future.done():
                    future.set_result(results[user])


class RefreshQueue:
    """Users whose recall list is missing or stale, sent in batches to the near-line service
    (`POST {url}/v1/models/nearline:predict`) by a background task. `offer` never blocks a request: it adds to an
    in-memory set. A user is not offered again within `ttl_s`; a failed send is logged and dropped (the user's next
    request queues them again once the ttl has passed)."""

    def __init__(self, url: str | None, batch: int, interval_s: float, ttl_s: float, timeout_s: float):
        self.url = url.rstrip("/") + "/v1/models/nearline:predict" if url else None
        self.batch, self.interval_s, self.ttl_s, self.timeout_s = batch, interval_s, ttl_s, timeout_s
        self._pending: OrderedDict[str, None] = OrderedDict()
        self._recent: dict[str, float] = {}
        self.sent = 0
        self.failed = 0

    def offer(self, user_id: str, now: float) -> bool:
        """Queue a user; False when refreshing is off or the user was queued within the ttl."""
        if self.url is None or now - self._recent.get(user_id, -math.inf) < self.ttl_s:
            return False
        self._recent[user_id] = now
        self._pending[user_id] = None
        if len(self._recent) > 100_000:  # forget users queued long ago, so the map stays bounded
            self._recent = {u: t for u, t in self._recent.items() if now - t < self.ttl_s}
        return True

    def take(self) -> list[str]:
        users = []
        while self._pending and len(users) < self.batch:
            users.append(self._pending.popitem(last=False)[0])
        return users

    async def run(self, stop: asyncio.Event) -> None:
        if self.url is None:
            return
        import httpx

        async with httpx.AsyncClient(timeout=self.timeout_s) as client:
            while not stop.is_set():
                users = self.take()
                if not users:
                    await asyncio.sleep(self.interval_s)
                    continue
                try:
                    r = await client.post(self.url, json={"instances": [{"user_id": u} for u in users]})
                    r.raise_for_status()
                    self.sent += len(users)
                except httpx.HTTPError as e:
                    self.failed += len(users)
                    log.warning("refresh of %d users via %s failed: %s", len(users), self.url, e)


def free_port() -> int:
    import socket

    with socket.socket() as s:  # the kernel picks a free port; the server binds it right after
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A `leadre serve` subprocess on a free loopback port (tests, benchmarks): `start()` waits until the model
    is ready; output goes to `log_file`; `stop()` terminates it."""

    def __init__(self, service: str, args: Sequence[str], log_file: str | Path, env: dict[str, str] | None = None,
                 port: int | None = None):
        self.service, self.args, self.log_file, self.env = service, list(args), Path(log_file), env
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = None

    def start(self, timeout: float = 300.0) -> ServerProcess:
        import os
        import subprocess
        import sys

        import httpx

        command = [sys.executable, "-m", "leadre.cli", "serve", self.service, "--port", str(self.port), *self.args]
        env = os.environ | {"HF_HUB_OFFLINE": "1"} | (self.env or {})
        with open(self.log_file, "ab") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"`leadre serve {self.service}` exited with {self.process.returncode}; "
                                   f"its output:\n{self.log_file.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/v2/models/{self.service}/ready", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"`leadre serve {self.service}` not ready after {timeout:.0f}s; see {self.log_file}")

    def stop(self) -> None:
        import subprocess

        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
