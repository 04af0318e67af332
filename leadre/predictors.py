"""The KServe predictors (DESIGN §5): `recall` (latency-sensitive) and `nearline` (latency-tolerant), each a
`kserve.Model` run by `kserve.ModelServer` (`leadre serve recall|nearline`; `serving/` holds thin entry points).

Predictors only load, parse requests and call `leadre.serving`. Neither blocks the event loop: recall reads the
online store on the loop through Feast's asyncio client (Redis) or in place (SQLite, a local file: cheaper than a
thread hand-off under the GIL), the near-line model runs in one dedicated thread behind its batcher (kserve#3950),
ad-status polls in a small thread pool.

Routes besides KServe's V1/V2 ones:
- `POST /leadre/admin/reload` `{"bundle"?: DIR, "sids"?: DIR, "ads"?: PATH}`: reload the bundle (the same
  directory when not given) and/or add new ads (`sids`: the `sids assign` artifact that gave them S-IDs, `ads`:
  their catalogue rows as `sids assign --ads` reads them, plus `ecpm` and `active`), re-apply the feature store's
  ad status, swap in one reference. Requests in flight finish on the snapshot they started with.
- `GET /leadre/admin/status`: model version, active ads, refresh and batching counters.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import time
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson
import uvloop
from fastapi import Request, Response
from fastapi.exceptions import FastAPIDeprecationWarning, RequestValidationError

from leadre import features
from leadre.bundle import RecallBundle
from leadre.serving import (
    LLM, MISSING, STALE, Batcher, Query, RefreshQueue, RequestError, ServingSettings, Snapshot, Tensor,
    history_from_features, load_popularity, log_record, parse_v1, parse_v2, recall_answer,
    status_changes,
)

log = logging.getLogger(__name__)
ADMIN = "/leadre/admin"


def _kserve():
    """Import kserve with an empty command line: its module-level parser reads `sys.argv` and would take
    abbreviations of its own flags (`--config` for `--configure_logging`) from the `leadre serve` command line."""
    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        import kserve
        import kserve.model_server
    finally:
        sys.argv = argv
    return kserve


kserve = _kserve()
from kserve import InferOutput, InferRequest, InferResponse  # noqa: E402
from prometheus_client import Counter  # noqa: E402

ANSWERS = Counter("leadre_answers", "Answered users by predictor and source of their ads", ["model", "source"])
STORE_ERRORS = Counter("leadre_feature_store_errors", "Feature-store reads or writes that failed", ["model"])
REFRESH_QUEUED = Counter("leadre_refresh_queued", "Users queued for a near-line refresh")


class Predictor(kserve.Model):
    """What both predictors share: the bundle snapshot, the feature store, ad-status polling, reloads, V1/V2."""

    def __init__(self, name: str, bundle: str | Path, feature_repo: str | Path, production: bool = False,
                 settings: ServingSettings = ServingSettings(), data_dir: str | Path | None = None,
                 log_dir: str | Path | None = None, device: str = "auto", backend: str = "auto"):
        super().__init__(name)
        self.bundle_dir, self.feature_repo, self.production = Path(bundle), Path(feature_repo), production
        self.settings, self.data_dir, self.log_dir = settings, data_dir, log_dir
        self.device, self.backend = device, backend
        self.engine = True  # start_engine runs the background loops on the server's event loop
        self.snapshot: Snapshot | None = None
        self.store = None
        self.request_log = None
        self.io = ThreadPoolExecutor(max_workers=4, thread_name_prefix=f"{name}-io")
        self._stop: asyncio.Event | None = None
        self._swap = asyncio.Lock()

    # --- loading and swapping ------------------------------------------------------------------------------------

    def _load_bundle(self, path: Path) -> RecallBundle:
        return RecallBundle.load(path, device=self.device, backend=self.backend)

    def _snapshot_of(self, bundle: RecallBundle) -> Snapshot:
        return self._apply_status(Snapshot.build(bundle, load_popularity(bundle, self.data_dir,
                                                                         self.settings.segment_fields)))

    def _apply_status(self, snapshot: Snapshot) -> Snapshot:
        """`snapshot` with the feature store's current ad status (unchanged when the store is unavailable)."""
        try:
            status = features.ad_status(self.store, list(snapshot.bundle.ads.index))
        except features.FeatureStoreUnavailable as e:
            STORE_ERRORS.labels(self.name).inc()
            log.warning("%s: ad status not refreshed: %s", self.name, e)
            return snapshot
        changes = status_changes(snapshot.bundle, status)
        return snapshot if changes is None else snapshot.with_status(changes)

    def load(self) -> bool:
        self.store = features.open_store(self.feature_repo, self.production)
        self.snapshot = self._snapshot_of(self._load_bundle(self.bundle_dir))
        if self.log_dir is not None:
            from leadre.monitor import RequestLog

            self.request_log = RequestLog(self.log_dir, self.name)
        log.info("%s: bundle %s (%s), %d active ads", self.name, self.bundle_dir, self.snapshot.model_version,
                 len(self.snapshot.active))
        self.ready = True
        return self.ready

    async def reload(self, bundle: str | None = None, sids: str | None = None, ads: str | None = None) -> dict:
        """The admin route: load in a worker thread, then swap the snapshot in one assignment."""
        if (sids is None) != (ads is None):
            raise RequestError("sids" if sids is None else "ads", "new ads need both 'sids' and 'ads'")
        for name, value in (("bundle", bundle), ("sids", sids), ("ads", ads)):
            if value is not None and (not isinstance(value, str) or not Path(value).exists()):
                raise RequestError(name, f"expected an existing path, got {value!r}")
        loop = asyncio.get_running_loop()
        async with self._swap:
            if bundle is not None or sids is None:
                path = Path(bundle) if bundle else self.bundle_dir
                try:
                    snapshot = await loop.run_in_executor(None, lambda: self._snapshot_of(self._load_bundle(path)))
                except (ValueError, OSError) as e:  # not a bundle, or a damaged one: the old one keeps serving
                    raise RequestError("bundle", str(e)) from None
                self.bundle_dir = path
            else:
                snapshot = self.snapshot
            if sids is not None:
                snapshot = await loop.run_in_executor(None, _with_new_ads, self, snapshot, sids, ads)
            self.snapshot = snapshot
        return self.describe()

    def describe(self) -> dict[str, Any]:
        return {"model": self.name, "model_version": self.snapshot.model_version, "bundle": str(self.bundle_dir),
                "ads": len(self.snapshot.bundle.ads), "active_ads": len(self.snapshot.active)}

    async def start_engine(self) -> None:
        """Background loops; they end when the server unloads the model (stop_engine)."""
        self._stop = asyncio.Event()
        self.ready = True
        await asyncio.gather(self._poll_status(), *self.background())

    def background(self) -> list:
        return []

    def stop_engine(self) -> None:
        if self._stop is not None:
            self._stop.set()
        self.ready = False

    async def _poll_status(self) -> None:
        if self.settings.status_poll_s <= 0:
            return
        loop = asyncio.get_running_loop()
        while not self._stop.is_set():
            await asyncio.sleep(self.settings.status_poll_s)
            async with self._swap:
                current = self.snapshot
                updated = await loop.run_in_executor(self.io, self._apply_status, current)
                if updated is not current:
                    self.snapshot = updated
                    log.info("%s: ad status changed: %d active ads", self.name, len(updated.active))

    # --- requests --------------------------------------------------------------------------------------------------

    def _parse(self, payload: Any, max_k: int) -> tuple[list[Query], InferRequest | None]:
        s = self.settings
        if isinstance(payload, InferRequest):
            inputs = [Tensor(i.name, i.datatype, list(i.shape), i.data) for i in payload.inputs]
            return parse_v2(inputs, min(s.default_k, max_k), max_k, s.max_users), payload
        if isinstance(payload, (bytes, str)):  # V1 with a content type KServe does not decode
            try:
                payload = orjson.loads(payload)
            except orjson.JSONDecodeError as e:
                raise RequestError("body", f"not valid JSON ({e})") from None
        return parse_v1(payload, min(s.default_k, max_k), max_k, s.max_users), None

    def _respond(self, answers: list[dict[str, Any]], request: InferRequest | None, user_output: str):
        if request is None:
            return {"predictions": answers}
        return v2_response(self.name, answers, request, user_output)

    def _log(self, records: list[dict[str, Any]]) -> None:
        for record in records:
            ANSWERS.labels(self.name, record["source"]).inc()
            if self.request_log is not None:
                self.request_log.log(record)


