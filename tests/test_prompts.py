"""Prompts: sections, templates, augmentation, alignment tasks, budgets and leakage."""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from leadre.artifacts import read_manifest, write_artifact
from leadre.cli import main
from leadre.prompts import (TEMPLATES, PromptCatalogue, PromptConfig, UserHistory, build_prompt, build_prompt_sets,
                            _stream_windows, count_pieces, read_prompts, user_timelines)
from leadre.schema import Tables
from leadre.sid import TOKEN_RE, SidTable
from leadre.split import leave_one_out

POSITIVES = ["click", "conversion"]


def make_sids(ad_ids: np.ndarray, seed: int = 0) -> SidTable:
    """Unique 3-level codes (the real builder lives in leadre.semantic_ids; prompts only need a table)."""
    n = len(ad_ids)
    rng = np.random.default_rng(seed)
    first = rng.integers(0, 8, n)
    second = np.zeros(n, dtype=np.int64)
    for code in range(8):
        members = np.flatnonzero(first == code)
        second[members] = np.arange(len(members))
    return SidTable(np.asarray(ad_ids), np.stack([first, second, np.zeros(n, dtype=np.int64)], 1), (8, int(second.max()) + 1, 1))


def field_order(prompt: str) -> tuple[str, ...]:
    """The profile's field names in the order the prompt shows them."""
    line = next(x for x in prompt.split("\n") if x.startswith(tuple(t.headers["profile"] for t in TEMPLATES)))
    return tuple(part.split()[0] for part in line.split(" ", 2)[2].split(";"))


@pytest.fixture(scope="module")
def built(tiny_tables: Tables):
    split = leave_one_out(tiny_tables.events, POSITIVES)
    sids = make_sids(tiny_tables.ads["ad_id"].to_numpy())
    return tiny_tables, split, sids, build_prompt_sets(tiny_tables, split, sids, PromptConfig(seed=1))


def sid_tokens_in(text: str) -> list[str]:
    """Runs of S-ID tokens in a text."""
    return re.findall(r"(?:<[a-z]_\d+>)+", text)


def n_ads_shown(prompt: str, levels: int) -> int:
    runs = sid_tokens_in(prompt)
    return len(TOKEN_RE.findall(runs[-1])) // levels if runs else 0


def test_deterministic(built) -> None:
    tables, split, sids, sets = built
    again = build_prompt_sets(tables, split, sids, PromptConfig(seed=1))
    assert again == sets
    other = build_prompt_sets(tables, split, sids, PromptConfig(seed=2))
    assert other["test"] == sets["test"] and other["train"] != sets["train"]


def test_every_section_present_in_every_template(built) -> None:
    _, _, _, sets = built
    seen_templates = set()
    for e in sets["train"] + sets["test"]:
        if e["task"] == "explicit":
            continue
        template = next(t for t in TEMPLATES if t.name == e["template"])
        seen_templates.add(template.name)
        lines = e["prompt"].split("\n")
        assert lines[0] == template.task
        headers = [template.headers[s] for s in template.order] + [template.headers["ads"]]
        assert [line.split(" ")[0] for line in lines[1:]] == [h.split(" ")[0] for h in headers]
        assert lines[-1].startswith(template.headers["ads"])  # the response continues the ad sequence
    assert seen_templates == {t.name for t in TEMPLATES}


def test_counts_per_task(built) -> None:
    tables, split, _, sets = built
    tasks = Counter(e["task"] for e in sets["train"])
    evaluated = int((split.users["test_pos"] >= 0).sum())
    assert len(sets["validation"]) == len(sets["test"]) == evaluated
    assert tasks["explicit"] == len(tables.ads)
    users_with_training = split.train_targets()["user_id"].nunique()
    assert tasks["implicit"] == users_with_training and tasks["stream"] >= users_with_training


def test_training_targets_never_include_validation_or_test(built) -> None:
    _, split, _, sets = built
    train_targets: dict[str, list[str]] = {}
    for e in sets["train"]:
        if e["task"] == "stream":
            train_targets.setdefault(e["user_id"], []).extend(e["targets"])
    expected = split.train_targets().groupby("user_id")["item_id"].agg(list).to_dict()
    # Stream windows cover each user's training positives exactly once, in order.
    assert {u: v for u, v in train_targets.items()} == expected
    held = {(e["user_id"], e["target"]) for e in sets["validation"]}
    val_pos = split.targets("validation").set_index("user_id")["pos"]
    for e in sets["train"]:
        if e["task"] == "implicit":
            user_train = split.train_targets()
            mine = user_train[user_train["user_id"] == e["user_id"]]
            assert e["target"] in set(mine["item_id"]) and mine["pos"].max() < val_pos.get(e["user_id"], 10**9)
    assert held  # non-empty


