"""Drift monitoring (DESIGN §5): serving logs what it answered; a report compares a window of the log with the
training reference and tells the pipeline when to retrain.

- `RequestLog`: one JSON line per answered user, appended to hourly files under a log directory. The request path
  only serialises the record and appends it to a buffer; a background thread writes the buffer every
  `flush_interval` seconds or `flush_records` records, and `close()` (also run at interpreter exit) writes the
  rest, so a clean shutdown loses nothing.
- `read_logs`: the records of a time window as a DataFrame.
- `drift_report` (`leadre monitor report`): an Evidently data-drift report of the window against the reference,
  `report.html`, `summary.json` and, when the share of drifted columns exceeds the threshold,
  `retrain_signal.json`.
- `publish_drift` / `load_latest_summary` / `watch_drift`: the latest drift share as Prometheus gauges in the
  default registry, which KServe's model server exposes at /metrics.

The reference is the data directory the deployed model was trained on (a bundle holds the ad catalogue but not the
users and events the profile and length distributions come from). Per user: the profile fields and the history
lengths serving sees (the behaviour lists the feature store serves, `leadre.features.behaviour_lists`: positive ads
without repeats and content interactions, each capped at the same number of recent items).
The recalled-category mix is compared with the categories of the ads users actually engaged with: each user's most
recent `category_window` positive ads, so every user weighs about as much as one served list of k ads.
"""

from __future__ import annotations

import atexit
import dataclasses
import datetime as dt
import json
import logging
import os
import re
import socket
import threading
from collections import Counter
from itertools import groupby
from pathlib import Path
from typing import Any

import pandas as pd
from prometheus_client import Gauge

from leadre.artifacts import ArtifactError, read_manifest, write_artifact
from leadre.features import behaviour_lists
from leadre.schema import DATA_STEPS, positive_actions_of, read_data_dir

log = logging.getLogger(__name__)

STEP = "monitor report"
SUMMARY, REPORT, RETRAIN_SIGNAL = "summary.json", "report.html", "retrain_signal.json"
EXIT_DRIFT = 3  # `leadre monitor report` exit status when the drift share exceeds the threshold
SOURCES = ("llm", "fallback")
RECORD_FIELDS = ("ts", "model", "model_version", "user_id", "profile", "n_ads", "n_contents", "ads", "categories",
                 "source")
LENGTHS = ("n_ads", "n_contents")
CATEGORY = "recalled_category"
# <hour>-<model>-<host>-<pid>-<seq>.jsonl: the hour (UTC) of every record in the file, so a window skips files.
LOG_FILE_RE = re.compile(r"^(\d{4}-\d{2}-\d{2}T\d{2})-.+\.jsonl$")
HOUR_FORMAT = "%Y-%m-%dT%H"  # the first 13 characters of the record's UTC ISO time


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", text)


def _as_utc(ts: dt.datetime | str) -> dt.datetime:
    try:
        value = dt.datetime.fromisoformat(ts) if isinstance(ts, str) else ts
    except ValueError:
        raise ValueError(f"request-log record ts {ts!r}: not an ISO time") from None
    return value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None else value.astimezone(dt.timezone.utc)


