"""Serving (DESIGN §5): the recall and near-line KServe predictors as real `leadre serve` processes on loopback,
over the tiny bundle and a Feast repository (SQLite online store; a real redis-server for the outage test).
Unit tests of the pure logic (validation, fallback ranking, batching, refresh queue) use small fakes."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import pandas as pd
import pytest

from leadre import features
from leadre.bundle import SegmentPopularity, segment_shares
from leadre.serving import (
    Batcher, Query, RefreshQueue, RequestError, ServerProcess, Snapshot, Tensor, parse_v1, parse_v2,
    recall_answer,
)

SERVING_CONFIG = """
serving:
  status_poll_s: 0.5
  refresh_interval_s: 0.05
  max_wait_ms: 20
"""

# --- unit tests of the pure logic ----------------------------------------------------------------------------------


@pytest.mark.parametrize("body, field", [
    ([], "body"),
    ({}, "instances"),
    ({"instances": {}}, "instances"),
    ({"instances": []}, "instances"),
    ({"instances": [{"k": 3}]}, "instances[0].user_id"),
    ({"instances": [{"user_id": 7}]}, "instances[0].user_id"),
    ({"instances": [{"user_id": "u1", "k": "5"}]}, "instances[0].k"),
    ({"instances": [{"user_id": "u1", "k": 0}]}, "instances[0].k"),
    ({"instances": [{"user_id": "u1", "k": 101}]}, "instances[0].k"),
    ({"instances": [{"user_id": "u1", "k": True}]}, "instances[0].k"),
    ({"instances": [{"user_id": "u1", "top": 3}]}, "instances[0].top"),
    ({"instances": [{"user_id": "u1"}], "extra": 1}, "extra"),
    ({"instances": [{"user_id": "u1"}] * 300}, "instances"),
])
def test_v1_validation_names_the_field(body, field):
    with pytest.raises(RequestError) as e:
        parse_v1(body, default_k=10, max_k=100, max_users=256)
    assert e.value.field == field and e.value.payload()["field"] == field


def test_v1_and_v2_parse():
    assert parse_v1({"instances": [{"user_id": "a", "k": 3}, {"user_id": "b"}]}, 10, 100, 256) == [Query("a", 3),
                                                                                                  Query("b", 10)]
    users = Tensor("user_id", "BYTES", [2], ["a", "b"])
    assert parse_v2([users], 10, 100, 256) == [Query("a", 10), Query("b", 10)]
    assert parse_v2([users, Tensor("k", "INT32", [1], [4])], 10, 100, 256) == [Query("a", 4), Query("b", 4)]
    assert parse_v2([users, Tensor("k", "INT64", [2], [1, 2])], 10, 100, 256) == [Query("a", 1), Query("b", 2)]
    for inputs, field in [([Tensor("user_id", "INT32", [1], [1])], "inputs.user_id.datatype"),
                          ([Tensor("user_id", "BYTES", [3], ["a"])], "inputs.user_id.shape"),
                          ([users, Tensor("k", "FP32", [1], [1.0])], "inputs.k.datatype"),
                          ([users, Tensor("k", "INT32", [3], [1, 2, 3])], "inputs.k.shape"),
                          ([users, Tensor("k", "INT32", [1], [0])], "inputs.k.data[0]"),
                          ([Tensor("users", "BYTES", [1], ["a"])], "inputs.users")]:
        with pytest.raises(RequestError) as e:
            parse_v2(inputs, 10, 100, 256)
        assert e.value.field == field


def _fake_snapshot(active: set[str], popularity: SegmentPopularity) -> Snapshot:
    ads = sorted({a for a, _ in popularity.overall} | active)
    return Snapshot(SimpleNamespace(model_version="sft-1"), popularity, frozenset(active), {a: a.upper() for a in ads},
                    {a: "cat" for a in ads})


def test_segment_fallback_ranks_by_segment_and_skips_inactive(tmp_path: Path):
    users = pd.DataFrame({"user_id": ["u1", "u2", "u3"], "age": ["18-24", "18-24", "55+"]})
    events = pd.DataFrame({"user_id": ["u1", "u1", "u2", "u3", "u3", "u3"],
                           "item_id": ["a1", "a2", "a1", "a3", "a3", "c1"],
                           "item_type": ["ad", "ad", "ad", "ad", "ad", "content"],
                           "action": ["click", "click", "click", "click", "view", "view"]})
    ads = pd.DataFrame({"ad_id": ["a1", "a2", "a3", "a4"], "ecpm": [1.0, 2.0, 3.0, 9.0]})
    pop = SegmentPopularity.from_data(users, events, ["click"], ["age"], ads)
    active = {"a1", "a2", "a3", "a4"}
    assert [a for a, _ in pop.top({"age": "18-24"}, 4, active)] == ["a1", "a2", "a4", "a3"]  # unseen: by eCPM
    assert [a for a, _ in pop.top({"age": "55+"}, 2, active)] == ["a3", "a4"]
    assert [a for a, _ in pop.top({"age": "18-24"}, 2, active - {"a1"})] == ["a2", "a4"]
    assert [a for a, _ in pop.top(None, 2, active, exclude={"a1"})] == ["a2", "a3"]  # overall: a1 2, a2 1, a3 1
    assert [a for a, _ in SegmentPopularity.from_catalogue(ads).top({}, 2, active)] == ["a4", "a3"]
    # the form a bundle stores: seen ads and shares only; the same rankings come back over the catalogue
    shares = segment_shares(users, events, ["click"], ["age"], ads)
    assert len(shares) == 3 + 2 + 1 and sorted(map(tuple, shares["segment"].drop_duplicates())) == [(), ("18-24",), ("55+",)]
    shares.to_parquet(tmp_path / "popularity.parquet", index=False)
    assert SegmentPopularity.from_shares(["age"], pd.read_parquet(tmp_path / "popularity.parquet"), ads) == pop


def test_recall_answer_uses_fresh_lists_only_and_never_an_inactive_ad():
    pop = SegmentPopularity.from_catalogue(pd.DataFrame({"ad_id": ["f1", "f2", "f3"], "ecpm": [3.0, 2.0, 1.0]}))
    snap = _fake_snapshot({"a1", "a3", "f1", "f2", "f3"}, pop)
    now = time.time()
    row = {"ad_ids": ["a1", "a2", "a3"], "scores": [-1.0, -2.0, -3.0], "model_version": "sft-1",
           "generated_at": pd.Timestamp(now - 10, unit="s", tz="UTC")}
    fresh = recall_answer(snap, Query("u", 4), row, {}, max_age_s=60, now=now)
    assert fresh["recall_list"] == "fresh"
    assert [(a["ad_id"], a["source"], a["rank"]) for a in fresh["ads"]] == [
        ("a1", "llm", 1), ("a3", "llm", 2), ("f1", "fallback", 3), ("f2", "fallback", 4)]  # a2 is paused
    assert fresh["ads"][0]["title"] == "A1"
    old = recall_answer(snap, Query("u", 2), row, {}, max_age_s=5, now=now)
    other = recall_answer(snap, Query("u", 2), row | {"model_version": "sft-0"}, {}, max_age_s=60, now=now)
    missing = recall_answer(snap, Query("u", 2), None, {}, max_age_s=60, now=now)
    down = recall_answer(snap, Query("u", 2), None, None, max_age_s=60, now=now, store_ok=False)
    for answer, status in [(old, "stale"), (other, "stale"), (missing, "missing"), (down, "unavailable")]:
        assert answer["recall_list"] == status
        assert [(a["ad_id"], a["source"]) for a in answer["ads"]] == [("f1", "fallback"), ("f2", "fallback")]


def test_batcher_batches_concurrent_requests_off_the_event_loop():
    calls = []

    def fn(users):
        calls.append((list(users), threading.current_thread().name))
        time.sleep(0.05)
        return {u: u.upper() for u in users}

    async def main():
        batcher = Batcher(fn, ThreadPoolExecutor(1, thread_name_prefix="model"), max_batch=8, max_wait_s=0.02)
        stop = asyncio.Event()
        runner = asyncio.create_task(batcher.run(stop))
        results = await asyncio.gather(*[batcher.submit([f"u{i}", "shared"]) for i in range(20)])
        stop.set()
        await runner
        return results

    results = asyncio.run(main())
    assert results == [[f"U{i}", "SHARED"] for i in range(20)]
    assert all(thread.startswith("model") for _, thread in calls)
    assert all(len(users) <= 8 and len(set(users)) == len(users) for users, _ in calls)
    assert len(calls) < 20  # 20 requests of 2 users (one shared) in at most 8-user batches


def test_batcher_error_reaches_every_waiting_request():
    def fn(users):
        raise RequestError("feature_store", "unavailable", status=503)

    async def main():
        batcher = Batcher(fn, ThreadPoolExecutor(1), max_batch=4, max_wait_s=0.01)
        stop = asyncio.Event()
        runner = asyncio.create_task(batcher.run(stop))
        results = await asyncio.gather(batcher.submit(["a"]), batcher.submit(["b"]), return_exceptions=True)
        stop.set()
        await runner
        return results

    assert all(isinstance(r, RequestError) and r.status == 503 for r in asyncio.run(main()))


def test_refresh_queue_deduplicates_within_the_ttl():
    queue = RefreshQueue("http://nearline:8080", batch=2, interval_s=0.1, ttl_s=60, timeout_s=1)
    assert queue.url == "http://nearline:8080/v1/models/nearline:predict"
    assert [queue.offer(u, 0.0) for u in ("a", "b", "a", "c")] == [True, True, False, True]
    assert queue.take() == ["a", "b"] and queue.take() == ["c"] and queue.take() == []
    assert queue.offer("a", 30.0) is False and queue.offer("a", 61.0) is True
    assert RefreshQueue(None, 2, 0.1, 60, 1).offer("a", 0.0) is False


# --- real servers --------------------------------------------------------------------------------------------------


def _copy_repo(out: Path) -> Path:
    source = Path(__file__).resolve().parents[1] / "feature_repo"
    shutil.copytree(source, out, ignore=shutil.ignore_patterns("data", "__pycache__"))
    return out


@pytest.fixture(scope="module")
def feast_repo(tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An applied and materialised copy of feature_repo/ with the SQLite online store."""
    repo = _copy_repo(tmp_path_factory.mktemp("serving") / "feature_repo")
    features.apply(repo, tiny_data_dir)
    features.materialize(repo, tiny_data_dir)
    return repo


