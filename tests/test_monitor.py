"""Drift monitoring: the request log under threads, rotation and exit; Evidently reports on real logs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from leadre.artifacts import write_artifact
from leadre.bundle import history_from_events
from leadre.cli import main
from leadre.monitor import (EXIT_DRIFT, RequestLog, load_latest_summary, publish_drift, read_logs,
                            reference_frames, since_last, watch_drift)
from leadre.schema import Tables, positive_actions_of


def _record(user: str, i: int = 0, **extra) -> dict:
    return {"model_version": "sft-test", "user_id": user, "profile": {"age_bucket": "18-24"}, "n_ads": i,
            "n_contents": 0, "ads": ["a1"], "categories": ["travel"], "source": "llm", **extra}


def test_request_log_threads_rotation(tmp_path: Path) -> None:
    threads, per_thread = 8, 400
    with RequestLog(tmp_path, "recall", flush_records=64, max_file_bytes=8192) as request_log:
        def work(t: int) -> None:
            for i in range(per_thread):
                request_log.log(_record(f"t{t}", i))

        workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    files = sorted(tmp_path.glob("*.jsonl"))
    assert len(files) > 5  # rotated by size
    assert all(f.stat().st_size < 8192 + 512 for f in files)  # inside a batch too: at most one line past the limit
    df = read_logs(tmp_path)
    assert len(df) == threads * per_thread and df.attrs["malformed"] == 0
    assert set(zip(df["user_id"], df["n_ads"])) == {(f"t{t}", i) for t in range(threads) for i in range(per_thread)}
    assert (df["model"] == "recall").all() and df["ts"].is_monotonic_increasing


def test_request_log_hours_window_and_malformed_lines(tmp_path: Path) -> None:
    with RequestLog(tmp_path, "recall") as recall, RequestLog(tmp_path, "nearline") as nearline:
        for hour in (9, 10, 11):
            for minute in (0, 59):
                recall.log(_record(f"r{hour}{minute}", ts=f"2026-11-26T{hour:02d}:{minute:02d}:30+00:00"))
        nearline.log(_record("n1", ts="2026-11-26T12:30:00+02:00"))  # 10:30 UTC
    names = sorted(f.name for f in tmp_path.glob("*.jsonl"))
    assert [n[:13] for n in names] == ["2026-11-26T09", "2026-11-26T10", "2026-11-26T10", "2026-11-26T11"]
    window = read_logs(tmp_path, since="2026-11-26T10:00", until="2026-11-26T11:00")
    assert sorted(window["user_id"]) == ["n1", "r100", "r1059"]
    assert list(read_logs(tmp_path, since="2026-11-26T10:00", model="nearline")["user_id"]) == ["n1"]
    with open(tmp_path / names[-1], "a") as f:
        f.write('{"ts": "2026-11-26T11:10:00+00:00", "user_id": "x"}\n{"torn": \n')
        f.write(json.dumps(_record("y", ts="yesterday", model="recall")) + "\n")
    df = read_logs(tmp_path)
    assert len(df) == 7 and df.attrs["malformed"] == 3
    with RequestLog(tmp_path / "recent", "recall") as request_log:
        request_log.log(_record("old", ts=pd.Timestamp.now(tz="UTC") - pd.Timedelta("2d")))
        request_log.log(_record("new"))
    assert list(read_logs(tmp_path / "recent", since=since_last("1d"))["user_id"]) == ["new"]
    with pytest.raises(ValueError, match="24h"):
        since_last("yesterday")
    with pytest.raises(ValueError, match="empty window"):
        read_logs(tmp_path, since="2026-11-26T11:00", until="2026-11-26T10:00")
    with pytest.raises(FileNotFoundError, match="no such request-log directory"):
        read_logs(tmp_path / "absent")
    with RequestLog(tmp_path, "recall") as request_log, pytest.raises(ValueError, match="source"):
        request_log.log({"user_id": "u"})


def test_request_log_flushes_on_interval_and_at_exit(tmp_path: Path) -> None:
    with RequestLog(tmp_path / "a", "recall", flush_interval=0.05) as request_log:
        request_log.log(_record("u1"))
        deadline = time.monotonic() + 5
        while not read_logs(tmp_path / "a").shape[0] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(read_logs(tmp_path / "a")) == 1  # written by the background thread, before close
    # A process that never calls close(): the atexit hook writes what is buffered (long interval, big batches).
    code = (f"from leadre.monitor import RequestLog\n"
            f"r = RequestLog({str(tmp_path / 'b')!r}, 'nearline', flush_interval=3600, flush_records=10**6)\n"
            f"for i in range(500): r.log({_record('u', 0)!r} | {{'n_ads': i}})\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert sorted(read_logs(tmp_path / "b")["n_ads"]) == list(range(500))


# --- reports ---------------------------------------------------------------------------------------------------

def _serving_view(tables: Tables, data_dir: Path, users: pd.Series) -> list:
    """What serving would log for these users: histories built the serving way, k=10 categories drawn from the ads
    each user engaged with (the no-drift case: the model recalls what users like)."""
    rng = np.random.default_rng(0)
    category = tables.ads.set_index("ad_id")["category"]
    profiles = tables.users.set_index("user_id")
    events = dict(tuple(tables.events.groupby("user_id")))
    rows = []
    for user in users:
        history, _ = history_from_events(user, profiles.loc[user].to_dict(), events.get(user, tables.events[:0]),
                                         positive_actions_of(data_dir), tables.ads["ad_id"], tables.contents["content_id"])
        liked = category[history.ads].tolist()
        rows.append((history, rng.choice(liked, 10).tolist() if liked else []))
    return rows


def _write_logs(log_dir: Path, rows: list, n_ads=lambda n: n, n_contents=lambda n: n, categories=None) -> None:
    with RequestLog(log_dir, "recall") as request_log:
        for history, cats in rows:
            cats = categories or cats
            request_log.log({"model_version": "sft-test", "user_id": history.user_id, "profile": history.profile,
                             "n_ads": n_ads(len(history.ads)), "n_contents": n_contents(len(history.contents)),
                             "ads": [f"a{i}" for i in range(len(cats))], "categories": cats,
                             "source": "llm" if cats else "fallback"})


@pytest.fixture(scope="module")
def serving_rows(tiny_tables: Tables, tiny_data_dir: Path) -> list:
    users = tiny_tables.users["user_id"].sample(220, random_state=1)
    return _serving_view(tiny_tables, tiny_data_dir, users)


def test_reference_matches_serving_histories(tiny_data_dir: Path, serving_rows: list) -> None:
    users, categories, fields = reference_frames(tiny_data_dir)
    assert fields == ["age_bucket", "gender", "region", "occupation"]
    by_user = users.assign(user_id=pd.read_parquet(tiny_data_dir / "users.parquet")["user_id"]).set_index("user_id")
    for history, _ in serving_rows:
        assert by_user.loc[history.user_id, "n_ads"] == len(history.ads)
        assert by_user.loc[history.user_id, "n_contents"] == len(history.contents)
        assert by_user.loc[history.user_id, fields].to_dict() == history.profile
    assert len(categories) <= 10 * len(users) and categories.notna().all()


def _report(tmp_path: Path, reference: Path, logs: Path, *extra: str) -> tuple[int, dict | None]:
    out = tmp_path / "report"
    status = main(["monitor", "report", "--reference", str(reference), "--logs", str(logs), "--out", str(out), *extra])
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else None
    return status, summary


def test_report_no_drift_on_the_reference_population(tmp_path: Path, tiny_data_dir: Path, serving_rows: list,
                                                     capsys: pytest.CaptureFixture) -> None:
    _write_logs(tmp_path / "logs", serving_rows)
    status, summary = _report(tmp_path, tiny_data_dir, tmp_path / "logs")
    assert status == 0, capsys.readouterr()
    assert summary["drift_share"] <= 0.3 and not summary["drift_detected"]
    assert set(summary["columns"]) == {"age_bucket", "gender", "region", "occupation", "n_ads", "n_contents",
                                       "recalled_category"}
    assert max(c["score"] for c in summary["columns"].values()) < 0.1, summary["columns"]
    assert summary["counts"]["users"] == 220 and summary["model_versions"] == {"sft-test": 220}
    out = tmp_path / "report"
    assert "<html" in (out / "report.html").read_text()[:2000].lower()
    assert not (out / "retrain_signal.json").exists()
    assert json.loads((out / "manifest.json").read_text())["step"] == "monitor report"
    assert "no drift" in capsys.readouterr().out


def test_report_detects_a_shifted_population(tmp_path: Path, tiny_data_dir: Path, serving_rows: list,
                                             capsys: pytest.CaptureFixture) -> None:
    young = [(h, c) for h, c in serving_rows if h.profile["age_bucket"] in ("18-24", "25-34")]
    _write_logs(tmp_path / "logs", young * 3, n_ads=lambda n: 3 * n + 20, categories=["gaming"] * 10)
    status, summary = _report(tmp_path, tiny_data_dir, tmp_path / "logs", "--min-users", "50")
    assert status == EXIT_DRIFT, capsys.readouterr()
    assert {"age_bucket", "n_ads", "recalled_category"} <= set(summary["drifted_columns"])
    assert summary["counts"]["records"] == 3 * summary["counts"]["users"]  # repeat requests count once per user
    signal = json.loads((tmp_path / "report" / "retrain_signal.json").read_text())
    assert signal["drift_share"] == summary["drift_share"] > 0.3
    assert "DRIFT" in capsys.readouterr().out


def test_threshold_decides_on_one_drifted_column(tmp_path: Path, tiny_data_dir: Path, serving_rows: list) -> None:
    _write_logs(tmp_path / "logs", serving_rows, categories=["gaming"] * 10)
    status, summary = _report(tmp_path, tiny_data_dir, tmp_path / "logs")
    assert status == 0 and summary["drifted_columns"] == ["recalled_category"]
    assert summary["drift_share"] == pytest.approx(1 / 7, abs=1e-5)
    status, summary = _report(tmp_path, tiny_data_dir, tmp_path / "logs", "--threshold", "0.1")
    assert status == EXIT_DRIFT and summary["drift_detected"]


def test_report_bad_inputs(tmp_path: Path, tiny_data_dir: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["monitor", "report", "--reference", str(tiny_data_dir), "--logs", str(tmp_path / "absent"),
                 "--out", str(tmp_path / "r")]) == 2
    assert "absent: no such request-log directory" in capsys.readouterr().err
    assert main(["monitor", "report", "--reference", str(tiny_data_dir), "--logs", str(tmp_path / "empty"),
                 "--out", str(tmp_path / "r")]) == 2
    assert "0 logged answers for 0 users" in capsys.readouterr().err
    with write_artifact(tmp_path / "bundle", "bundle", inputs={"data": "/data/train"}):
        pass
    assert main(["monitor", "report", "--reference", str(tiny_data_dir), "--logs", str(tmp_path / "empty"),
                 "--out", str(tmp_path / "r"), "--min-users", "0"]) == 2
    assert "min_users" in capsys.readouterr().err
    assert main(["monitor", "report", "--reference", str(tmp_path / "bundle"), "--logs", str(tmp_path / "empty"),
                 "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "written by step 'bundle'" in err and "/data/train" in err
    assert not (tmp_path / "r").exists()


# --- Prometheus -------------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_drift_share_on_metrics_endpoint(tmp_path: Path) -> None:
    from prometheus_client import start_http_server

    for name, share, created in (("old", 0.1, "2026-11-25T10:00:00+00:00"), ("new", 0.42, "2026-11-26T10:00:00+00:00")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps(
            {"drift_share": share, "drift_detected": share > 0.3, "model": "recall", "created_at": created}))
    assert load_latest_summary(tmp_path)["drift_share"] == 0.42
    assert load_latest_summary(tmp_path / "absent") is None
    port = _free_port()
    server, thread = start_http_server(port, addr="127.0.0.1")  # the default registry, as KServe's /metrics
    try:
        stop = watch_drift(tmp_path, interval=0.05)
        deadline, text = time.monotonic() + 5, ""
        while 'leadre_drift_share{model="recall"} 0.42' not in text and time.monotonic() < deadline:
            time.sleep(0.05)
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert 'leadre_drift_share{model="recall"} 0.42' in text
        assert 'leadre_drift_detected{model="recall"} 1.0' in text
        stop.set()
        publish_drift({"drift_share": 0.05, "drift_detected": False, "model": "recall",
                       "created_at": "2026-11-26T11:00:00+00:00"})
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert 'leadre_drift_share{model="recall"} 0.05' in text and 'leadre_drift_detected{model="recall"} 0.0' in text
    finally:
        server.shutdown()
        thread.join()