class RequestLog:
    """Append-only JSONL request log of one serving process; thread-safe.

    `log(record)` takes a dict with the fields of `RECORD_FIELDS`; `ts` (default: now, UTC) and `model` (default:
    this log's model) may be left out. Each process writes its own files (host and pid in the name), so several
    replicas can share one directory; a file holds one UTC hour and is rotated at `max_file_bytes`. Create it in
    the process that serves (after any fork: the writer thread does not survive one).
    """

    def __init__(self, log_dir: str | Path, model: str, flush_interval: float = 1.0, flush_records: int = 1000,
                 max_file_bytes: int = 64 << 20):
        if not model:
            raise ValueError("RequestLog needs a model name")
        if flush_interval <= 0 or flush_records < 1 or max_file_bytes < 1:
            raise ValueError("RequestLog: flush_interval, flush_records and max_file_bytes must be positive")
        self.dir = Path(log_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.model = model
        self.flush_interval, self.flush_records, self.max_file_bytes = flush_interval, flush_records, max_file_bytes
        self.dropped = 0  # records lost to write errors (disk full, ...)
        self._prefix = f"{_safe_name(model)}-{_safe_name(socket.gethostname())}-{os.getpid()}"
        self._pending: list[tuple[str, bytes]] = []  # (hour, line)
        self._lock = threading.Lock()  # guards _pending
        self._write_lock = threading.Lock()  # guards the open file
        self._file: Any = None
        self._file_hour: str | None = None
        self._seq: dict[str, int] = {}
        self._wake, self._stop = threading.Event(), threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"request-log-{model}", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def log(self, record: dict[str, Any]) -> None:
        missing = [f for f in RECORD_FIELDS if f not in record and f not in ("ts", "model")]
        if missing:
            raise ValueError(f"request-log record lacks {missing}")
        ts = _as_utc(record["ts"]) if "ts" in record else dt.datetime.now(dt.timezone.utc)
        iso = ts.isoformat(timespec="milliseconds")
        line = json.dumps({**record, "ts": iso, "model": record.get("model", self.model)}, separators=(",", ":"))
        item = (iso[:13], (line + "\n").encode())
        with self._lock:  # checked under the lock: close() flushes everything appended before it closed
            closed = self._closed
            if not closed:
                self._pending.append(item)
                full = len(self._pending) >= self.flush_records
        if closed:  # a late answer after close(): write it at once rather than lose it
            self._write([item])
            self._close_file()
        elif full:
            self._wake.set()

    def flush(self) -> None:
        """Write every record logged so far (the background thread does this on its own)."""
        with self._lock:
            batch, self._pending = self._pending, []
        if batch:
            self._write(batch)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._stop.set()
        self._wake.set()
        self._thread.join()
        self.flush()
        self._close_file()
        atexit.unregister(self.close)

    def _close_file(self) -> None:
        with self._write_lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def __enter__(self) -> RequestLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.flush_interval)
            self._wake.clear()
            self.flush()

    def _write(self, batch: list[tuple[str, bytes]]) -> None:
        with self._write_lock:
            try:
                for hour, items in groupby(batch, key=lambda item: item[0]):
                    f = self._file_for(hour)
                    for _, line in items:  # a file is rotated inside a batch too: a busy server logs big batches
                        f.write(line)
                        if f.tell() >= self.max_file_bytes:
                            f.flush()
                            f = self._file_for(hour)
                    f.flush()
            except OSError:  # the server keeps answering; the loss is counted and logged
                self.dropped += len(batch)
                log.exception("request log %s: could not write %d records", self.dir, len(batch))

    def _file_for(self, hour: str) -> Any:
        if self._file is not None and self._file_hour == hour and self._file.tell() < self.max_file_bytes:
            return self._file
        if self._file is not None:
            self._file.close()
            self._file = None
        seq = self._seq.get(hour, 0)
        path = self.dir / f"{hour}-{self._prefix}-{seq:04d}.jsonl"
        if path.exists() and path.stat().st_size >= self.max_file_bytes:
            seq += 1
            path = self.dir / f"{hour}-{self._prefix}-{seq:04d}.jsonl"
        self._seq[hour] = seq
        self._file, self._file_hour = open(path, "ab"), hour
        return self._file


def _timestamp(value: str | dt.datetime | pd.Timestamp | None, name: str) -> pd.Timestamp | None:
    if value is None:
        return None
    try:
        ts = pd.Timestamp(value)
    except ValueError:
        raise ValueError(f"{name}: not an ISO time: {value!r}") from None
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


