"""The Feast feature store: `leadre features apply|materialize` into copies of feature_repo/, then the reads and
writes the predictors make, on the SQLite online store and on a real redis-server."""

from __future__ import annotations

import asyncio
import datetime as dt
import shutil
from pathlib import Path

import pandas as pd
import pytest

from leadre import features
from leadre.bundle import history_from_events
from leadre.cli import main
from leadre.features import FeatureStoreError, FeatureStoreUnavailable
from leadre.schema import Tables, positive_actions_of

FEATURE_REPO = Path(__file__).resolve().parents[1] / "feature_repo"


def copy_repo(tmp: Path) -> Path:
    repo = tmp / "feature_repo"
    shutil.copytree(FEATURE_REPO, repo, ignore=shutil.ignore_patterns("data", "__pycache__"))
    return repo


def apply_and_materialize(repo: Path, data: Path, *flags: str) -> None:
    for command in ("apply", "materialize"):
        assert main(["features", command, "--repo", str(repo), "--data", str(data), *flags]) == 0


@pytest.fixture(scope="module")
def local_repo(tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = copy_repo(tmp_path_factory.mktemp("feast"))
    apply_and_materialize(repo, tiny_data_dir)
    return repo


@pytest.fixture(scope="module")
def redis_repo(tiny_data_dir: Path, redis_server: str, tmp_path_factory: pytest.TempPathFactory):
    """A copy of feature_repo/ applied with the production configuration against the session's redis-server."""
    tmp = tmp_path_factory.mktemp("feast-redis")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("REDIS_CONNECTION_STRING", redis_server)
        env.setenv("FEAST_REGISTRY_PATH", str(tmp / "registry" / "registry.db"))
        repo = copy_repo(tmp)
        apply_and_materialize(repo, tiny_data_dir, "--production")
        yield features.open_store(repo, production=True)


def expected_features(tables: Tables, data_dir: Path) -> dict[str, dict]:
    """What serving must see: history_from_events over the raw events, profile strings as training wrote them."""
    profiles = tables.users.set_index("user_id").astype(str).to_dict("index")
    events = dict(list(tables.events.groupby("user_id", sort=False)))
    expected = {}
    for user_id in tables.users["user_id"]:
        history, skipped = history_from_events(user_id, profiles[user_id], events.get(user_id, tables.events[:0]),
                                               positive_actions_of(data_dir), tables.ads["ad_id"],
                                               tables.contents["content_id"])
        assert skipped == 0
        expected[user_id] = {"profile": history.profile, "ads": history.ads[-features.MAX_RECENT:],
                             "contents": history.contents[-features.MAX_RECENT:]}
    return expected


def check_store(store, tables: Tables, data_dir: Path) -> None:
    users = tables.users["user_id"].tolist()
    got = features.user_features(store, users + ["nobody"])
    assert got == expected_features(tables, data_dir)  # every user, in full; the unknown one absent

    ads = tables.ads.set_index("ad_id")
    status = features.ad_status(store, list(ads.index) + ["no-such-ad"])
    assert status == {a: {"active": bool(ads.loc[a, "active"]), "ecpm": float(ads.loc[a, "ecpm"])} for a in ads.index}

    generated = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    features.push_recall_lists(store, [
        {"user_id": users[0], "ad_ids": ["ad001", "ad002"], "scores": [-0.5, -1.5], "model_version": "sft-abc"},
        {"user_id": users[1], "ad_ids": ["ad003"], "scores": [-2.0], "model_version": "sft-abc",
         "generated_at": generated},
    ])
    lists = features.recall_lists(store, users[:3])
    assert set(lists) == set(users[:2])  # the third has no list yet
    first = lists[users[0]]
    assert (first["ad_ids"], first["scores"], first["model_version"]) == (["ad001", "ad002"], [-0.5, -1.5], "sft-abc")
    assert abs(first["generated_at"] - dt.datetime.now(dt.timezone.utc)) < dt.timedelta(minutes=5)
    assert lists[users[1]]["generated_at"] == generated  # a stale list is recognisable
    # The recall service's one read, below get_online_features: the same values, on the event loop (Redis through
    # its asyncio client), for users with a list, without one, and unknown.
    reader = features.recall_reader(store)
    assert reader.use_async == (reader._redis_fields is not None) == (store.config.online_store.type == "redis")
    asked = users[:3] + ["nobody"]
    expected = store.get_online_features(features=features.RECALL_REFS + features.PROFILE_SUMMARY_REFS,
                                         entity_rows={"user_id": asked}).to_dict()

    async def both() -> tuple:  # one event loop, as in a server: Feast's asyncio Redis client is bound to its loop
        return await reader.read_async(asked), await features.recall_view(reader, asked)

    read_async, view = asyncio.run(both())
    assert reader.read(asked) == read_async == {k: v for k, v in expected.items() if k != "user_id"}
    assert view == (lists, {u: {"profile": got[u]["profile"], "n_ads": len(got[u]["ads"]),
                                "n_contents": len(got[u]["contents"])} for u in users[:3]})

    ranking = store.get_online_features(features=store.get_feature_service("ranking_service"),
                                        entity_rows=[{"user_id": users[0]}]).to_dict()
    assert ranking["ad_ids"] == [["ad001", "ad002"]] and ranking["ranks"] == [[1, 2]]
    assert ranking["scores"] == [[-0.5, -1.5]]

    paused = ads.index[ads["active"]][0]
    features.set_ad_status(store, pd.DataFrame({"ad_id": [paused, "ad-new"], "active": [False, True],
                                                "ecpm": [1.25, 7.0]}))
    assert features.ad_status(store, [paused, "ad-new"]) == {paused: {"active": False, "ecpm": 1.25},
                                                             "ad-new": {"active": True, "ecpm": 7.0}}


def test_local_store_serves_what_training_saw(local_repo: Path, tiny_tables: Tables, tiny_data_dir: Path):
    store = features.open_store(local_repo)
    check_store(store, tiny_tables, tiny_data_dir)
    for name in ("recall_service", "nearline_service", "ranking_service"):
        store.get_feature_service(name)
    # Materialising the data again restores its status over the paused ad.
    assert main(["features", "materialize", "--repo", str(local_repo), "--data", str(tiny_data_dir)]) == 0
    ads = tiny_tables.ads.set_index("ad_id")
    assert all(v["active"] == ads.loc[a, "active"] for a, v in features.ad_status(store, list(ads.index)).items())


def test_redis_store(redis_repo, tiny_tables: Tables, tiny_data_dir: Path):
    check_store(redis_repo, tiny_tables, tiny_data_dir)


def test_behaviour_lists_are_capped_and_oldest_first():
    events = pd.DataFrame({
        "user_id": ["u"] * 5, "item_id": ["a1", "a1", "c1", "a2", "a3"],
        "item_type": ["ad", "ad", "content", "ad", "ad"], "action": ["click", "conversion", "view", "view", "click"],
        "ts": pd.to_datetime([1, 2, 2, 3, 3], unit="s", utc=True),
    })
    row = features.behaviour_lists(events, ["click", "conversion"], max_items=1).iloc[0]
    assert row["recent_ads"] == ["a3"] and row["recent_contents"] == ["c1"]
    assert (row["n_recent_ads"], row["n_recent_contents"]) == (1, 1)
    row = features.behaviour_lists(events, ["click", "conversion"]).iloc[0]
    assert row["recent_ads"] == ["a1", "a3"]  # the conversion repeats the click; a2 was only viewed
    assert row["event_timestamp"] == pd.Timestamp(3, unit="s", tz="UTC")


def test_redis_outage_raises_one_catchable_type_and_recovers(redis_outage, tiny_data_dir: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("REDIS_CONNECTION_STRING", redis_outage.address)
    monkeypatch.setenv("FEAST_REGISTRY_PATH", str(tmp_path / "registry.db"))
    repo = copy_repo(tmp_path)
    apply_and_materialize(repo, tiny_data_dir, "--production")
    store = features.open_store(repo, production=True)
    assert "u000" in features.user_features(store, ["u000"])
    reader = features.recall_reader(store)
    loop = asyncio.new_event_loop()  # the one loop of a server (Feast's asyncio Redis client is bound to its loop)

    redis_outage.stop()
    row = {"user_id": "u000", "ad_ids": ["ad001"], "scores": [-1.0], "model_version": "v"}
    for call in (lambda: features.user_features(store, ["u000"]), lambda: features.recall_lists(store, ["u000"]),
                 lambda: features.ad_status(store, ["ad001"]), lambda: features.push_recall_lists(store, [row]),
                 lambda: reader.read(["u000"]), lambda: loop.run_until_complete(features.recall_view(reader, ["u000"])),
                 lambda: features.set_ad_status(store, pd.DataFrame({"ad_id": ["ad001"], "active": [False],
                                                                     "ecpm": [1.0]}))):
        with pytest.raises(FeatureStoreUnavailable, match="unavailable"):
            call()
    assert main(["features", "materialize", "--repo", str(repo), "--data", str(tiny_data_dir), "--production"]) == 2

    redis_outage.start()  # an empty Redis (no persistence): reads answer again, without a new store
    assert features.recall_lists(store, ["u000"]) == {}
    features.push_recall_lists(store, [row])
    assert features.recall_lists(store, ["u000"])["u000"]["ad_ids"] == ["ad001"]
    assert loop.run_until_complete(features.recall_view(reader, ["u000"]))[0]["u000"]["ad_ids"] == ["ad001"]
    loop.close()


def test_bad_inputs_give_clear_errors(local_repo: Path, tiny_data_dir: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    with pytest.raises(FeatureStoreError, match="no-data: no such data directory"):
        features.apply(local_repo, tmp_path / "no-data")
    with pytest.raises(ValueError, match="not an artifact directory"):
        features.apply(local_repo, tmp_path)  # a folder, but no data directory

    bare = tmp_path / "bare"
    bare.mkdir()
    assert main(["features", "apply", "--repo", str(bare), "--data", str(tiny_data_dir)]) == 2
    assert "no feature_store.yaml; not a Feast feature repository" in capsys.readouterr().err
    with pytest.raises(FeatureStoreError, match="no such feature repository"):
        features.open_store(tmp_path / "missing")

    unapplied = copy_repo(tmp_path)
    with pytest.raises(FeatureStoreError, match="run `leadre features apply` first"):
        features.open_store(unapplied)
    assert main(["features", "materialize", "--repo", str(unapplied), "--data", str(tiny_data_dir)]) == 2

    monkeypatch.delenv("REDIS_CONNECTION_STRING", raising=False)
    monkeypatch.setenv("FEAST_REGISTRY_PATH", str(tmp_path / "registry.db"))
    with pytest.raises(FeatureStoreError, match="REDIS_CONNECTION_STRING not set"):
        features.open_store(local_repo, production=True)

    store = features.open_store(local_repo)
    with pytest.raises(ValueError, match="row 0 .*2 ad_ids but 1 scores"):
        features.push_recall_lists(store, [{"user_id": "u", "ad_ids": ["a", "b"], "scores": [0.0], "model_version": "v"}])
    with pytest.raises(ValueError, match="row 0: missing model_version"):
        features.push_recall_lists(store, [{"user_id": "u", "ad_ids": [], "scores": []}])
    with pytest.raises(ValueError, match="missing column.*ecpm"):
        features.set_ad_status(store, pd.DataFrame({"ad_id": ["a"], "active": [True]}))
