from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from leadre.cli import build_parser, main
from leadre.gate import (DPO_POLICY, METRICS_FILE, PLOT_FILE, TABLE_FILE, MetricsError, Policy, decide,
                         read_evaluation, write_evaluation)


def document(recall: float, ecpm: float = 100.0, invalid: float = 0.0, model: str = "sft") -> dict:
    """A metrics.json document as `write_evaluation` writes it."""
    metrics = {"recall@10": recall, "ndcg@10": recall / 2, "ecpm@10": ecpm, "invalid_id_rate": invalid, "users": 100}
    return {"schema_version": 1, "model": model, "ks": [10],
            "results": {model: {"validation": {"seen_kept": metrics}}, "popularity": {"validation": {"seen_kept": metrics}}}}


def test_promote_when_better_keep_when_worse_or_equal() -> None:
    better = decide(document(0.21), document(0.20))
    assert better.promote and "recall@10 0.2100 vs current 0.2000" in better.reason
    assert better.candidate == {"model": "sft", "recall@10": 0.21, "ecpm@10": 100.0, "invalid_id_rate": 0.0}
    assert not decide(document(0.19), document(0.20)).promote
    assert not decide(document(0.20), document(0.20)).promote


def test_min_gain_absolute_and_relative() -> None:
    assert not decide(document(0.205), document(0.20), Policy(min_gain=0.01)).promote
    assert decide(document(0.215), document(0.20), Policy(min_gain=0.01)).promote
    assert not decide(document(0.203), document(0.20), Policy(min_gain=0.02, relative_gain=True)).promote
    assert decide(document(0.205), document(0.20), Policy(min_gain=0.02, relative_gain=True)).promote


def test_guards_keep_the_current_model() -> None:
    ecpm_drop = decide(document(0.30, ecpm=90.0), document(0.20, ecpm=100.0), Policy(max_guard_drop=0.05))
    assert not ecpm_drop.promote and "ecpm@10 90.0000 vs current 100.0000 (drop 10.00%" in ecpm_drop.reason
    assert decide(document(0.30, ecpm=96.0), document(0.20, ecpm=100.0), Policy(max_guard_drop=0.05)).promote
    invalid = decide(document(0.30, invalid=0.02), document(0.20))
    assert not invalid.promote and "invalid-ID rate 0.0200" in invalid.reason


def test_dpo_ships_only_when_ecpm_rises_without_losing_recall() -> None:
    sft = document(0.20, ecpm=100.0)
    assert decide(document(0.20, ecpm=107.0), sft, DPO_POLICY).promote
    assert decide(document(0.197, ecpm=107.0), sft, DPO_POLICY).promote  # -1.5% recall is within the 2% guard
    lost_recall = decide(document(0.19, ecpm=120.0), sft, DPO_POLICY)
    assert not lost_recall.promote and "recall@10 0.1900 vs current 0.2000 (drop 5.00%" in lost_recall.reason
    assert not decide(document(0.25, ecpm=99.0), sft, DPO_POLICY).promote  # more recall alone is not DPO's job


def test_first_deployment_promotes_unless_ids_are_invalid() -> None:
    first = decide(document(0.01), None)
    assert first.promote and first.current is None and "nothing deployed yet" in first.reason
    assert not decide(document(0.01, invalid=0.5), None).promote


def test_policy_selects_split_variant_and_metric() -> None:
    candidate, current = document(0.21), document(0.20)
    candidate["results"]["sft"]["test"] = {"seen_excluded": {"ndcg@10": 0.01, "ecpm@10": 1.0, "invalid_id_rate": 0.0}}
    current["results"]["sft"]["test"] = {"seen_excluded": {"ndcg@10": 0.02, "ecpm@10": 1.0}}
    assert not decide(candidate, current, Policy(metric="ndcg@10", split="test", variant="seen_excluded")).promote