@pytest.fixture(scope="module")
def servers(tiny_bundle_dir: Path, feast_repo: Path, tmp_path_factory: pytest.TempPathFactory):
    """`leadre serve nearline` and `leadre serve recall` (refreshing through the near-line one), started together."""
    work = tmp_path_factory.mktemp("servers")
    (work / "serving.yaml").write_text(SERVING_CONFIG)
    common = ["--bundle", str(tiny_bundle_dir), "--feature-repo", str(feast_repo),
              "--config", str(work / "serving.yaml")]
    nearline = ServerProcess("nearline", common + ["--log-dir", str(work / "logs")], work / "nearline.log")
    recall = ServerProcess("recall", common + ["--log-dir", str(work / "logs"), "--nearline-url", nearline.url],
                           work / "recall.log")  # its fallback is the bundle's own
    starters = [threading.Thread(target=s.start) for s in (nearline, recall)]
    for t in starters:
        t.start()
    for t in starters:
        t.join()
    try:
        for s in (nearline, recall):
            httpx.get(f"{s.url}/v2/health/ready", timeout=5).raise_for_status()
        yield SimpleNamespace(recall=recall, nearline=nearline, logs=work / "logs",
                              store=features.open_store(feast_repo))
    finally:
        recall.stop()
        nearline.stop()


