"""bench/quality.py end to end on the tiny marketplace: a validation-only run, then `--reuse --splits test` on the
models it trained (the protocol that keeps the test split for the final table)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("quality_bench", BENCH / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quality_chooses_on_validation_then_reuses_the_models_on_test(quality, tiny_data_dir: Path, tiny_config: Path,
                                                                      tmp_path: Path) -> None:
    common = ["--data", str(tiny_data_dir), "--name", "tiny", "--config", str(tiny_config), "--variants", "full",
              "--minutes", "2", "--eval-users", "30", "--beam", "10", "--device", "cpu",
              "--work", str(tmp_path / "work"), "--results", str(tmp_path / "results")]
    quality.main(common + ["--splits", "validation"])
    first = json.loads((tmp_path / "results" / "quality-tiny.json").read_text())
    assert set(first["results"]) == {"full", "no_dpo", "popularity", "cooccurrence"}
    assert all(set(splits) == {"validation"} for splits in first["results"].values())
    assert first["dpo_gate"] is not None  # the gate decides on validation
    assert {"sids", "sft-full", "dpo-full", "evaluate"} == set(first["timings_seconds"])
    markdown = (tmp_path / "results" / "quality-tiny.md").read_text()
    assert "validation, seen excluded" in markdown and "test, seen" not in markdown

    trained = {d: (tmp_path / "work" / "tiny" / d / "manifest.json").read_text() for d in ("sids", "sft-full", "dpo-full")}
    quality.main(common + ["--splits", "test", "--reuse"])
    again = json.loads((tmp_path / "results" / "quality-tiny-test.json").read_text())
    # nothing retrained: the same artifacts, and the training times are the first run's
    assert trained == {d: (tmp_path / "work" / "tiny" / d / "manifest.json").read_text() for d in trained}
    assert {k: again["timings_seconds"][k] for k in ("sids", "sft-full", "dpo-full")} == \
        {k: first["timings_seconds"][k] for k in ("sids", "sft-full", "dpo-full")}
    assert all(set(splits) == {"test"} for splits in again["results"].values()) and again["dpo_gate"] is None
    assert (tmp_path / "work" / "tiny" / "evaluation-test").is_dir()
    assert "test, seen excluded" in (tmp_path / "results" / "quality-tiny-test.md").read_text()
    # the first run's report is left as it was
    assert json.loads((tmp_path / "results" / "quality-tiny.json").read_text()) == first

    (tmp_path / "other.yaml").write_text(tiny_config.read_text())
    other = [a if a != str(tiny_config) else str(tmp_path / "other.yaml") for a in common]
    with pytest.raises(SystemExit, match="was trained with config"):
        quality.main(other + ["--splits", "test", "--reuse"])