def test_stream_passes_cover_every_training_positive_once_each_with_shifted_windows(built) -> None:
    tables, split, sids, _ = built
    passes, size = 3, 5
    for n_train in (1, 4, 5, 6, 23):
        windows = list(_stream_windows(n_train, PromptConfig(stream_max_ads=size, stream_passes=passes),
                                       np.random.default_rng(n_train)))
        firsts = [i for i, (start, _) in enumerate(windows) if start == 0]
        assert len(firsts) == passes  # each pass starts over at the oldest positive ...
        for i, (start, end) in enumerate(windows):  # ... and its windows tile the positives in order
            assert 0 <= start < end <= n_train and end - start <= size
            assert end == n_train or windows[i + 1][0] == end
        # the first pass is the plain windowing; a later pass's first boundary falls inside the first window
        assert windows[: firsts[1]] == list(_stream_windows(n_train, PromptConfig(stream_max_ads=size),
                                                            np.random.default_rng(0)))
        assert all(windows[i][1] % size for i in firsts[1:])

    sets = build_prompt_sets(tables, split, sids, PromptConfig(stream_max_ads=size, stream_passes=passes))
    got: dict[str, Counter] = {}
    for e in sets["train"]:
        if e["task"] == "stream":
            got.setdefault(e["user_id"], Counter()).update(e["targets"])
    expected = split.train_targets().groupby("user_id")["item_id"].agg(list).to_dict()
    assert got == {u: Counter({a: passes * n for a, n in Counter(v).items()}) for u, v in expected.items()}


def test_eval_prompt_history_is_strictly_before_the_target(built) -> None:
    tables, split, sids, sets = built
    for name in ("validation", "test"):
        targets = split.targets(name).set_index("user_id")
        before = split.before(name)
        for e in sets[name]:
            history = before[(before["user_id"] == e["user_id"]) & before["positive"]]["item_id"].tolist()
            assert e["seen"] == history and e["target"] == targets.loc[e["user_id"], "ad_id"]
            window = sid_tokens_in(e["prompt"])
            shown = window[-1] if window else ""
            # The ads in the prompt are exactly the most recent part of the history, never the target event.
            n = n_ads_shown(e["prompt"], sids.levels)
            assert shown == "".join(sids.sid_of(a) for a in history[len(history) - n:])
            assert e["completion"] == sids.sid_of(e["target"])


def test_token_budget_holds(built, tiny_tables: Tables) -> None:
    tables, split, sids, _ = built
    cfg = PromptConfig(max_prompt_tokens=120, stream_max_ads=5, max_content_tokens=30)
    sets = build_prompt_sets(tables, split, sids, cfg)
    for e in sets["train"] + sets["validation"] + sets["test"]:
        if e["task"] in ("next_ad", "implicit"):
            assert count_pieces(e["prompt"]) <= cfg.max_prompt_tokens, e["prompt"]
        if e["task"] == "stream":
            assert len(e["targets"]) <= 5 and count_pieces(e["completion"]) == len(e["targets"]) * sids.levels
    assert any(len(e["seen"]) > n_ads_shown(e["prompt"], sids.levels) for e in sets["test"])  # the budget cut some


def test_alignment_examples(built) -> None:
    tables, _, sids, sets = built
    ads = tables.ads.set_index("ad_id")
    explicit = [e for e in sets["train"] if e["task"] == "explicit"]
    assert {e["ad_id"] for e in explicit} == set(ads.index)
    for e in explicit:
        assert e["completion"] == sids.sid_of(e["ad_id"]) and ads.loc[e["ad_id"], "description"] in e["prompt"]
        assert not sid_tokens_in(e["prompt"])
    implicit = [e for e in sets["train"] if e["task"] == "implicit"]
    assert implicit
    for e in implicit:
        assert not sid_tokens_in(e["prompt"]) and e["completion"] == sids.sid_of(e["target"])
    with_history = [e for e in implicit if not e["prompt"].endswith(" ")] or implicit
    assert any(" | " in e["prompt"].split("\n")[-1] for e in implicit), with_history[0]["prompt"]


def test_augmentation_switches(built) -> None:
    tables, split, sids, _ = built
    plain = build_prompt_sets(tables, split, sids, PromptConfig(templates=1, shuffle_profile=False, reuse="last",
                                                                implicit_per_user=0, explicit_repeats=0))
    tasks = Counter(e["task"] for e in plain["train"])
    assert set(tasks) == {"next_ad"} and tasks["next_ad"] == split.train_targets()["user_id"].nunique()
    assert {e["template"] for e in plain["train"]} == {TEMPLATES[0].name}
    assert len({field_order(e["prompt"]) for e in plain["train"]}) == 1
    per_target = build_prompt_sets(tables, split, sids, PromptConfig(reuse="per_target", implicit_per_user=0, explicit_repeats=0))
    assert len(per_target["train"]) == len(split.train_targets())
    shuffled = build_prompt_sets(tables, split, sids, PromptConfig(reuse="per_target", templates=1))
    assert len({field_order(e["prompt"]) for e in shuffled["train"] if e["task"] == "next_ad"}) >= 6