def _with_new_ads(predictor: Predictor, snapshot: Snapshot, sids_dir: str, ads_path: str) -> Snapshot:
    """New ads (rows of `ads_path` the bundle does not know) with S-IDs from `sids_dir`, then the store's status."""
    from leadre.semantic_ids import read_ads_file
    from leadre.sid import load_sid_table

    try:
        ads = read_ads_file(ads_path)
        new = ads[~ads["ad_id"].isin(snapshot.bundle.ads.index)]
        snapshot = snapshot.with_status(new, load_sid_table(sids_dir))
    except (ValueError, FileNotFoundError) as e:
        raise RequestError("ads", str(e)) from None
    return predictor._apply_status(snapshot)


def v2_response(model: str, answers: list[dict[str, Any]], request: InferRequest, user_output: str) -> InferResponse:
    """V2 tensors: per ad `ad_id`, `title`, `source` (BYTES), `score` (FP64), `rank` (INT32), shape [users, k]
    with k the longest answer (shorter ones padded with "", 0.0, 0); per user `user_output` (BYTES, [users])."""
    import numpy as np

    n, k = len(answers), max((len(a["ads"]) for a in answers), default=0)

    def grid(key: str, pad: Any, dtype: Any) -> np.ndarray:
        return np.array([[ad[key] for ad in a["ads"]] + [pad] * (k - len(a["ads"])) for a in answers],
                        dtype=dtype).reshape(n, k)

    outputs = [InferOutput("ad_id", [n, k], "BYTES", grid("ad_id", "", object).tolist()),
               InferOutput("title", [n, k], "BYTES", grid("title", "", object).tolist()),
               InferOutput("score", [n, k], "FP64", grid("score", 0.0, np.float64).tolist()),
               InferOutput("rank", [n, k], "INT32", grid("rank", 0, np.int32).tolist()),
               InferOutput("source", [n, k], "BYTES", grid("source", "", object).tolist()),
               InferOutput(user_output, [n], "BYTES", [str(a[user_output]) for a in answers])]
    for output in outputs:  # the V2 JSON form is flat, row-major
        output.data = np.asarray(output.data, dtype=object if output.datatype == "BYTES" else None).ravel().tolist()
    # KServe answers 500 when the response id is None: echo the request's id or make one.
    return InferResponse(request.id or str(uuid.uuid4()), model, outputs,
                         model_version=answers[0]["model_version"] if answers else None)