def _v1(server: ServerProcess, users: list[str], k: int | None = None, model: str = "recall") -> list[dict]:
    instances = [{"user_id": u} | ({"k": k} if k else {}) for u in users]
    r = httpx.post(f"{server.url}/v1/models/{model}:predict", json={"instances": instances}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["predictions"]


def _until(condition, timeout: float = 60.0, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"condition not met within {timeout}s")


def _active_ads(tiny_bundle_dir: Path) -> set[str]:
    ads = pd.read_parquet(tiny_bundle_dir / "ads.parquet")
    return set(ads.loc[ads["active"], "ad_id"])


def test_recall_v1_v2_and_refresh_through_nearline(servers, tiny_bundle_dir, tiny_data_dir):
    users = pd.read_parquet(tiny_data_dir / "users.parquet")["user_id"].tolist()
    active = _active_ads(tiny_bundle_dir)
    first = _v1(servers.recall, users[:3] + ["no-such-user"], k=5)
    for answer in first:
        assert answer["recall_list"] == "missing"  # nothing published yet: fallback, and queued for near-line
        assert [a["rank"] for a in answer["ads"]] == [1, 2, 3, 4, 5]
        assert {a["source"] for a in answer["ads"]} == {"fallback"} and {a["ad_id"] for a in answer["ads"]} <= active

    # The refresh queue sends them to the near-line service, which publishes to Feast; then they are answered by
    # the LLM's lists.
    fresh = _until(lambda: (a := _v1(servers.recall, users[:3], k=5)) and
                   all(x["recall_list"] == "fresh" for x in a) and a)
    for answer in fresh:
        assert {a["source"] for a in answer["ads"]} == {"llm"} and {a["ad_id"] for a in answer["ads"]} <= active
        assert [a["score"] for a in answer["ads"]] == sorted((a["score"] for a in answer["ads"]), reverse=True)
    published = features.recall_lists(servers.store, users[:3])
    assert fresh[0]["ads"][0]["ad_id"] == published[users[0]]["ad_ids"][0]
    assert published[users[0]]["model_version"] == fresh[0]["model_version"]
    assert _v1(servers.recall, ["no-such-user"])[0]["recall_list"] == "missing"  # unknown: fallback, not error

    body = {"id": "req-1", "inputs": [{"name": "user_id", "datatype": "BYTES", "shape": [2], "data": users[:2]},
                                      {"name": "k", "datatype": "INT32", "shape": [1], "data": [4]}]}
    r = httpx.post(f"{servers.recall.url}/v2/models/recall/infer", json=body, timeout=30)
    assert r.status_code == 200, r.text
    v2 = {o["name"]: o for o in r.json()["outputs"]}
    assert r.json()["id"] == "req-1" and r.json()["model_version"] == fresh[0]["model_version"]
    assert v2["ad_id"]["shape"] == [2, 4] and v2["ad_id"]["data"][:4] == [a["ad_id"] for a in fresh[0]["ads"][:4]]
    assert v2["rank"]["data"] == [1, 2, 3, 4] * 2 and v2["recall_list"]["data"] == ["fresh", "fresh"]
    body.pop("id")  # no request id: KServe would answer 500 for a None response id; the predictor makes one
    r = httpx.post(f"{servers.recall.url}/v2/models/recall/infer", json=body, timeout=30)
    assert r.status_code == 200 and r.json()["id"]


def test_nearline_batches_concurrent_requests_and_keeps_the_loop_free(servers, tiny_data_dir):
    users = pd.read_parquet(tiny_data_dir / "users.parquet")["user_id"].tolist()[10:42]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda u: _v1(servers.nearline, [u], k=5, model="nearline")[0], users))
        # While the model works, the server still answers health checks at once (kserve#3950).
        work = pool.submit(_v1, servers.nearline, users, None, "nearline")
        t0 = time.perf_counter()
        assert httpx.get(f"{servers.nearline.url}/v2/health/live", timeout=5).status_code == 200
        live_s = time.perf_counter() - t0
        assert len(work.result()) == len(users)
    assert live_s < 1.0
    assert all(a["status"] == "published" and len(a["ads"]) == 5 for a in answers)
    batches = httpx.get(f"{servers.nearline.url}/leadre/admin/status").json()["batches"]
    assert max(batches) > 1  # concurrent single-user requests shared model calls
    unknown = _v1(servers.nearline, ["no-such-user"], model="nearline")[0]
    assert unknown["status"] == "unknown_user" and unknown["ads"] == []


