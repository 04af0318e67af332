from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from leadre.cli import build_parser, main
from leadre.gate import (DPO_POLICY, METRICS_FILE, PER_USER_FILE, PLOT_FILE, TABLE_FILE, EvaluationMismatch,
                         MetricsError, Policy, decide, read_evaluation, write_evaluation)
from leadre.metrics import VARIANTS

N_USERS = 1000
PROTOCOL = {"data": "d" * 64, "sids": "s" * 64, "split": {"positive_actions": ["click"], "min_positives": 3},
            "search": {"beam": 50, "renormalize": False, "dtype": "float32"},
            "users": {split: {"count": N_USERS, "fingerprint": "u" * 64, "sample": None, "seed": 0}
                      for split in ("validation", "test")}}


def document(recall: float, ecpm: float = 100.0, invalid: float = 0.0, model: str = "sft",
             ecpm_noise: float = 0.0) -> dict:
    """An evaluation as `read_evaluation` returns it: metrics.json plus the per-user table behind it. The first
    `recall * N_USERS` users hit at rank 0 (so a higher recall hits a superset of users: a paired improvement);
    user u's eCPM@10 is `ecpm` times a fixed weight (mean 1) times (1 + noise)."""
    ranks = np.where(np.arange(N_USERS) < round(recall * N_USERS), 0, -1)
    weights = np.linspace(0.5, 1.5, N_USERS) * (1 + ecpm_noise * np.random.default_rng(7).standard_normal(N_USERS))
    user_ecpm = ecpm * weights
    metrics = {"recall@10": float((ranks == 0).mean()), "ndcg@10": float((ranks == 0).mean()),
               "ecpm@10": float(user_ecpm.mean()), "invalid_id_rate": invalid, "list_length": 50.0, "users": N_USERS}
    results = {split: {variant: dict(metrics) for variant in VARIANTS} for split in ("validation", "test")}
    per_user = pd.concat([pd.DataFrame({"model": model, "split": split, "variant": variant,
                                        "user_id": [f"u{i}" for i in range(N_USERS)], "rank": ranks,
                                        "length": 50, "ecpm@10": user_ecpm})
                          for split in ("validation", "test") for variant in VARIANTS], ignore_index=True)
    return {"schema_version": 2, "model": model, "ks": [10], "protocol": json.loads(json.dumps(PROTOCOL)),
            "results": {model: results}, "intervals": {}, "confidence": 0.95, "per_user": per_user}


def test_promote_only_when_better_beyond_noise() -> None:
    better = decide(document(0.25), document(0.20))
    assert better.promote and "recall@10 0.2500 vs current 0.2000: gain +0.0500, 95% interval [+0.0" in better.reason
    assert better.candidate == {"model": "sft", "recall@10": 0.25, "ecpm@10": 100.0, "invalid_id_rate": 0.0}
    assert better.gain["users"] == N_USERS and 0.03 < better.gain["low"] < 0.05 < better.gain["high"] < 0.07
    assert not decide(document(0.19), document(0.20)).promote
    assert not decide(document(0.20), document(0.20)).promote
    within_noise = decide(document(0.202), document(0.20))  # two more hits in 1,000 users: noise could do that
    assert not within_noise.promote and within_noise.gain["estimate"] == pytest.approx(0.002)
    assert "its lower bound must exceed +0.0000" in within_noise.reason


def test_min_gain_applies_to_the_lower_confidence_bound() -> None:
    assert decide(document(0.25), document(0.20), Policy(min_gain=0.02)).promote
    assert not decide(document(0.25), document(0.20), Policy(min_gain=0.045)).promote  # the estimate exceeds it
    assert decide(document(0.25), document(0.20), Policy(min_gain=0.10, relative_gain=True)).promote
    relative = decide(document(0.25), document(0.20), Policy(min_gain=0.20, relative_gain=True))
    assert not relative.promote and "gain +25.00%" in relative.reason


def test_guards_keep_the_current_model() -> None:
    ecpm_drop = decide(document(0.30, ecpm=90.0), document(0.20, ecpm=100.0), Policy(max_guard_drop=0.05))
    assert not ecpm_drop.promote and "ecpm@10 90.0000 vs current 100.0000 (drop 10.00%" in ecpm_drop.reason
    assert decide(document(0.30, ecpm=96.0), document(0.20, ecpm=100.0), Policy(max_guard_drop=0.05)).promote
    invalid = decide(document(0.30, invalid=0.02), document(0.20))
    assert not invalid.promote and "invalid-ID rate 0.0200" in invalid.reason