class RecallModel(Predictor):
    """`recall`: top-k active ads from the user's near-line recall list, else the segment fallback."""

    def __init__(self, *args: Any, nearline_url: str | None = None, **kwargs: Any):
        super().__init__("recall", *args, **kwargs)
        s = self.settings
        self.refresh = RefreshQueue(nearline_url, s.refresh_batch, s.refresh_interval_s, s.refresh_ttl_s,
                                    s.refresh_timeout_s)

    def background(self) -> list:
        return [self.refresh.run(self._stop)]

    async def preprocess(self, payload: Any, headers: dict[str, str] | None = None):
        return self._parse(payload, self.settings.max_k)

    def load(self) -> bool:
        super().load()
        self.reader = features.recall_reader(self.store)
        return self.ready

    async def predict(self, payload: tuple[list[Query], InferRequest | None], headers: dict[str, str] | None = None):
        queries, request = payload
        snapshot = self.snapshot
        users = list(dict.fromkeys(q.user_id for q in queries))
        try:
            lists, feats = await features.recall_view(self.reader, users)
            ok = True
        except features.FeatureStoreUnavailable as e:
            STORE_ERRORS.labels(self.name).inc()
            log.warning("recall: feature store unavailable, answering from the fallback: %s", e)
            lists, feats, ok = {}, {}, False
        now = time.time()
        answers, records = [], []
        for q in queries:
            user = feats.get(q.user_id, {})
            answer = recall_answer(snapshot, q, lists.get(q.user_id), user.get("profile"), self.settings.max_age_s,
                                   now, ok)
            # Missing and stale lists are refreshed; with the store unavailable the near-line side cannot read it.
            if answer["recall_list"] in (MISSING, STALE) and self.refresh.offer(q.user_id, now):
                REFRESH_QUEUED.inc()
            answers.append(answer)
            records.append(log_record(self.name, answer, user.get("profile"), user.get("n_ads", 0),
                                      user.get("n_contents", 0), snapshot.categories))
        self._log(records)
        return self._respond(answers, request, "recall_list")

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"refresh_url": self.refresh.url, "refresh_sent": self.refresh.sent,
                                     "refresh_failed": self.refresh.failed}