@pytest.mark.parametrize("edit, key", [
    (lambda d: d["results"]["sft"]["validation"]["seen_kept"].pop("recall@10"), "results.sft.validation.seen_kept.recall@10"),
    (lambda d: d["results"].pop("sft"), "results.sft"),
    (lambda d: d.pop("model"), "model"),
    (lambda d: d.update(schema_version=2), "schema_version"),
    (lambda d: d["results"]["sft"].update(validation=[]), "results.sft.validation"),
    (lambda d: d["results"]["sft"]["validation"]["seen_kept"].update({"ecpm@10": "high"}), "results.sft.validation.seen_kept.ecpm@10"),
])
def test_malformed_metrics_name_the_key(edit, key: str) -> None:
    bad = document(0.2)
    edit(bad)
    with pytest.raises(MetricsError) as error:
        decide(document(0.2), bad)
    assert error.value.source == "current" and error.value.key == key


def test_write_evaluation_round_trip(tmp_path: Path) -> None:
    results = document(0.2)["results"]
    write_evaluation(tmp_path / "eval", results, "sft", ks=[10])
    assert read_evaluation(tmp_path / "eval") == document(0.2)
    table = (tmp_path / "eval" / TABLE_FILE).read_text()
    assert "| metric | sft | popularity |" in table and "| recall@10 | 0.2000 | 0.2000 |" in table
    assert (tmp_path / "eval" / PLOT_FILE).read_bytes()[:4] == b"\x89PNG"
    assert read_evaluation(tmp_path / "missing") is None
    (tmp_path / "empty").mkdir()
    assert read_evaluation(tmp_path / "empty") is None
    with pytest.raises(ValueError, match="'nope' is not among the results"):
        write_evaluation(tmp_path / "other", results, "nope")


def evaluation_dir(path: Path, doc: dict) -> Path:
    path.mkdir(parents=True)
    (path / METRICS_FILE).write_text(json.dumps(doc))
    return path


def test_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    better, worse = evaluation_dir(tmp_path / "better", document(0.3)), evaluation_dir(tmp_path / "worse", document(0.1))
    out = tmp_path / "decision" / "gate.json"
    assert main(["gate", "--candidate", str(better), "--current", str(worse), "--out", str(out)]) == 0
    assert "PROMOTE" in capsys.readouterr().out
    decision = json.loads(out.read_text())
    assert decision["decision"] == "promote" and decision["current"]["recall@10"] == 0.1
    assert main(["gate", "--candidate", str(worse), "--current", str(better)]) == 1
    assert "KEEP CURRENT" in capsys.readouterr().out
    assert main(["gate", "--candidate", str(worse), "--current", str(tmp_path / "nothing-yet")]) == 0


def test_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = evaluation_dir(tmp_path / "good", document(0.3))
    bad_doc = document(0.1)
    del bad_doc["results"]["sft"]["validation"]["seen_kept"]["ecpm@10"]
    bad = evaluation_dir(tmp_path / "bad", bad_doc)
    assert main(["gate", "--candidate", str(good), "--current", str(bad)]) == 2
    assert f"{bad / METRICS_FILE}: results.sft.validation.seen_kept.ecpm@10: missing" in capsys.readouterr().err
    not_json = tmp_path / "not-json"
    not_json.mkdir()
    (not_json / METRICS_FILE).write_text("{")
    assert main(["gate", "--candidate", str(not_json), "--current", str(good)]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "notes.txt").write_text("")
    assert main(["gate", "--candidate", str(good), "--current", str(stray)]) == 2
    assert f"{stray}: no {METRICS_FILE}" in capsys.readouterr().err
    assert main(["gate", "--candidate", str(tmp_path / "absent"), "--current", str(good)]) == 2


def test_cli_defaults_are_the_policy_defaults() -> None:
    args = build_parser().parse_args(["gate", "--candidate", "c", "--current", "d"])
    assert {f.name: getattr(args, f.name) for f in dataclasses.fields(Policy)} == dataclasses.asdict(Policy())