def test_paused_ad_is_gone_from_both_predictors(servers, tiny_bundle_dir, tiny_data_dir):
    user = pd.read_parquet(tiny_data_dir / "users.parquet")["user_id"].tolist()[50]
    near = _v1(servers.nearline, [user], k=10, model="nearline")[0]
    top = near["ads"][0]["ad_id"]
    assert _until(lambda: _v1(servers.recall, [user], k=10)[0]["ads"][0]["ad_id"] == top)
    ecpm = float(pd.read_parquet(tiny_bundle_dir / "ads.parquet").set_index("ad_id").loc[top, "ecpm"])
    features.set_ad_status(servers.store, pd.DataFrame({"ad_id": [top], "active": [False], "ecpm": [ecpm]}))
    try:
        _until(lambda: top not in {a["ad_id"] for a in _v1(servers.recall, [user], k=10)[0]["ads"]}, timeout=20)
        _until(lambda: top not in {a["ad_id"] for a in _v1(servers.nearline, [user], k=10, model="nearline")[0]["ads"]},
               timeout=20)
        again = _v1(servers.recall, [user], k=10)[0]
        assert len(again["ads"]) == 10 and again["ads"][0]["source"] == "llm"  # the rest of the list moved up
        for server in (servers.recall, servers.nearline):
            status = httpx.get(f"{server.url}/leadre/admin/status").json()
            assert status["active_ads"] == len(_active_ads(tiny_bundle_dir)) - 1
    finally:
        features.set_ad_status(servers.store, pd.DataFrame({"ad_id": [top], "active": [True], "ecpm": [ecpm]}))
    _until(lambda: top in {a["ad_id"] for a in _v1(servers.nearline, [user], k=10, model="nearline")[0]["ads"]},
           timeout=20)