def test_serving_builds_the_same_prompt_from_features_alone(built) -> None:
    tables, split, sids, sets = built
    cat = PromptCatalogue.build(tables.ads, tables.contents, sids)
    before = split.before("test")
    users = tables.users.set_index("user_id")
    for e in sets["test"][:20]:
        mine = before[before["user_id"] == e["user_id"]]
        history = UserHistory(e["user_id"], users.loc[e["user_id"]].astype(str).to_dict(),
                              mine.loc[mine["positive"], "item_id"].tolist(),
                              mine.loc[mine["item_type"] == "content", "item_id"].tolist())
        assert build_prompt(history, cat, PromptConfig()) == e["prompt"]


def test_bad_inputs(built) -> None:
    tables, _, sids, _ = built
    cat = PromptCatalogue.build(tables.ads, tables.contents, sids)
    with pytest.raises(KeyError, match="unknown ad 'nope'"):
        build_prompt(UserHistory("u", {}, ["nope"]), cat, PromptConfig())
    with pytest.raises(KeyError, match=r"unknown content 'c\?'"):
        build_prompt(UserHistory("u", {}, [], ["c?"]), cat, PromptConfig())
    with pytest.raises(ValueError, match="empty catalogue"):
        PromptCatalogue.build(tables.ads.iloc[:0], tables.contents, sids)
    with pytest.raises(ValueError, match="have no S-ID"):
        PromptCatalogue.build(tables.ads, tables.contents, make_sids(tables.ads["ad_id"].to_numpy()[:-3]))
    with pytest.raises(ValueError, match="reuse='everything'"):
        PromptConfig(reuse="everything")


def test_cli_build_and_config_errors(tiny_data_dir: Path, tiny_tables: Tables, tmp_path: Path, capsys) -> None:
    sids = make_sids(tiny_tables.ads["ad_id"].to_numpy())
    for split in (None, read_manifest(tiny_data_dir)["split"]):  # S-IDs must record the data's split
        with write_artifact(tmp_path / "sids", "sids build") as (tmp, manifest):
            sids.save(tmp)
            manifest.update(level_sizes=list(sids.level_sizes), split=split)
        if split is None:
            assert main(["prompts", "build", "--data", str(tiny_data_dir), "--sids", str(tmp_path / "sids"), "--out",
                         str(tmp_path / "prompts")]) == 2
            assert "records no split settings" in capsys.readouterr().err
    config = tmp_path / "cfg.yaml"
    config.write_text("prompts:\n  stream_max_ads: 4\n  implicit_per_user: 2\n")
    out = tmp_path / "prompts"
    assert main(["prompts", "build", "--data", str(tiny_data_dir), "--sids", str(tmp_path / "sids"), "--out", str(out),
                 "--config", str(config)]) == 0
    train = read_prompts(out, "train")
    assert max(len(e.get("targets", [])) for e in train) == 4
    stats = json.loads((out / "stats.json").read_text())
    assert stats["per_task"]["implicit"] > 0 and "next_ad" in stats["lengths"] and (out / "lengths.png").stat().st_size > 0
    config.write_text("prompts:\n  stream_max_adz: 4\n")
    assert main(["prompts", "build", "--data", str(tiny_data_dir), "--sids", str(tmp_path / "sids"), "--out",
                 str(tmp_path / "p2"), "--config", str(config)]) == 2
    assert "unknown key prompts.stream_max_adz" in capsys.readouterr().err and not (tmp_path / "p2").exists()
    config.write_text("prompts:\n  stream_max_ads: many\n")
    assert main(["prompts", "build", "--data", str(tiny_data_dir), "--sids", str(tmp_path / "sids"), "--out",
                 str(tmp_path / "p2"), "--config", str(config)]) == 2
    assert "prompts.stream_max_ads: expected int" in capsys.readouterr().err


def test_evaluation_examples_are_the_splits_targets(built) -> None:
    """Validation and test examples come from the split's own targets and histories (nothing re-derived), and the
    training window ends right before each evaluated user's validation target."""
    from leadre.metrics import user_histories

    tables, split, sids, sets = built
    for which in ("validation", "test"):
        targets, histories = user_histories(split, which)
        assert [e["user_id"] for e in sets[which]] == targets["user_id"].tolist()
        assert [e["target"] for e in sets[which]] == targets["ad_id"].tolist()
        assert [e["seen"] for e in sets[which]] == histories
    validation = split.targets("validation").set_index("user_id")["pos"]
    for t in user_timelines(tables, split):
        window = t.ad_pos[:t.n_train]
        assert (window < validation[t.user_id]).all() if t.target_pos else t.n_train == len(t.ads)
        if t.target_pos:
            assert t.ad_pos[t.n_train] == validation[t.user_id]
