"""The README's main job, `leadre demo`, end to end at a small scale."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from leadre.cli import main


def test_demo_runs_every_step_and_answers_a_request(tmp_path: Path, tiny_config: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--users", "150", "--config", str(tiny_config)]) == 0
    printed = capsys.readouterr().out
    for step in ("[data]", "[sids]", "[prompts]", "[sft]", "[dpo]", "[evaluate]", "[gate]", "[recall]"):
        assert step in printed
    for artifact in ("data", "sids", "prompts", "sft", "dpo", "evaluation"):
        assert (out / artifact / "manifest.json").is_file(), artifact
    metrics = json.loads((out / "evaluation" / "metrics.json").read_text())
    assert {"dpo", "sft", "popularity", "cooccurrence"} <= set(metrics["results"])
    recalled = [line.split()[0] for line in printed.split("[recall]")[1].splitlines()[1:] if line.startswith("    ad")]
    assert len(recalled) == 10 and len(set(recalled)) == 10
    import pandas as pd

    active = pd.read_parquet(out / "data" / "ads.parquet").set_index("ad_id")["active"]
    assert active[recalled].all()  # serving never returns a paused ad