BAD_REQUESTS = [
    ("v1", b'{"instances": [{"user_id": "u1", "k": 3}', "application/json", 400, "body"),
    ("v1", b'{"instances": [{"user_id": 12}]}', "application/json", 400, "instances[0].user_id"),
    ("v1", b'{"instances": [{"user_id": "u1", "k": "ten"}]}', "application/json", 400, "instances[0].k"),
    ("v1", b'{"instances": [{"k": 3}]}', "application/json", 400, "instances[0].user_id"),
    ("v1", b'{"users": ["u1"]}', "application/json", 400, "users"),
    ("v1", b'{"instances": [{"user_id": "u1", "k": 1000}]}', "application/json", 400, "instances[0].k"),
    ("v1", b'{"instances": [{"user_id": "u1", "k": -1}]}', "text/plain", 400, "instances[0].k"),
    ("v1", b"not json at all", "text/plain", 400, "body"),
    ("v1", b'{"instances": [' + b",".join([b'{"user_id": "u1"}'] * 70000) + b"]}", "application/json", 413, "body"),
    ("v2", b'{"inputs": [{"name": "user_id", "datatype": "INT64", "shape": [1], "data": [1]}]}', "application/json",
     400, "inputs.user_id.datatype"),
    ("v2", b'{"inputs": [{"name": "user_id", "datatype": "BYTES", "shape": [1]}]}', "application/json", 422,
     "inputs[0].data"),
    ("v2", b'{"inputs": "u1"}', "application/json", 422, "inputs"),
    ("v2", b'{"inputs": [{"name": "user_id", "datatype": "BYTES", "shape": [1], "data": ["u1"]}, '
           b'{"name": "k", "datatype": "INT32", "shape": [1], "data": [0]}]}', "application/json", 400,
     "inputs.k.data[0]"),
]


@pytest.mark.parametrize("protocol, body, content_type, status, field", BAD_REQUESTS)
def test_bad_input_is_a_4xx_naming_the_field(servers, protocol, body, content_type, status, field):
    path = "/v1/models/recall:predict" if protocol == "v1" else "/v2/models/recall/infer"
    r = httpx.post(servers.recall.url + path, content=body, headers={"content-type": content_type}, timeout=30)
    assert r.status_code == status, r.text
    assert r.json()["field"] == field and field in r.json()["error"]
    assert _v1(servers.recall, ["u001"], k=2)[0]["ads"]  # still serving