def test_a_current_guard_of_zero_does_not_pass_by_itself() -> None:
    guard_recall = Policy(metric="ecpm@10", relative_gain=True, guard_metric="recall@10")
    both_zero = decide(document(0.0, ecpm=120.0, ecpm_noise=0.1), document(0.0, ecpm=100.0), guard_recall)
    assert not both_zero.promote and "a current value of 0 guards nothing" in both_zero.reason
    assert decide(document(0.01, ecpm=120.0, ecpm_noise=0.1), document(0.0, ecpm=100.0), guard_recall).promote


def test_dpo_ships_only_when_ecpm_rises_without_losing_recall() -> None:
    sft = document(0.20, ecpm=100.0)
    assert decide(document(0.20, ecpm=107.0, ecpm_noise=0.2), sft, DPO_POLICY).promote
    assert decide(document(0.197, ecpm=107.0), sft, DPO_POLICY).promote  # -1.5% recall is within the 2% guard
    lost_recall = decide(document(0.19, ecpm=120.0), sft, DPO_POLICY)
    assert not lost_recall.promote and "recall@10 0.1900 vs current 0.2000 (drop 5.00%" in lost_recall.reason
    assert not decide(document(0.25, ecpm=99.0), sft, DPO_POLICY).promote  # more recall alone is not DPO's job
    noisy = decide(document(0.20, ecpm=100.5, ecpm_noise=0.5), sft, DPO_POLICY)  # +0.5% under large per-user noise
    assert not noisy.promote and noisy.gain["low"] < 0 < noisy.gain["high"]


def test_first_deployment_promotes_unless_ids_are_invalid() -> None:
    first = decide(document(0.01), None)
    assert first.promote and first.current is None and "first deployment" in first.reason
    assert not decide(document(0.01, invalid=0.5), None).promote


def test_policy_selects_split_variant_and_metric() -> None:
    candidate, current = document(0.25), document(0.20)
    candidate["results"]["sft"]["test"]["seen_kept"]["ndcg@10"] = 0.1  # the table's numbers are what the gate reports
    decision = decide(candidate, current, Policy(metric="ndcg@10", split="test", variant="seen_kept"))
    assert decision.promote and "test/seen_kept ndcg@10 0.1000 vs current 0.2000" in decision.reason
    with pytest.raises(ValueError, match="per-user values exist for recall@K, ndcg@K and ecpm@K only"):
        Policy(metric="coverage@10")


@pytest.mark.parametrize("key, value", [
    ("data", "e" * 64), ("sids", "t" * 64), ("split", {"positive_actions": ["click"], "min_positives": 4}),
    ("search", {"beam": 20, "renormalize": False, "dtype": "float32"}),
    ("search", {"beam": 50, "renormalize": False, "dtype": "bfloat16"}),
    ("users", {"count": N_USERS, "fingerprint": "v" * 64, "sample": 1000, "seed": 1}),
])
def test_mismatched_evaluations_are_refused(key: str, value) -> None:
    current = document(0.20)
    if key == "users":
        current["protocol"]["users"]["validation"] = value
    else:
        current["protocol"][key] = value
    with pytest.raises(EvaluationMismatch, match=f"different {key}"):
        decide(document(0.25), current)
    if key == "sids":  # a candidate with its own S-IDs, when the policy says so
        assert decide(document(0.25), current, Policy(allow_new_sids=True)).promote


def test_per_user_values_must_cover_the_same_users() -> None:
    current = document(0.20)
    current["per_user"] = current["per_user"][current["per_user"]["user_id"] != "u3"]
    with pytest.raises(EvaluationMismatch, match="different users"):
        decide(document(0.25), current)
    del current["per_user"]
    with pytest.raises(MetricsError, match=f"per_user: missing: the paired test needs {PER_USER_FILE}"):
        decide(document(0.25), current)