class NearlineModel(Predictor):
    """`nearline`: users → Feast features → prompt → trie-constrained search → ads; published to Feast."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__("nearline", *args, **kwargs)
        s = self.settings
        # One model thread: batches run one after another, concurrent requests queue up and batch together.
        self.model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nearline-model")
        self.batcher = Batcher(self._recall_batch, self.model_thread, s.max_batch, s.max_wait_ms / 1000)

    def background(self) -> list:
        return [self.batcher.run(self._stop)]

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"batches": self.batcher.batches}

    async def preprocess(self, payload: Any, headers: dict[str, str] | None = None):
        return self._parse(payload, self.settings.list_length)

    def _recall_batch(self, users: list[str]) -> dict[str, dict[str, Any]]:
        """Runs in the model thread: read features, search, publish. Unknown users get no list."""
        snapshot = self.snapshot
        try:
            feats = features.user_features(self.store, users)
        except features.FeatureStoreUnavailable as e:
            STORE_ERRORS.labels(self.name).inc()
            raise RequestError("feature_store", f"unavailable: {e}", status=503) from None
        known = [u for u in users if u in feats]
        histories = [history_from_features(snapshot.bundle, u, feats[u])[0] for u in known]
        lists = snapshot.bundle.recall(histories, self.settings.list_length, self.settings.beam_width) if known else []
        rows = [{"user_id": u, "ad_ids": [a for a, _ in ads], "scores": [s for _, s in ads],
                 "model_version": snapshot.model_version} for u, ads in zip(known, lists)]
        published = True
        try:
            features.push_recall_lists(self.store, rows)
        except features.FeatureStoreUnavailable as e:
            STORE_ERRORS.labels(self.name).inc()
            log.warning("nearline: recall lists not published: %s", e)
            published = False
        out = {u: {"ads": [], "found": False, "published": False, "feats": {}, "snapshot": snapshot} for u in users}
        for u, ads in zip(known, lists):
            out[u] = {"ads": ads, "found": True, "published": published, "feats": feats[u], "snapshot": snapshot}
        return out

    async def predict(self, payload: tuple[list[Query], InferRequest | None], headers: dict[str, str] | None = None):
        queries, request = payload
        results = await self.batcher.submit([q.user_id for q in queries])
        answers, records = [], []
        for q, result in zip(queries, results):
            snapshot = result["snapshot"]  # the one the list was searched with
            ads = [{"ad_id": a, "title": snapshot.titles.get(a, ""), "score": s, "rank": r, "source": LLM}
                   for r, (a, s) in enumerate(result["ads"][:q.k], 1)]
            status = ("unknown_user" if not result["found"] else
                      "published" if result["published"] else "not_published")
            answer = {"user_id": q.user_id, "model_version": snapshot.model_version, "status": status, "ads": ads}
            answers.append(answer)
            if result["found"]:
                f = result["feats"]
                records.append(log_record(self.name, answer, f.get("profile"), len(f.get("ads", [])),
                                          len(f.get("contents", [])), snapshot.categories))
        self._log(records)
        return self._respond(answers, request, "status")


class RequestGuard:
    """ASGI middleware in front of KServe: an oversized body gets 413 and malformed JSON 400, each with a JSON
    error naming the field, before any parsing (KServe's own answer to bad JSON names no field)."""

    def __init__(self, app: Any, max_body_bytes: int):
        self.app, self.max_body_bytes = app, max_body_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        too_big = RequestError("body", f"larger than {self.max_body_bytes} bytes", status=413)
        if int(headers.get(b"content-length", b"0") or 0) > self.max_body_bytes:
            return await _send_error(send, too_big)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                return await _send_error(send, too_big)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        content_type = headers.get(b"content-type", b"application/json")
        if b"json" in content_type:
            try:
                orjson.loads(body)
            except orjson.JSONDecodeError as e:
                return await _send_error(send, RequestError("body", f"not valid JSON ({e})"))
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


async def _send_error(send: Any, error: RequestError) -> None:
    body = orjson.dumps(error.payload())
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _install_routes(app: Any, model: Predictor) -> None:
    def json(content: Any, status: int = 200) -> Response:
        return Response(orjson.dumps(content), status_code=status, media_type="application/json")

    async def request_error(_: Request, e: RequestError) -> Response:
        return json(e.payload(), e.status)

    async def validation_error(_: Request, e: RequestValidationError) -> Response:
        # FastAPI's schema check of a V2 body. Its location starts with "body" and, the body being a Union, the
        # model's name (InferenceRequest); the field is what follows, e.g. "inputs[0].datatype".
        first = e.errors()[0] if e.errors() else {"loc": ("body",), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p != "body" and not str(p)[:1].isupper()] or ["body"]
        field_name = "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in loc).lstrip(".")
        return json({"error": f"{field_name}: {first.get('msg')}", "field": field_name}, 422)

    async def reload(request: Request) -> Response:
        body = orjson.loads(await request.body() or b"{}")
        if not isinstance(body, dict):
            raise RequestError("body", "expected a JSON object")
        unknown = sorted(set(body) - {"bundle", "sids", "ads"})
        if unknown:
            raise RequestError(unknown[0], "unknown field (expected bundle, sids, ads)")
        return json(await model.reload(**body))

    async def status() -> Response:
        return json(model.describe())

    app.add_exception_handler(RequestError, request_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_api_route(f"{ADMIN}/reload", reload, methods=["POST"])
    app.add_api_route(f"{ADMIN}/status", status, methods=["GET"])
    app.add_middleware(RequestGuard, max_body_bytes=model.settings.max_body_bytes)


def serve(model: Predictor, port: int = 8080) -> None:
    """Load `model` and run it under `kserve.ModelServer` on `port` (HTTP only) until stopped."""
    model.load()
    # Everything loaded so far (torch, transformers, the bundle) lives as long as the process: frozen out of the
    # garbage collector's reach, a full collection no longer walks it in the middle of a request.
    gc.collect()
    gc.freeze()
    server = kserve.ModelServer(http_port=port, enable_grpc=False, workers=1, enable_latency_logging=False)
    # One line per request (uvicorn's access log, KServe's timing trace, httpx's refresh posts) costs more than a
    # recall answer.
    for name in ("uvicorn.access", "kserve.trace", "httpx"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # KServe 0.21 answers through FastAPI's ORJSONResponse, which this FastAPI deprecates with a warning per response.
    warnings.filterwarnings("ignore", category=FastAPIDeprecationWarning)
    _install_routes(kserve.model_server.app, model)
    # KServe runs its server with asyncio.run, on the default loop policy whatever uvicorn's loop setting says;
    # uvloop's loop and transports take about a tenth off the CPU time of a recall answer.
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.set_event_loop(asyncio.new_event_loop())  # ModelServer.start asks for the current loop before it runs
    server.start([model])