def since_last(duration: str) -> str:
    """The ISO start of a window that ends now and lasts `duration` (e.g. 24h, 7d, 90min): a CronJob's window."""
    try:
        span = pd.Timedelta(duration)
    except ValueError:
        raise ValueError(f"--last {duration!r}: expected a duration such as 24h, 7d or 90min") from None
    if span <= pd.Timedelta(0):
        raise ValueError(f"--last {duration!r}: the window must be longer than zero")
    return (pd.Timestamp.now(tz="UTC") - span).isoformat()


def _iso(value: str | dt.datetime | None) -> str | None:
    ts = _timestamp(value, "time")
    return None if ts is None else ts.isoformat()


def _check_record(rec: Any) -> str | None:
    """What is wrong with a parsed log line, or None."""
    if not isinstance(rec, dict):
        return "not a JSON object"
    missing = [f for f in RECORD_FIELDS if f not in rec]
    if missing:
        return f"missing {missing}"
    try:
        dt.datetime.fromisoformat(rec["ts"])
    except (TypeError, ValueError):
        return f"ts {rec['ts']!r} is not an ISO time"
    if not isinstance(rec["profile"], dict):
        return "profile is not an object"
    for name in LENGTHS:
        if not isinstance(rec[name], int) or isinstance(rec[name], bool) or rec[name] < 0:
            return f"{name} is not a count"
    if not isinstance(rec["ads"], list) or not isinstance(rec["categories"], list):
        return "ads and categories must be lists"
    if rec["source"] not in SOURCES:
        return f"source {rec['source']!r} is not one of {SOURCES}"
    return None


def read_logs(log_dir: str | Path, since: str | dt.datetime | None = None, until: str | dt.datetime | None = None,
              model: str | None = None) -> pd.DataFrame:
    """Request-log records with `since <= ts < until` (ISO times; naive means UTC), of one model or all, in time
    order. Lines that are not valid records (e.g. the torn last line of a killed writer) are skipped, counted in
    `df.attrs["malformed"]` and logged."""
    log_dir = Path(log_dir)
    if not log_dir.is_dir():
        raise FileNotFoundError(f"{log_dir}: no such request-log directory")
    start, end = _timestamp(since, "since"), _timestamp(until, "until")
    if start is not None and end is not None and start >= end:
        raise ValueError(f"empty window: since {start} is not before until {end}")
    records, malformed, first_problem = [], 0, None
    for path in sorted(log_dir.iterdir()):
        m = LOG_FILE_RE.match(path.name)
        if not m:
            continue
        hour = pd.Timestamp(dt.datetime.strptime(m.group(1), HOUR_FORMAT), tz="UTC")
        if (end is not None and hour >= end) or (start is not None and hour + pd.Timedelta(hours=1) <= start):
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                try:
                    rec = json.loads(line)
                    problem = _check_record(rec)
                except json.JSONDecodeError as e:
                    problem = f"not JSON ({e.msg})"
                if problem is None and (model is None or rec["model"] == model):
                    records.append(rec)
                elif problem is not None:
                    malformed += 1
                    first_problem = first_problem or f"{path.name}:{n}: {problem}"
    if malformed:
        log.warning("%s: skipped %d malformed log lines (first: %s)", log_dir, malformed, first_problem)
    df = pd.DataFrame.from_records(records, columns=list(RECORD_FIELDS))
    df["ts"] = pd.to_datetime(df["ts"], utc=True, format="ISO8601")
    keep = pd.Series(True, index=df.index)
    if start is not None:
        keep &= df["ts"] >= start
    if end is not None:
        keep &= df["ts"] < end
    df = df[keep].sort_values("ts", kind="stable").reset_index(drop=True)
    df.attrs["malformed"] = malformed
    return df