@pytest.mark.parametrize("edit, key", [
    (lambda d: d["results"]["sft"]["validation"]["seen_excluded"].pop("recall@10"),
     "results.sft.validation.seen_excluded.recall@10"),
    (lambda d: d["results"].pop("sft"), "results.sft"),
    (lambda d: d.pop("model"), "model"),
    (lambda d: d.update(schema_version=1), "schema_version"),
    (lambda d: d["results"]["sft"].update(validation=[]), "results.sft.validation"),
    (lambda d: d["results"]["sft"]["validation"]["seen_excluded"].update({"ecpm@10": "high"}),
     "results.sft.validation.seen_excluded.ecpm@10"),
    (lambda d: d.pop("protocol"), "protocol"),
    (lambda d: d["protocol"].pop("data"), "protocol.data"),
])
def test_malformed_metrics_name_the_key(edit, key: str) -> None:
    bad = document(0.2)
    edit(bad)
    with pytest.raises(MetricsError) as error:
        decide(document(0.2), bad)
    assert error.value.source == "current" and error.value.key == key


def evaluation_dir(path: Path, doc: dict) -> Path:
    """Write `doc` the way `leadre evaluate` does."""
    intervals = {"sft": {"validation": {"seen_excluded": {"recall@10": [0.19, 0.23]}}}}
    write_evaluation(path, doc["results"], doc["model"], doc["ks"], intervals, doc["per_user"], doc["protocol"])
    return path


def test_write_evaluation_round_trip(tmp_path: Path) -> None:
    doc = document(0.21)
    evaluation_dir(tmp_path / "eval", doc)
    back = read_evaluation(tmp_path / "eval")
    pd.testing.assert_frame_equal(back.pop("per_user"), doc.pop("per_user"))
    assert back == doc | {"intervals": {"sft": {"validation": {"seen_excluded": {"recall@10": [0.19, 0.23]}}}}}
    table = (tmp_path / "eval" / TABLE_FILE).read_text()
    assert "| metric | sft |" in table and "| recall@10 | 0.2100 (0.1900–0.2300) |" in table
    assert table.index("## validation, seen excluded") < table.index("## validation, seen kept")  # headline first
    assert "95% confidence intervals, bootstrap over users" in table
    assert (tmp_path / "eval" / PLOT_FILE).read_bytes()[:4] == b"\x89PNG"
    assert read_evaluation(tmp_path / "missing") is None
    (tmp_path / "empty").mkdir()
    assert read_evaluation(tmp_path / "empty") is None
    with pytest.raises(ValueError, match="'nope' is not among the results"):
        write_evaluation(tmp_path / "other", doc["results"], "nope")


def test_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    better, worse = evaluation_dir(tmp_path / "better", document(0.3)), evaluation_dir(tmp_path / "worse", document(0.1))
    out = tmp_path / "decision" / "gate.json"
    assert main(["gate", "--candidate", str(better), "--current", str(worse), "--out", str(out)]) == 0
    assert "PROMOTE" in capsys.readouterr().out
    decision = json.loads(out.read_text())
    assert decision["decision"] == "promote" and decision["current"]["recall@10"] == 0.1
    assert decision["gain"]["estimate"] == pytest.approx(0.2) and decision["gain"]["low"] > 0.17
    assert main(["gate", "--candidate", str(worse), "--current", str(better)]) == 1
    assert "KEEP CURRENT" in capsys.readouterr().out
    # nothing deployed: only with an explicit --first-deploy
    assert main(["gate", "--candidate", str(worse), "--current", str(tmp_path / "nothing-yet")]) == 2
    assert "pass --first-deploy if nothing is deployed yet" in capsys.readouterr().err
    assert main(["gate", "--candidate", str(worse), "--first-deploy"]) == 0
    assert "first deployment" in capsys.readouterr().out
    assert main(["gate", "--candidate", str(worse), "--current", str(tmp_path / "nothing-yet"), "--first-deploy"]) == 0
    assert main(["gate", "--candidate", str(worse), "--current", str(better), "--first-deploy"]) == 2
    assert "--first-deploy says nothing is deployed" in capsys.readouterr().err
    assert main(["gate", "--candidate", str(worse)]) == 2


def test_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = evaluation_dir(tmp_path / "good", document(0.3))
    bad_doc = document(0.1)
    del bad_doc["results"]["sft"]["validation"]["seen_excluded"]["ecpm@10"]
    bad = evaluation_dir(tmp_path / "bad", bad_doc)
    assert main(["gate", "--candidate", str(good), "--current", str(bad)]) == 2
    assert f"{bad / METRICS_FILE}: results.sft.validation.seen_excluded.ecpm@10: missing" in capsys.readouterr().err
    other_data = document(0.1)
    other_data["protocol"]["data"] = "e" * 64
    assert main(["gate", "--candidate", str(good), "--current", str(evaluation_dir(tmp_path / "o", other_data))]) == 2
    assert "evaluated with different data" in capsys.readouterr().err
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
