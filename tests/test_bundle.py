"""The recall bundle: what it holds, that it survives a move, refuses damage, and serves live histories."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from leadre.artifacts import ArtifactError
from leadre.bundle import RecallBundle, build_bundle, history_from_events
from leadre.cli import main
from leadre.prompts import UserHistory
from leadre.serving import load_popularity


@pytest.fixture(scope="module")
def bundle(tiny_bundle_dir: Path) -> RecallBundle:
    return RecallBundle.load(tiny_bundle_dir)


def test_bundle_holds_everything_serving_needs_named_by_content(tiny_bundle_dir: Path, tiny_data_dir: Path) -> None:
    manifest = json.loads((tiny_bundle_dir / "manifest.json").read_text())
    assert manifest["step"] == "bundle"
    assert manifest["model_version"].startswith("sft-") and len(manifest["model_version"]) == len("sft-") + 12
    assert {"model/leadre_model.json", "sids/sids.parquet", "sids/manifest.json", "ads.parquet",
            "contents.parquet"} <= set(manifest["files"])
    assert "manifest.json" not in manifest["files"]  # only the bundle's own manifest is left out
    assert all(len(digest) == 64 for digest in manifest["files"].values())
    assert manifest["prompt_config"]["max_prompt_tokens"] == 160  # the tiny config the model was trained with
    ads = pd.read_parquet(tiny_data_dir / "ads.parquet")
    assert manifest["counts"] == {"ads": len(ads), "active_ads": int(ads["active"].sum()),
                                  "contents": len(pd.read_parquet(tiny_data_dir / "contents.parquet"))}
    # the recall service's fallback travels with the bundle: segment popularity by the first profile field
    users = pd.read_parquet(tiny_data_dir / "users.parquet")
    assert manifest["segment_fields"] == [users.columns[1]] and "popularity.parquet" in manifest["files"]
    bundle = RecallBundle.load(tiny_bundle_dir)
    assert load_popularity(bundle, None, ()) is bundle.popularity and bundle.popularity.by_segment
    assert load_popularity(bundle, tiny_data_dir, ()) == bundle.popularity  # recomputed from the data: the same
    other = (users.columns[2],)
    with pytest.raises(ValueError, match=rf"segment fields \['{other[0]}'\]: the bundle's fallback is by"):
        load_popularity(bundle, None, other)
    assert load_popularity(bundle, tiny_data_dir, other).fields == other
    # no stored absolute path is needed to load it: only the recorded inputs mention the source folders
    loading_fields = {k: v for k, v in manifest.items() if k not in ("inputs", "created_at")}
    assert str(tiny_data_dir.parent) not in json.dumps(loading_fields)


def test_a_moved_bundle_loads_and_answers_the_same(tiny_bundle_dir: Path, bundle: RecallBundle, tmp_path: Path) -> None:
    moved = tmp_path / "elsewhere" / "bundle"
    shutil.copytree(tiny_bundle_dir, moved)
    history = UserHistory("u", {"age": "25-34"}, list(bundle.ads.index[:5]), [])
    assert RecallBundle.load(moved).recall([history], k=5) == bundle.recall([history], k=5)


def test_a_damaged_bundle_is_refused(tiny_bundle_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle_dir, copy)
    with open(copy / "ads.parquet", "ab") as f:
        f.write(b"tampered")
    with pytest.raises(ArtifactError, match="damaged bundle.*ads.parquet"):
        RecallBundle.load(copy)


def test_bundle_refuses_sids_the_model_does_not_know(tiny_sft_dir: Path, tiny_sids_dir: Path, tiny_data_dir: Path,
                                                      tmp_path: Path) -> None:
    other = tmp_path / "sids"
    shutil.copytree(tiny_sids_dir, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["level_sizes"] = [size + 1 for size in manifest["level_sizes"]]
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="S-ID levels"):
        build_bundle(tiny_sft_dir, other, tiny_data_dir, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()


def test_bundle_command_reports_and_fails_cleanly(tiny_sft_dir: Path, tiny_sids_dir: Path, tiny_data_dir: Path,
                                                  tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["bundle", "--model", str(tiny_sft_dir), "--sids", str(tiny_sids_dir), "--data", str(tiny_data_dir),
                 "--out", str(tmp_path / "b")]) == 0
    assert "model sft-" in capsys.readouterr().out
    assert main(["bundle", "--model", str(tmp_path / "nope"), "--sids", str(tiny_sids_dir), "--data",
                 str(tiny_data_dir), "--out", str(tmp_path / "c")]) == 2
    assert "nope" in capsys.readouterr().err and not (tmp_path / "c").exists()


def test_history_from_events_orders_dedupes_and_skips_unknown_items() -> None:
    events = pd.DataFrame({
        "item_id": ["a2", "c1", "a1", "a1", "new_ad", "c9", "a3"],
        "item_type": ["ad", "content", "ad", "ad", "ad", "content", "ad"],
        "action": ["click", "view", "click", "conversion", "click", "view", "impression"],
        # equal timestamps keep the input order (stable); a2 happened last
        "ts": pd.to_datetime(["2026-01-03", "2026-01-01", "2026-01-01", "2026-01-01", "2026-01-02", "2026-01-02",
                              "2026-01-04"], utc=True),
    })
    history, skipped = history_from_events("u1", {"age": 30}, events, ["click", "conversion"],
                                           known_ads={"a1", "a2", "a3"}, known_contents={"c1"})
    # a1's conversion right after its click is not a new interaction; a3 was only an impression
    assert history == UserHistory("u1", {"age": "30"}, ["a1", "a2"], ["c1"])
    assert skipped == 2  # new_ad and c9 are unknown to the bundle: skipped and counted, never an error


def test_recall_returns_active_distinct_ads_and_can_exclude_seen(bundle: RecallBundle) -> None:
    seen = list(bundle.ads.index[:8])
    history = UserHistory("u", {}, seen, [])
    ranked = bundle.recall([history], k=10, beam_width=20)[0]
    assert len(ranked) == 10 and len({ad for ad, _ in ranked}) == 10
    assert bundle.ads.loc[[ad for ad, _ in ranked], "active"].all()
    assert [s for _, s in ranked] == sorted((s for _, s in ranked), reverse=True)
    unseen = bundle.recall([history], k=10, beam_width=20, exclude_seen=True)[0]
    assert not {ad for ad, _ in unseen} & set(seen)


def test_with_status_pauses_resumes_and_adds_ads_without_touching_the_old_bundle(
        bundle: RecallBundle, tiny_sids_dir: Path, tmp_path: Path) -> None:
    from leadre.semantic_ids import assign_sids
    from leadre.sid import load_sid_table

    history = UserHistory("u", {}, list(bundle.ads.index[:6]), [])
    top = [ad for ad, _ in bundle.recall([history], k=5)[0]]
    paused = bundle.with_status(pd.DataFrame({"ad_id": top[:2], "active": False}))
    after = [ad for ad, _ in paused.recall([history], k=5)[0]]
    assert not set(top[:2]) & set(after)
    assert [ad for ad, _ in bundle.recall([history], k=5)[0]] == top  # the old object is unchanged
    resumed = paused.with_status(pd.DataFrame({"ad_id": top[:2], "active": True}))
    assert [ad for ad, _ in resumed.recall([history], k=5)[0]] == top

    new_ads = pd.DataFrame({"ad_id": ["brand_new"], "title": ["Trail running shoes"], "description": ["Light shoes."],
                            "category": [bundle.ads["category"].iloc[0]], "advertiser": ["Acme"], "ecpm": [3.0],
                            "active": [True]})
    assign_sids(tiny_sids_dir, new_ads, tmp_path / "sids2", cache_dir=tmp_path / "cache", progress=False)
    grown = bundle.with_status(new_ads, load_sid_table(tmp_path / "sids2"))
    assert grown.ads.loc["brand_new", "active"] and "brand_new" in grown.recaller.trie.row_of
    # the new ad can now appear in a live history and be generated
    assert grown.recall([UserHistory("u", {}, ["brand_new"], [])], k=len(grown.ads))[0]
    assert any(ad == "brand_new" for ad, _ in grown.recall([history], k=len(grown.ads), beam_width=len(grown.ads))[0])
    with pytest.raises(ValueError, match="need S-IDs"):
        bundle.with_status(new_ads)


def test_bundle_files_are_readable_by_the_predictors_user(tiny_bundle_dir: Path) -> None:
    # safetensors writes 0600 files; a predictor running as another uid (1000 in the image) must still read them
    files = [p for p in tiny_bundle_dir.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    assert all(p.stat().st_mode & 0o044 == 0o044 for p in files), [p for p in files if p.stat().st_mode & 0o044 != 0o044]