@dataclasses.dataclass(frozen=True)
class DriftSettings:
    """The `monitor` config section. Distance measures (not p-values) keep a verdict independent of the window's
    size: with thousands of users a p-value test flags differences too small to matter."""

    threshold: float = 0.3  # retrain when the share of drifted columns exceeds this
    # Fewer distinct users in the window is an error, not a verdict: at ~100 users the sampling noise of a
    # 12-valued profile field already reaches a Jensen-Shannon distance of ~0.08 against a 0.1 limit.
    min_users: int = 200
    cat_method: str = "jensenshannon"
    cat_threshold: float = 0.1
    num_method: str = "wasserstein"  # normed by the reference's standard deviation
    num_threshold: float = 0.1
    category_window: int = 10  # reference category mix: each user's most recent positive ads

    def __post_init__(self) -> None:
        if not 0 <= self.threshold < 1:
            raise ValueError(f"threshold={self.threshold}: expected a share in [0, 1)")
        if self.min_users < 1 or self.category_window < 1:
            raise ValueError("min_users and category_window must be positive")


def _profile_frame(profiles: list[dict[str, Any]] | pd.DataFrame, fields: list[str]) -> pd.DataFrame:
    """Profile values as the prompt sees them: strings, a missing value as "" (rendered as unknown)."""
    frame = profiles if isinstance(profiles, pd.DataFrame) else pd.DataFrame.from_records(profiles)
    frame = frame.reindex(columns=fields)
    return frame.astype(object).where(frame.notna(), "").astype(str)


def _check_reference(data_dir: str | Path) -> None:
    try:
        manifest = read_manifest(data_dir)
    except ArtifactError as e:
        raise ValueError(f"--reference: {e}") from None
    if manifest.get("step") not in DATA_STEPS:
        hint = (f"; a bundle has no users or events: pass the data directory it was built from "
                f"(its manifest names {manifest.get('inputs', {}).get('data')})") if manifest.get("step") == "bundle" else ""
        raise ValueError(f"--reference {data_dir}: written by step {manifest.get('step')!r}, expected a data "
                         f"directory ({', '.join(DATA_STEPS)}){hint}")


def reference_frames(data_dir: str | Path, category_window: int = 10) -> tuple[pd.DataFrame, pd.Series, list[str]]:
    """From a data directory: per-user profile fields and history lengths, the reference category mix (one entry
    per positive ad, at most `category_window` per user, the most recent), and the profile field names."""
    _check_reference(data_dir)
    tables = read_data_dir(data_dir)
    fields = [c for c in tables.users.columns if c != "user_id"]
    users = _profile_frame(tables.users[fields], fields)
    lists = behaviour_lists(tables.events, positive_actions_of(data_dir)).set_index("user_id")
    lists = lists.reindex(tables.users["user_id"])  # users without events: NaN, i.e. empty lists
    ads = [v if isinstance(v, list) else [] for v in lists["recent_ads"]]
    users["n_ads"] = lists["n_recent_ads"].fillna(0).astype(int).to_numpy()
    users["n_contents"] = lists["n_recent_contents"].fillna(0).astype(int).to_numpy()
    category = dict(zip(tables.ads["ad_id"], tables.ads["category"]))
    categories = pd.Series([category[a] for v in ads for a in v[-category_window:]], dtype=object)
    return users, categories, fields


def _current_frames(records: pd.DataFrame, fields: list[str]) -> tuple[pd.DataFrame, pd.Series]:
    """Per user (the latest answer in the window, as the reference counts each user once): profile and lengths;
    and the categories of the ads the model recalled (fallback answers are popularity, not the model's mix)."""
    latest = records.drop_duplicates("user_id", keep="last").reset_index(drop=True)
    users = _profile_frame(latest["profile"].tolist(), fields)
    for name in LENGTHS:
        users[name] = latest[name].to_numpy()
    llm = latest[latest["source"] == "llm"]
    categories = pd.Series([c for cats in llm["categories"] for c in cats], dtype=object)
    return users, categories


def _evidently_frame(users: pd.DataFrame, categories: pd.Series) -> pd.DataFrame:
    """One frame with two kinds of rows: one per user (profile, lengths) and one per ad (category). Evidently tests
    each column on its non-null values, so one report and one drift share cover both granularities."""
    return pd.concat([users.astype({n: "float64" for n in LENGTHS}), pd.DataFrame({CATEGORY: categories})],
                     ignore_index=True)


