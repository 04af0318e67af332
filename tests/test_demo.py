"""The README's main job, `leadre demo`, end to end at a small scale: the pipeline through kfp.local, Feast, both
predictors as real `leadre serve` processes answering V1 and V2 requests, the drift report, the summary."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pandas as pd
import pytest

from leadre.cli import main

STEPS = ("ingest", "semantic_ids", "prompts", "sft", "dpo", "evaluate", "gate", "compile", "bundle", "nearline",
         "deploy", "serve", "traffic", "drift")
USERS = 150


def _answers(printed: str, header: str) -> list[list[str]]:
    """The ad lines printed under the request headers that contain `header`: [rank, ad_id, score label, ...]."""
    blocks = printed.split("  user ")[1:]
    return [[line.split() for line in block.splitlines()[2:] if re.match(r"\s+\d+\. ", line)]
            for block in blocks if header in block.splitlines()[0]]


def test_demo_runs_everything_and_answers_v1_and_v2_requests(tmp_path: Path, tiny_pipeline_config: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--users", str(USERS), "--config", str(tiny_pipeline_config)]) == 0
    printed = capsys.readouterr().out
    step_lines = [line for line in printed.splitlines() if line.startswith("[")]
    assert [line[1:line.index("]")] for line in step_lines] == list(STEPS)  # one line per step, in order
    assert all(re.search(r"\(\d+ s\)$", line) for line in step_lines)  # each with its time, in seconds
    assert len(printed.splitlines()) < 80  # one screen of progress and requests, then the summary

    ads = pd.read_parquet(out / "deploy" / "current" / "ads.parquet").set_index("ad_id")
    [v1], [v2], [live] = (_answers(printed, h) for h in ("recall over V1", "recall over V2", "nearline (live"))
    for answer in (v1, v2, live):
        assert len(answer) == 10 and len({row[1] for row in answer}) == 10
        assert ads.loc[[row[1] for row in answer], "active"].all()  # never a paused ad
        assert all(row[2] in ("log-prob", "popularity") for row in answer)  # scores say what they are
    assert all(row[4] == "llm" for row in v1)  # answered from the near-line lists the pipeline put in Feast
    assert printed.count("recent ads of the user") == 3

    assert "Evaluation on the held-out users" in printed
    metrics = json.loads(next((out / "kfp").glob("*/evaluate/evaluation/metrics.json")).read_text())
    for model in ("dpo", "sft", "popularity", "cooccurrence"):
        assert model in metrics["results"] and re.search(rf"^{model}\s+\d\.\d{{3}} / ", printed, re.M)
    summary = json.loads((out / "drift" / "summary.json").read_text())
    assert summary["counts"]["users"] == USERS and (out / "drift" / "report.html").is_file()
    assert {json.loads(line)["model"] for f in (out / "requests").rglob("*.jsonl") for line in f.open()} \
        == {"recall", "nearline"}

    # nothing left behind: no trainer work folders or temporary artifacts, no predictor still listening
    assert not [p for p in out.rglob("*") if p.name.endswith(".work") or p.name.startswith(".")]
    for url in re.findall(r"(?:recall|nearline) at (http://127\.0\.0\.1:\d+)", printed):
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/v2/health/live", timeout=2)
