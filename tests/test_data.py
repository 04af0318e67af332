"""The data layer: contract validation, the synthetic marketplace, loaders, the split, stats and the CLI."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from leadre.artifacts import ArtifactError, read_manifest
from leadre.cli import main
from leadre.loaders import load_interactions, load_movielens
from leadre.schema import DataError, Tables, normalize, read_data_dir, write_data_dir
from leadre.split import SplitSettings, leave_one_out
from leadre.stats import data_stats
from leadre.synth import SynthConfig, generate

from .conftest import shared_dataset


def small_tables() -> Tables:
    ads = pd.DataFrame({
        "ad_id": ["a1", "a2", "a3"], "title": ["t1", "t2", "t3"], "description": ["d1", "d2", "d3"],
        "category": ["x", "x", "y"], "advertiser": ["p", "q", "p"], "ecpm": [1.0, 2.5, 0.0], "active": [True, True, False],
    })
    contents = pd.DataFrame({"content_id": ["c1"], "title": ["ct"], "category": ["x"]})
    users = pd.DataFrame({"user_id": ["u1", "u2"], "age_bucket": ["18-24", "25-34"]})
    events = pd.DataFrame({
        "user_id": ["u1", "u1", "u1", "u2", "u1"],
        "item_id": ["a1", "c1", "a2", "a3", "a3"],
        "item_type": ["ad", "content", "ad", "ad", "ad"],
        "action": ["click", "view", "click", "click", "conversion"],
        "ts": pd.to_datetime([1, 2, 3, 4, 5], unit="s", utc=True),
    })
    return Tables(ads=ads, contents=contents, users=users, events=events)


def _with(tables: Tables, name: str, df: pd.DataFrame) -> Tables:
    return Tables(**{n: (df if n == name else d) for n, d in tables.items()})


def _edit(name: str, column: str, row: int, value) -> Tables:
    tables = small_tables()
    df = getattr(tables, name).copy()
    df[column] = df[column].astype(object)
    df.loc[row, column] = value
    return _with(tables, name, df)


def _drop(name: str, column: str) -> Tables:
    tables = small_tables()
    return _with(tables, name, getattr(tables, name).drop(columns=[column]))


BAD_INPUTS = {
    "missing column": (_drop("ads", "ecpm"), "ads", "ecpm", None, "missing column"),
    "missing events column": (_drop("events", "ts"), "events", "ts", None, "missing column"),
    "duplicate ad id": (_edit("ads", "ad_id", 2, "a1"), "ads", "ad_id", 2, "duplicate id"),
    "null ad id": (_edit("ads", "ad_id", 1, None), "ads", "ad_id", 1, "null id"),
    "null user id": (_edit("users", "user_id", 0, None), "users", "user_id", 0, "null id"),
    "duplicate user id": (_edit("users", "user_id", 1, "u1"), "users", "user_id", 1, "duplicate id"),
    "duplicate content id": (_with(small_tables(), "contents", pd.DataFrame({"content_id": ["c1", "c1"], "title": ["a", "b"], "category": ["x", "x"]})), "contents", "content_id", 1, "duplicate id"),
    "negative ecpm": (_edit("ads", "ecpm", 1, -0.5), "ads", "ecpm", 1, "negative eCPM"),
    "non-numeric ecpm": (_edit("ads", "ecpm", 0, "cheap"), "ads", "ecpm", 0, "not a number"),
    "unknown user": (_edit("events", "user_id", 3, "u9"), "events", "user_id", 3, "unknown user"),
    "unknown ad": (_edit("events", "item_id", 2, "a9"), "events", "item_id", 2, "unknown ad"),
    "unknown content": (_edit("events", "item_id", 1, "c9"), "events", "item_id", 1, "unknown content"),
    "unknown item_type": (_edit("events", "item_type", 4, "video"), "events", "item_type", 4, "unknown item_type"),
    "unparsable timestamp": (_edit("events", "ts", 2, "yesterday-ish"), "events", "ts", 2, "unparsable timestamp"),
    "missing timestamp": (_edit("events", "ts", 0, None), "events", "ts", 0, "missing timestamp"),
    "no ads": (_with(small_tables(), "ads", small_tables().ads.iloc[:0]), "ads", None, None, "no rows"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_every_validator_rule_names_table_column_row_and_writes_nothing(case: str, tmp_path: Path) -> None:
    tables, table, column, row, problem = BAD_INPUTS[case]
    out = tmp_path / "data"
    with pytest.raises(DataError) as info:
        write_data_dir(tables, out, "data synth", {})
    err = info.value
    assert (err.table, err.column, err.row) == (table, column, row)
    assert problem in str(err) and table in str(err)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_valid_tables_round_trip(tmp_path: Path) -> None:
    write_data_dir(small_tables(), tmp_path / "d", "data synth", {"x": 1})
    tables = read_data_dir(tmp_path / "d")
    assert tables.events["ts"].dt.tz is not None and tables.ads["active"].dtype == bool
    manifest = read_manifest(tmp_path / "d")
    assert manifest["counts"] == {"ads": 3, "contents": 1, "users": 2, "events": 5}
    assert manifest["positive_actions"] == ["click", "conversion"]


def test_edited_parquet_is_rejected_on_read(tmp_path: Path) -> None:
    write_data_dir(small_tables(), tmp_path / "d", "data synth", {})
    ads = pd.read_parquet(tmp_path / "d" / "ads.parquet")
    ads.loc[0, "ecpm"] = -1.0
    ads.to_parquet(tmp_path / "d" / "ads.parquet")
    with pytest.raises(DataError, match=r"ads.ecpm, row 0: negative eCPM"):
        read_data_dir(tmp_path / "d")


def test_failed_rewrite_keeps_the_previous_output(tmp_path: Path) -> None:
    out = tmp_path / "d"
    write_data_dir(small_tables(), out, "data synth", {"v": 1})
    with pytest.raises(DataError):
        write_data_dir(_edit("ads", "ecpm", 0, -1), out, "data synth", {"v": 2})
    assert read_manifest(out)["parameters"] == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_not_a_data_dir(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="no manifest.json"):
        read_data_dir(tmp_path)


def test_synth_is_deterministic_by_seed() -> None:
    a, b = generate(SynthConfig(users=120, seed=3)), generate(SynthConfig(users=120, seed=3))
    c = generate(SynthConfig(users=120, seed=4))
    for (name, x), (_, y) in zip(a.items(), b.items()):
        pd.testing.assert_frame_equal(x, y, obj=name)
    assert not a.events.equals(c.events)


def test_synth_tables_obey_the_contract_and_have_structure(tiny_tables: Tables) -> None:
    t = tiny_tables
    assert len(t.users) == 300 and len(t.ads) == 128
    assert {"age_bucket", "gender", "region", "occupation"} <= set(t.users.columns)
    np.testing.assert_allclose(t.ads["ecpm"], (t.ads["bid"] * t.ads["pctr"] * 1000).round(4))
    assert t.ads["title"].str.len().min() > 10 and t.ads["advertiser"].nunique() > 5
    assert set(t.events["item_type"]) == {"ad", "content"}
    assert {"click", "conversion", "view", "like"} <= set(t.events["action"])
    # Learnable structure: a user's clicks concentrate on few categories.
    clicks = t.events[t.events["action"] == "click"].merge(t.ads, left_on="item_id", right_on="ad_id")
    top3 = clicks.groupby("user_id")["category"].agg(lambda s: s.value_counts().head(3).sum() / len(s))
    assert top3.mean() > 0.7


def test_synth_drift_makes_late_interests_differ_from_early_ones(tiny_tables: Tables) -> None:
    ev = tiny_tables.events.merge(tiny_tables.ads, left_on="item_id", right_on="ad_id")
    ev = ev[ev["action"] == "click"].sort_values("ts", kind="stable")
    changed = 0
    for _, g in ev.groupby("user_id"):
        if len(g) >= 10:
            half = len(g) // 2
            early, late = set(g["category"].iloc[:half]), set(g["category"].iloc[half:])
            changed += bool(late - early)
    assert changed > 20


def test_split_leave_one_out_in_stable_time_order() -> None:
    ts = pd.to_datetime([10, 10, 10, 20, 20, 5], unit="s", utc=True)
    events = pd.DataFrame({
        "user_id": ["u"] * 5 + ["v"], "item_id": ["a", "b", "c", "d", "e", "a"], "item_type": "ad",
        "action": "click", "ts": ts,
    })
    split = leave_one_out(events, ["click"], min_positives=3)
    # Equal timestamps keep file order: a, b, c, then d, e.
    assert split.events[split.events.user_id == "u"]["item_id"].tolist() == ["a", "b", "c", "d", "e"]
    assert split.targets("test").set_index("user_id")["ad_id"].to_dict() == {"u": "e"}
    assert split.targets("validation")["ad_id"].tolist() == ["d"]
    assert sorted(split.train_targets()["item_id"]) == ["a", "a", "b", "c"]  # v has 1 positive: training only
    assert split.before("test")["item_id"].tolist() == ["a", "b", "c", "d"]


def test_split_ignores_repeated_positive_and_non_positive_actions() -> None:
    events = pd.DataFrame({
        "user_id": "u", "item_id": ["a", "a", "b", "x", "c", "c"], "item_type": "ad",
        "action": ["click", "conversion", "click", "view", "click", "conversion"],
        "ts": pd.to_datetime(range(6), unit="s", utc=True),
    })
    split = leave_one_out(events, ["click", "conversion"])
    assert split.events["positive"].tolist() == [True, False, True, False, True, False]
    assert split.targets("test")["ad_id"].tolist() == ["c"] and split.targets("validation")["ad_id"].tolist() == ["b"]


def test_split_never_trains_on_evaluation_targets(tiny_tables: Tables) -> None:
    split = leave_one_out(tiny_tables.events, ["click", "conversion"])
    train = split.train_targets().set_index(["user_id", "pos"]).index
    for name in ("validation", "test"):
        held = split.targets(name).set_index(["user_id", "pos"]).index
        assert len(held) > 200 and not train.isin(held).any()
    val, test = split.targets("validation"), split.targets("test")
    assert (val.set_index("user_id")["pos"] < test.set_index("user_id")["pos"]).all()


def _write_ml1m(folder: Path) -> None:
    folder.mkdir()
    (folder / "movies.dat").write_text("1::Toy Story (1995)::Animation|Children's|Comedy\n2::Heat (1995)::Action|Crime|Thriller\n"
                                       "3::Never Rated (1999)::Drama\n", encoding="latin-1")
    (folder / "users.dat").write_text("1::F::1::10::48067\n2::M::56::16::70072\n3::M::25::15::55117\n")
    ratings = "1::1::5::978300760\n1::2::3::978300760\n2::2::4::978302109\n2::1::2::978301968\n"
    (folder / "ratings_part.dat.gz").write_bytes(gzip.compress(ratings.encode()))


def test_movielens_1m_loader(tmp_path: Path) -> None:
    _write_ml1m(tmp_path / "ml")
    tables, derived = load_movielens(tmp_path / "ml")
    assert tables.users["user_id"].tolist() == ["1", "2"]  # users without ratings are dropped
    u1 = tables.users.iloc[0]
    assert (u1.gender, u1.age_bucket, u1.occupation, u1.zip_prefix) == ("female", "Under 18", "K-12 student", "480")
    assert len(tables.ads) == 3 and tables.ads.iloc[0]["description"] == "Toy Story (1995). Genres: Animation, Children's, Comedy."
    assert tables.ads.iloc[1]["category"] == "Action" and tables.ads.iloc[0]["advertiser"] == "1990s releases"
    assert "ecpm" in derived and len(tables.events) == 4
    # Equal timestamps keep file order through the split.
    split = leave_one_out(normalize(tables).events, ["rating"], min_positives=2)
    assert split.events[split.events.user_id == "1"]["item_id"].tolist() == ["1", "2"]


def test_movielens_100k_loader(tmp_path: Path) -> None:
    folder = tmp_path / "ml100k"
    folder.mkdir()
    (folder / "u.genre").write_text("unknown|0\nAction|1\nComedy|2\n\n")
    (folder / "u.item").write_text("1|Toy Story (1995)|01-Jan-1995||http://x|0|0|1\n2|GoldenEye (1995)|01-Jan-1995||http://y|0|1|0\n",
                                   encoding="latin-1")
    (folder / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|94043\n")
    (folder / "u.data").write_text("1\t1\t5\t874965758\n2\t2\t3\t876893171\n1\t2\t4\t874965759\n")
    tables, _ = load_movielens(folder)
    assert tables.users.set_index("user_id")["age_bucket"].to_dict() == {"1": "18-24", "2": "50-55"}
    assert tables.ads.set_index("ad_id")["category"].to_dict() == {"1": "Comedy", "2": "Action"}
    assert tables.events["rating"].tolist() == [5, 3, 4]


def test_movielens_last_keeps_each_users_latest_ratings(tmp_path: Path) -> None:
    folder = tmp_path / "ml"
    _write_ml1m(folder)
    # user 1 rated 3 then 1 then 2 (file order differs from time order); user 2 once; two ratings share a time
    (folder / "ratings_part.dat.gz").write_bytes(gzip.compress(
        b"1::1::5::200\n1::2::3::300\n1::3::4::100\n2::3::4::150\n2::1::4::150\n"))
    tables, _ = load_movielens(folder, min_positives=2, last=2)
    kept = tables.events.groupby("user_id")["item_id"].apply(list).to_dict()
    assert kept == {"1": ["1", "2"], "2": ["3", "1"]}  # equal timestamps: file order decides, as in the split
    assert load_movielens(folder, min_positives=2)[0].events.shape[0] == 5
    # the derived eCPM sees only the cut: movie 3's training interaction (user 1, t=100) is gone
    full_ecpm = load_movielens(folder, min_positives=2)[0].ads.set_index("ad_id")["ecpm"]
    assert tables.ads.set_index("ad_id")["ecpm"]["3"] < full_ecpm["3"]
    assert main(["data", "movielens", "--path", str(folder), "--out", str(tmp_path / "d"), "--last", "2"]) == 0
    assert read_manifest(tmp_path / "d")["parameters"]["last"] == 2
    assert main(["data", "movielens", "--path", str(folder), "--out", str(tmp_path / "e"), "--last", "0"]) == 2
    assert not (tmp_path / "e").exists()


def test_movielens_bad_line_names_file_and_row(tmp_path: Path) -> None:
    _write_ml1m(tmp_path / "ml")
    (tmp_path / "ml" / "movies.dat").write_text("1::Toy Story (1995)::Comedy\n2::broken line\n")
    with pytest.raises(DataError, match=r"ads, row 1: movies.dat: expected 3 fields"):
        load_movielens(tmp_path / "ml")


def _write_log(tmp_path: Path, suffix: str = ".csv", sep: str = ",") -> tuple[Path, Path]:
    log = pd.DataFrame({"uid": ["x", "y", "x", "x"], "sku": ["p1", "p2", "p2", "p3"],
                        "when": ["2024-01-01T10:00:00Z", "2024-01-02", "2024-01-03", "2024-01-04"],
                        "event": ["buy", "buy", "view", "buy"]})
    items = pd.DataFrame({"sku": ["p1", "p2", "p3"], "name": ["Red shoe", "Blue hat", "Green bag"],
                          "blurb": ["comfy", "warm", "roomy"], "dept": ["shoes", "hats", "bags"]})
    log_file, item_file = tmp_path / f"log{suffix}", tmp_path / f"items{suffix}"
    if suffix.startswith(".parquet"):
        log.to_parquet(log_file), items.to_parquet(item_file)
    else:
        log.to_csv(log_file, sep=sep, index=False), items.to_csv(item_file, sep=sep, index=False)
    return log_file, item_file


@pytest.mark.parametrize("suffix,sep", [(".csv", ","), (".tsv.gz", "\t"), (".parquet", None)])
def test_interactions_loader(tmp_path: Path, suffix: str, sep: str | None) -> None:
    log_file, item_file = _write_log(tmp_path, suffix, sep or ",")
    tables, derived = load_interactions(log_file, item_file, user_col="uid", item_col="sku", time_col="when",
                                        action_col="event", title_col="name", text_cols=("blurb",), category_col="dept")
    assert tables.ads["description"].tolist() == ["Red shoe. comfy", "Blue hat. warm", "Green bag. roomy"]
    assert tables.users["user_id"].tolist() == ["x", "y"] and "ecpm" in derived and "advertiser" in derived
    assert str(tables.events["ts"].iloc[1]) == "2024-01-02 00:00:00+00:00"


def test_interactions_cli_with_unix_times(tmp_path: Path) -> None:
    pd.DataFrame({"user_id": ["a", "a", "a", "b"], "item_id": ["1", "2", "3", "1"], "timestamp": [3, 1, 2, 9]}).to_csv(tmp_path / "log.csv", index=False)
    pd.DataFrame({"item_id": ["1", "2", "3"], "title": ["one", "two", "three"]}).to_csv(tmp_path / "items.csv", index=False)
    assert main(["data", "interactions", "--interactions", str(tmp_path / "log.csv"), "--items", str(tmp_path / "items.csv"),
                 "--out", str(tmp_path / "d")]) == 0
    tables = read_data_dir(tmp_path / "d")
    split = leave_one_out(tables.events, ["interaction"])
    assert split.targets("test")["ad_id"].tolist() == ["1"]  # ts 3 is a's last interaction
    assert read_manifest(tmp_path / "d")["positive_actions"] == ["interaction"]


def test_interactions_errors_name_the_problem(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    log_file, item_file = _write_log(tmp_path)
    with pytest.raises(ValueError, match=r"no column 'user_id'"):
        load_interactions(log_file, item_file)
    bad = pd.read_csv(log_file)
    bad.loc[2, "sku"] = "p9"
    bad.to_csv(log_file, index=False)
    out = tmp_path / "out"
    code = main(["data", "interactions", "--interactions", str(log_file), "--items", str(item_file), "--out", str(out),
                 "--user-col", "uid", "--item-col", "sku", "--time-col", "when", "--title-col", "name"])
    assert code == 2 and "events.item_id, row 2: unknown ad ('p9')" in capsys.readouterr().err
    assert not out.exists()
    pd.DataFrame({"user_id": ["a"], "item_id": ["1"], "timestamp": ["12x"]}).to_csv(tmp_path / "t.csv", index=False)
    pd.DataFrame({"item_id": ["1"], "title": ["one"]}).to_csv(tmp_path / "i.csv", index=False)
    with pytest.raises(DataError, match=r"events.timestamp, row 0: unparsable timestamp \('12x'\)"):
        load_interactions(tmp_path / "t.csv", tmp_path / "i.csv", time_unit="s")


def test_stats(tiny_tables: Tables) -> None:
    stats = data_stats(tiny_tables, SplitSettings(("click", "conversion")))
    counts = stats["counts"]
    assert counts["users"] == 300 and counts["events"] == len(tiny_tables.events)
    assert counts["ad_events"] + counts["content_events"] == counts["events"]
    assert 0 < stats["sparsity"] < 1 and stats["positives_per_user"]["n"] == 300
    assert abs(sum(stats["category_mix"]["catalogue"].values()) - 1) < 0.5
    # evaluated users follow the recorded split's min_positives
    counted = {m: data_stats(tiny_tables, SplitSettings(("click", "conversion"), m))["counts"]["evaluated_users"]
               for m in (2, 8)}
    assert counted == {m: int((leave_one_out(tiny_tables.events, ["click", "conversion"], m).users["test_pos"] >= 0).sum())
                       for m in (2, 8)}
    assert counted[8] < counted[2]


def test_cli_synth_validate_stats(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "d"
    assert main(["data", "synth", "--users", "60", "--seed", "1", "--out", str(out)]) == 0
    assert main(["data", "validate", str(out)]) == 0
    assert "valid" in capsys.readouterr().out
    assert main(["data", "stats", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["counts"]["users"] == 60
    assert main(["data", "validate", str(tmp_path)]) == 2
    assert "no manifest.json" in capsys.readouterr().err


@pytest.mark.slow
def test_movielens_1m_real_files(tmp_path: Path) -> None:
    tables, _ = load_movielens(shared_dataset("movielens-1m"))
    tables = write_data_dir(tables, tmp_path / "ml1m", "data movielens", {}, ["rating"])
    assert len(tables.users) == 2999 and len(tables.events) == 487_650 and len(tables.ads) == 3883
    assert (leave_one_out(tables.events, ["rating"]).users["test_pos"] >= 0).sum() == 2999


@pytest.mark.slow
def test_movielens_100k_real_files(tmp_path: Path) -> None:
    tables, _ = load_movielens(shared_dataset("movielens-100k"))
    tables = write_data_dir(tables, tmp_path / "ml100k", "data movielens", {}, ["rating"])
    assert (len(tables.users), len(tables.ads), len(tables.events)) == (943, 1682, 100_000)


def test_derived_ecpm_counts_the_training_window_only(tmp_path: Path) -> None:
    """User 1 rates movies 1, 2, 3 in that order (validation target 2, test target 3); user 2 rates movie 3 only."""
    import hashlib

    folder = tmp_path / "ml"
    _write_ml1m(folder)
    (folder / "ratings_part.dat.gz").write_bytes(gzip.compress(b"1::1::5::100\n1::2::3::200\n1::3::4::300\n2::3::4::150\n"))

    def expected(ad: str, n: int) -> float:  # DERIVED_ECPM, by hand
        u = int.from_bytes(hashlib.sha1(ad.encode()).digest()[:8], "big") / 2**64
        return round(1000 * (0.2 + 4.8 * u) * 0.05 * (n + 1) / (n + 50), 4)

    tables, derived = load_movielens(folder, min_positives=3)
    assert "training window" in derived["ecpm"]
    # validation and test targets do not count: movie 2 has no training interaction, movie 3 only user 2's
    assert tables.ads.set_index("ad_id")["ecpm"].to_dict() == {"1": expected("1", 1), "2": expected("2", 0),
                                                               "3": expected("3", 1)}
    tables, _ = load_movielens(folder, min_positives=4)  # user 1 is then training-only: every rating counts
    assert tables.ads.set_index("ad_id")["ecpm"].to_dict() == {"1": expected("1", 1), "2": expected("2", 1),
                                                               "3": expected("3", 2)}
    assert main(["data", "movielens", "--path", str(folder), "--out", str(tmp_path / "d"), "--min-positives", "4"]) == 0
    assert read_manifest(tmp_path / "d")["split"] == {"positive_actions": ["rating"], "min_positives": 4}
    assert read_data_dir(tmp_path / "d").ads.set_index("ad_id")["ecpm"]["2"] == expected("2", 1)
    assert main(["data", "movielens", "--path", str(folder), "--out", str(tmp_path / "e"), "--min-positives", "1"]) == 2