def drift_report(reference: str | Path, logs: str | Path, out: str | Path, settings: DriftSettings = DriftSettings(),
                 since: str | None = None, until: str | None = None, model: str | None = None) -> dict[str, Any]:
    """`leadre monitor report`: write report.html, summary.json (and retrain_signal.json on drift) to `out`."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    _check_reference(reference)  # before reading a day of logs
    records = read_logs(logs, since, until, model)
    n_users = records["user_id"].nunique()
    window = f"[{since or 'start'}, {until or 'end'})" + (f" of model {model}" if model else "")
    if n_users < settings.min_users:
        raise ValueError(f"{logs}: {len(records):,} logged answers for {n_users:,} users in the window {window}; a "
                         f"drift verdict needs at least {settings.min_users:,} users (widen --since/--until or lower "
                         f"--min-users){'; ' + str(records.attrs['malformed']) + ' malformed lines' if records.attrs['malformed'] else ''}")
    ref_users, ref_categories, fields = reference_frames(reference, settings.category_window)
    cur_users, cur_categories = _current_frames(records, fields)
    columns = fields + list(LENGTHS)
    skipped = {}
    if len(cur_categories) and len(ref_categories):
        columns.append(CATEGORY)
    else:
        skipped[CATEGORY] = "no LLM answers in the window" if not len(cur_categories) else "no positives in the reference"
    definition = DataDefinition(numerical_columns=list(LENGTHS), categorical_columns=[c for c in columns if c not in LENGTHS])
    preset = DataDriftPreset(columns=columns, drift_share=settings.threshold, cat_method=settings.cat_method,
                             cat_threshold=settings.cat_threshold, num_method=settings.num_method,
                             num_threshold=settings.num_threshold)
    snapshot = Report([preset], include_tests=True).run(
        Dataset.from_pandas(_evidently_frame(cur_users, cur_categories), data_definition=definition),
        Dataset.from_pandas(_evidently_frame(ref_users, ref_categories), data_definition=definition),
        name=f"LEADRE drift {window}")
    result = snapshot.dict()
    scores = {m["config"]["column"]: m for m in result["metrics"] if m["config"]["type"].endswith(":ValueDrift")}
    drifted = {t["metric_config"]["params"]["column"]: t["status"] == "FAIL" for t in result["tests"]
               if t["metric_config"]["params"]["type"].endswith(":ValueDrift")}
    if set(drifted) != set(columns):
        raise RuntimeError(f"Evidently tested {sorted(drifted)}, expected {sorted(columns)}")
    share = sum(drifted.values()) / len(columns)
    detected = share > settings.threshold  # Evidently's own dataset test fails at share >= threshold
    summary = {
        "drift_share": round(share, 6),
        "threshold": settings.threshold,
        "drift_detected": detected,
        "drifted_columns": [c for c in columns if drifted[c]],
        "columns": {c: {"drifted": drifted[c], "score": round(float(scores[c]["value"]), 6),
                        "method": scores[c]["config"]["method"], "threshold": scores[c]["config"]["threshold"],
                        "kind": "profile" if c in fields else "length" if c in LENGTHS else "category"}
                    for c in columns},
        "skipped_columns": skipped,
        "model": model or "all",
        "window": {"since": _iso(since), "until": _iso(until), "first": records["ts"].min().isoformat(),
                   "last": records["ts"].max().isoformat()},
        "counts": {"records": len(records), "users": int(n_users), "malformed_lines": records.attrs["malformed"],
                   "reference_users": len(ref_users), "recalled_ads": len(cur_categories),
                   "reference_positive_ads": len(ref_categories)},
        "sources": dict(Counter(records["source"])),
        "model_versions": dict(Counter(records["model_version"])),
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    parameters = dataclasses.asdict(settings) | {"since": since, "until": until, "model": model}
    with write_artifact(out, STEP, inputs={"reference": reference, "logs": logs}, parameters=parameters) as (tmp, manifest):
        snapshot.save_html(str(tmp / REPORT))
        (tmp / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
        if detected:
            signal = {"reason": f"drift share {share:.3f} > threshold {settings.threshold}",
                      **{k: summary[k] for k in ("drift_share", "threshold", "drifted_columns", "model", "window",
                                                 "model_versions", "created_at")}}
            (tmp / RETRAIN_SIGNAL).write_text(json.dumps(signal, indent=2) + "\n")
        manifest["counts"] = summary["counts"]
        manifest["drift_share"], manifest["drift_detected"] = summary["drift_share"], detected
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"{'column':<20} {'kind':<9} {'method':<14} {'score':>8} {'limit':>6}  drifted"]
    for name, c in summary["columns"].items():
        lines.append(f"{name:<20} {c['kind']:<9} {c['method']:<14} {c['score']:>8.4f} {c['threshold']:>6.2f}  "
                     f"{'YES' if c['drifted'] else 'no'}")
    lines += [f"{name:<20} skipped: {why}" for name, why in summary["skipped_columns"].items()]
    counts = summary["counts"]
    lines.append(f"drift share {summary['drift_share']:.3f} (threshold {summary['threshold']}) over "
                 f"{counts['users']:,} users / {counts['records']:,} answers: "
                 + ("DRIFT — retrain signal written" if summary["drift_detected"] else "no drift"))
    return "\n".join(lines)


# Prometheus: KServe's model server serves prometheus_client's default registry at /metrics.
DRIFT_SHARE = Gauge("leadre_drift_share", "Share of monitored columns that drifted from the training reference "
                    "in the latest `leadre monitor report`", ["model"])
DRIFT_DETECTED = Gauge("leadre_drift_detected", "1 when the latest drift share exceeded the retrain threshold",
                       ["model"])
DRIFT_REPORT_TIME = Gauge("leadre_drift_report_timestamp_seconds", "When the latest drift report was written "
                          "(Unix time)", ["model"])


def publish_drift(summary: dict[str, Any]) -> None:
    """Set the drift gauges from a report summary (label `model`: the model the report covered, or "all")."""
    model = summary["model"]
    DRIFT_SHARE.labels(model=model).set(summary["drift_share"])
    DRIFT_DETECTED.labels(model=model).set(1.0 if summary["drift_detected"] else 0.0)
    DRIFT_REPORT_TIME.labels(model=model).set(dt.datetime.fromisoformat(summary["created_at"]).timestamp())


def load_latest_summary(path: str | Path) -> dict[str, Any] | None:
    """The summary of a report directory, or of the newest report directly under `path`; None when there is none
    yet (or a report is being replaced at this instant)."""
    path = Path(path)
    candidates = [path / SUMMARY] + sorted(path.glob(f"*/{SUMMARY}")) if path.is_dir() else []
    latest = None
    for file in candidates:
        try:
            summary = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(summary, dict) or not {"drift_share", "drift_detected", "model", "created_at"} <= summary.keys():
            log.warning("%s: not a drift summary written by `leadre monitor report`; ignored", file)
            continue
        if latest is None or summary.get("created_at", "") > latest.get("created_at", ""):
            latest = summary
    return latest


def watch_drift(path: str | Path, interval: float = 60.0) -> threading.Event:
    """Publish the latest summary under `path` now and every `interval` seconds from a daemon thread (for a
    serving process, so its /metrics carries the drift share); set the returned event to stop."""
    stop = threading.Event()

    def run() -> None:
        while True:
            summary = load_latest_summary(path)
            if summary is not None:
                publish_drift(summary)
            if stop.wait(interval):
                return

    threading.Thread(target=run, name="drift-metrics", daemon=True).start()
    return stop