def _hammer(url: str, body: dict, stop: threading.Event, outcomes: list) -> None:
    with httpx.Client(timeout=30) as client:
        while not stop.is_set():
            try:
                r = client.post(url, json=body)
                outcomes.append(r.status_code if r.status_code != 200 or r.json()["predictions"][0]["ads"] else "empty")
            except httpx.HTTPError as e:
                outcomes.append(repr(e))


def test_bundle_swap_while_requests_flow_fails_no_request(servers, tiny_bundle_dir, tmp_path):
    copy = tmp_path / "bundle-copy"
    shutil.copytree(tiny_bundle_dir, copy)
    stop, outcomes = threading.Event(), []
    body = {"instances": [{"user_id": "u001", "k": 5}, {"user_id": "u002"}]}
    workers = [threading.Thread(target=_hammer, args=(f"{s.url}/v1/models/{s.service}:predict", body, stop, outcomes))
               for s in (servers.recall, servers.recall, servers.nearline)]
    for w in workers:
        w.start()
    try:
        for server in (servers.recall, servers.nearline):
            for bundle in (copy, tiny_bundle_dir):
                r = httpx.post(f"{server.url}/leadre/admin/reload", json={"bundle": str(bundle)}, timeout=120)
                assert r.status_code == 200, r.text
                assert r.json()["bundle"] == str(bundle)
        time.sleep(0.5)
    finally:
        stop.set()
        for w in workers:
            w.join()
    assert len(outcomes) > 20
    assert set(outcomes) == {200}, [o for o in outcomes if o != 200][:5]
    for bad_bundle in ("/no/such/bundle", str(tmp_path)):  # absent; not a bundle: the current one keeps serving
        bad = httpx.post(f"{servers.recall.url}/leadre/admin/reload", json={"bundle": bad_bundle}, timeout=30)
        assert bad.status_code == 400 and bad.json()["field"] == "bundle", bad.text
    assert httpx.get(f"{servers.recall.url}/leadre/admin/status").json()["bundle"] == str(tiny_bundle_dir)


def test_new_ads_join_without_restart(servers, tiny_sids_dir, tiny_data_dir, tmp_path):
    from leadre.semantic_ids import assign_sids

    from leadre.sid import load_sid_table

    # Texts unlike any existing ad: copies would share codes with their originals and grow the collision level,
    # which a trained model has no tokens for.
    new = pd.read_parquet(tiny_data_dir / "ads.parquet").head(2).assign(
        ad_id=["adnew0", "adnew1"], title=["Orbit: solar camping lanterns", "Quill: fountain pen starter kits"],
        description=["Orbit solar camping lanterns that charge all day and glow all night.",
                     "Quill fountain pen starter kits with inks for calligraphy beginners."], active=True)
    new.to_parquet(tmp_path / "new_ads.parquet", index=False)
    assign_sids(tiny_sids_dir, new, tmp_path / "sids", cache_dir=tiny_sids_dir.parent / "cache", progress=False)
    assert load_sid_table(tmp_path / "sids").level_sizes == load_sid_table(tiny_sids_dir).level_sizes
    before = {s.service: httpx.get(f"{s.url}/leadre/admin/status").json() for s in (servers.recall, servers.nearline)}
    for server in (servers.recall, servers.nearline):
        r = httpx.post(f"{server.url}/leadre/admin/reload", timeout=120,
                       json={"sids": str(tmp_path / "sids"), "ads": str(tmp_path / "new_ads.parquet")})
        assert r.status_code == 200, r.text
        assert r.json()["ads"] == before[server.service]["ads"] + 2
        assert r.json()["active_ads"] == before[server.service]["active_ads"] + 2
    # The feature store's status reaches new ads too: pausing one takes it out again.
    features.set_ad_status(servers.store, new.assign(active=[False, True])[["ad_id", "active", "ecpm"]])
    for server in (servers.recall, servers.nearline):
        _until(lambda: httpx.get(f"{server.url}/leadre/admin/status").json()["active_ads"] ==
               before[server.service]["active_ads"] + 1, timeout=20)
    missing = httpx.post(f"{servers.recall.url}/leadre/admin/reload", json={"sids": str(tmp_path / "sids")})
    assert missing.status_code == 400 and missing.json()["field"] == "ads"


def test_answers_are_logged_for_drift_monitoring(servers):
    from leadre.monitor import RECORD_FIELDS, read_logs

    _v1(servers.recall, ["u007"], k=3)
    _v1(servers.nearline, ["u007"], k=3, model="nearline")

    def both_logged() -> bool:  # the log is written by a background thread, about once a second
        records = read_logs(servers.logs)
        mine = records[(records["user_id"] == "u007") & (records["ads"].map(len) == 3)]
        return set(mine["model"]) == {"recall", "nearline"}

    _until(both_logged, timeout=15)
    records = read_logs(servers.logs)
    assert list(records.columns) == list(RECORD_FIELDS) and records.attrs.get("malformed", 0) == 0
    assert set(records["source"]) <= {"llm", "fallback"}
    last = records[(records["user_id"] == "u007") & (records["model"] == "recall")].iloc[-1]
    assert last["n_ads"] > 0 and last["profile"] and len(last["categories"]) == 3
    metrics = httpx.get(f"{servers.recall.url}/metrics").text
    assert 'leadre_answers_total{model="recall",source="fallback"}' in metrics


def test_redis_outage_degrades_to_flagged_fallback_and_recovers(redis_outage, tiny_bundle_dir, tiny_data_dir,
                                                                 tmp_path, monkeypatch):
    env = {"REDIS_CONNECTION_STRING": redis_outage.address, "FEAST_REGISTRY_PATH": str(tmp_path / "registry.db")}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    repo = _copy_repo(tmp_path / "feature_repo")
    features.apply(repo, tiny_data_dir, production=True)
    features.materialize(repo, tiny_data_dir, production=True)
    store = features.open_store(repo, production=True)
    users = pd.read_parquet(tiny_data_dir / "users.parquet")["user_id"].tolist()[:4]
    manifest = pd.read_json(tiny_bundle_dir / "manifest.json", typ="series")
    active = sorted(_active_ads(tiny_bundle_dir))

    def publish() -> None:
        features.push_recall_lists(store, [{"user_id": u, "ad_ids": active[:8], "scores": [-float(i) for i in range(8)],
                                            "model_version": manifest["model_version"]} for u in users])

    publish()
    (tmp_path / "serving.yaml").write_text(SERVING_CONFIG)
    recall = ServerProcess("recall", ["--bundle", str(tiny_bundle_dir), "--feature-repo", str(repo), "--production",
                                      "--config", str(tmp_path / "serving.yaml")], tmp_path / "recall.log", env=env)
    recall.start()
    stop, answers = threading.Event(), []

    def load() -> None:
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                r = client.post(f"{recall.url}/v1/models/recall:predict",
                                json={"instances": [{"user_id": u, "k": 5} for u in users]})
                answers.append((time.monotonic(), r.status_code, r.json().get("predictions") if r.status_code == 200
                                else r.text))
                time.sleep(0.01)

    worker = threading.Thread(target=load)
    try:
        assert {a["recall_list"] for a in _v1(recall, users, k=5)} == {"fresh"}
        worker.start()
        time.sleep(0.5)
        redis_outage.stop()
        down_at = time.monotonic()
        time.sleep(1.5)
        restart_at = time.monotonic()
        redis_outage.start()  # an empty Redis again (no persistence): the lists are gone until republished
        up_at = time.monotonic()
        _until(lambda: answers and answers[-1][1] == 200 and answers[-1][0] > up_at and
               {a["recall_list"] for a in answers[-1][2]} <= {"missing", "fresh"}, timeout=20)
        publish()
        _until(lambda: {a["recall_list"] for a in _v1(recall, users, k=5)} == {"fresh"}, timeout=20)
    finally:
        stop.set()
        if worker.is_alive():
            worker.join()
        recall.stop()
    assert {status for _, status, _ in answers} == {200}, [a for a in answers if a[1] != 200][:3]
    during = [p for t, status, p in answers if down_at + 0.2 < t < restart_at]
    assert during, "no request answered while Redis was down"
    for predictions in during:
        for answer in predictions:
            assert answer["recall_list"] == "unavailable" and len(answer["ads"]) == 5
            assert {a["source"] for a in answer["ads"]} == {"fallback"}
