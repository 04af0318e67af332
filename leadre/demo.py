"""`leadre demo`: the README's main job, end to end on the embedded synthetic ad marketplace.

1. The daily pipeline through kfp.local (`leadre.pipeline.run_local`): data → S-IDs → prompts → SFT → DPO →
   evaluation → gate → compile → bundle → near-line recall into a local Feast store → deploy (`deploy/current`).
2. Both KServe predictors started on loopback as `leadre serve` processes over the deployed bundle and that store.
3. Real V1 and V2 requests: the recalled ads printed with their titles beside the user's own recent ads.
4. Every user asked once (the request log), then the drift report over that log against the training data.
5. A one-screen summary: the evaluation table and where each artifact is.

One line per step; `leadre -v demo` shows everything the steps print. The output folder is replaced.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import warnings
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from leadre.config import DEMO_CONFIG

FEATURE_REPO = Path(__file__).resolve().parents[1] / "feature_repo"
SHOWN_USERS = 3
RECENT_ADS = 3
TOP_K = 10
TRAFFIC_BATCH = 100


def _line(step: str, text: str, started: float) -> None:
    print(f"[{step}] {text} ({time.perf_counter() - started:.0f} s)", flush=True)


def _fresh(out: Path) -> None:
    """The demo owns its output folder: a previous run's results go, so nothing stale is mistaken for new."""
    if out.exists():
        if not (out / "kfp").is_dir() and any(out.iterdir()):
            raise ValueError(f"{out} exists and is not a previous demo run; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True)


def _feature_repo(out: Path) -> Path:
    """A copy of the project's Feast repository whose registry and online store live under `out`."""
    repo = out / "feature_repo"
    repo.mkdir()
    for file in ("definitions.py", "feature_store.yaml"):
        shutil.copy(FEATURE_REPO / file, repo / file)
    return repo


def _score(ad: dict[str, Any]) -> str:
    # LLM scores are the beam's log-probabilities; fallback scores are a segment's share of positive interactions
    return f"log-prob {ad['score']:7.3f}" if ad["source"] == "llm" else f"popularity {ad['score']:.4f}"


def _show(user: str, protocol: str, service: str, ads: list[dict[str, Any]], recent: list[tuple[str, str]],
          extra: str = "") -> None:
    print(f"  user {user} — {service} over {protocol}{extra}")
    print(f"    recent ads of the user (newest last): " + ("; ".join(title for _, title in recent) or "none"))
    for ad in ads:
        print(f"    {ad['rank']:>2}. {ad['ad_id']:<10} {_score(ad):<20} {ad['source']:<8} {ad['title']}")


def _v2_ads(body: dict[str, Any], row: int) -> list[dict[str, Any]]:
    """Row `row` of a V2 response's [users, k] tensors as ad dicts (padding dropped)."""
    outputs = {o["name"]: o for o in body["outputs"]}
    k = outputs["ad_id"]["shape"][1]
    column = {name: outputs[name]["data"][row * k:(row + 1) * k]
              for name in ("ad_id", "title", "score", "rank", "source")}
    return [dict(zip(column, values)) for values in zip(*column.values()) if values[0]]


@dataclass
class Services:
    recall: Any  # leadre.serving.ServerProcess
    nearline: Any


def _start_services(stack: ExitStack, bundle: Path, repo: Path, out: Path) -> Services:
    from leadre.serving import ServerProcess

    (out / "servers").mkdir()
    common = ["--bundle", str(bundle), "--feature-repo", str(repo), "--log-dir", str(out / "requests")]
    nearline = ServerProcess("nearline", common, out / "servers" / "nearline.log")
    stack.callback(nearline.stop)
    nearline.start()
    recall = ServerProcess("recall", common + ["--nearline-url", nearline.url], out / "servers" / "recall.log")
    stack.callback(recall.stop)
    recall.start()
    return Services(recall, nearline)


def _recent_ads(store: Any, user: str, titles: dict[str, str]) -> list[tuple[str, str]]:
    from leadre.features import user_features

    ads = user_features(store, [user]).get(user, {}).get("ads", [])[-RECENT_ADS:]
    return [(a, titles.get(a, a)) for a in ads]


def _requests(services: Services, store: Any, users: list[str], titles: dict[str, str]) -> None:
    """One V1 and one V2 request to `recall` (answers from the near-line lists in Feast), one V1 request to
    `nearline` (a live trie-constrained search), each printed beside the user's own recent ads."""
    a, b, c = users[:SHOWN_USERS]
    v1 = httpx.post(f"{services.recall.url}/v1/models/recall:predict",
                    json={"instances": [{"user_id": a, "k": TOP_K}]}, timeout=60)
    v1.raise_for_status()
    answer = v1.json()["predictions"][0]
    _show(a, "V1 (POST /v1/models/recall:predict)", "recall", answer["ads"], _recent_ads(store, a, titles),
          f", model {answer['model_version']}, Feast list {answer['recall_list']}")
    v2 = httpx.post(f"{services.recall.url}/v2/models/recall/infer", timeout=60, json={"inputs": [
        {"name": "user_id", "datatype": "BYTES", "shape": [1], "data": [b]},
        {"name": "k", "datatype": "INT32", "shape": [1], "data": [TOP_K]}]})
    v2.raise_for_status()
    _show(b, "V2 (POST /v2/models/recall/infer)", "recall", _v2_ads(v2.json(), 0), _recent_ads(store, b, titles))
    live = httpx.post(f"{services.nearline.url}/v1/models/nearline:predict",
                      json={"instances": [{"user_id": c, "k": TOP_K}]}, timeout=300)
    live.raise_for_status()
    answer = live.json()["predictions"][0]
    _show(c, "V1 (POST /v1/models/nearline:predict)", "nearline (live beam search)", answer["ads"],
          _recent_ads(store, c, titles), f", list {answer['status'].replace('_', ' ')} to Feast")


def _traffic(services: Services, users: list[str]) -> dict[str, int]:
    """Every user asked once from `recall`: the request log the drift report reads. Returns answers by source."""
    sources: dict[str, int] = {}
    for start in range(0, len(users), TRAFFIC_BATCH):
        instances = [{"user_id": u, "k": TOP_K} for u in users[start:start + TRAFFIC_BATCH]]
        r = httpx.post(f"{services.recall.url}/v1/models/recall:predict", json={"instances": instances}, timeout=120)
        r.raise_for_status()
        for answer in r.json()["predictions"]:
            source = "llm" if all(ad["source"] == "llm" for ad in answer["ads"]) else "fallback"
            sources[source] = sources.get(source, 0) + 1
    return sources


def _evaluation_table(metrics: dict[str, Any]) -> list[str]:
    """Per model, Recall/NDCG/eCPM@10 on each evaluated split, seen ads excluded (the headline) and kept."""
    results = metrics["results"]
    splits = list(next(iter(results.values())))
    lines = [f"{'model':<14}" + "".join(f"{split + ' R@10 / N@10 / eCPM@10':>40}" for split in splits)]
    for variant in ("seen_excluded", "seen_kept"):
        lines.append(f"  ({variant.replace('_', ' ')})")
        for name, by_split in results.items():
            cells = []
            for split in splits:
                m = by_split.get(split, {}).get(variant)
                cells.append(f"{m['recall@10']:.3f} / {m['ndcg@10']:.3f} / {m['ecpm@10']:8.2f}" if m else "–")
            lines.append(f"{name:<14}" + "".join(f"{c:>40}" for c in cells))
    return lines


def run_demo(out: Path, users: int = 2000, seed: int = 0, config: Path = DEMO_CONFIG, verbose: bool = False) -> None:
    from leadre.features import open_store
    from leadre.monitor import DriftSettings, drift_report
    from leadre.pipeline import run_local
    from pipelines import build_pipeline

    started = time.perf_counter()
    if not verbose:  # the steps' own logging and httpx's line per request are for -v
        logging.getLogger().setLevel(logging.WARNING)
    out = Path(out).resolve()
    _fresh(out)
    repo = _feature_repo(out)
    print(f"LEADRE demo: {users:,} synthetic users, config {config}, output in {out}", flush=True)
    arguments = {"source": "synth", "users": users, "seed": seed, "config": Path(config).read_text(),
                 "deploy_root": str(out / "deploy"), "feature_repo": str(repo)}
    run = run_local(build_pipeline(), arguments, out, verbose=verbose)
    if not run.promoted:
        raise RuntimeError(f"the gate did not deploy the first model: {run.steps.get('gate')}")
    data = run.artifact("ingest", "data")
    bundle = out / "deploy" / "current"

    from leadre.schema import read_data_dir

    tables = read_data_dir(data, validate=False)
    titles = dict(zip(tables.ads["ad_id"], tables.ads["title"]))
    user_ids = tables.users["user_id"].tolist()
    with ExitStack() as stack:
        t = time.perf_counter()
        services = _start_services(stack, bundle, repo, out)
        _line("serve", f"recall at {services.recall.url}, nearline at {services.nearline.url}", t)
        store = open_store(repo)
        _requests(services, store, user_ids, titles)
        t = time.perf_counter()
        sources = _traffic(services, user_ids)
        _line("traffic", f"{len(user_ids):,} users asked once from recall: "
                         + ", ".join(f"{n:,} answered by {s}" for s, n in sorted(sources.items())), t)
    t = time.perf_counter()
    settings = DriftSettings(min_users=min(DriftSettings.min_users, len(user_ids)))
    with warnings.catch_warnings():
        if not verbose:  # Evidently's imports raise library deprecations (Feast's import re-enabled their display)
            warnings.simplefilter("ignore", DeprecationWarning)
        summary = drift_report(data, out / "requests", out / "drift", settings)
    verdict = "DRIFT: retrain signal written" if summary["drift_detected"] else "no drift"
    _line("drift", f"drift share {summary['drift_share']:.2f} (threshold {summary['threshold']}) over "
                   f"{summary['counts']['users']:,} users: {verdict}", t)

    evaluation = run.artifact("evaluate", "evaluation")
    gate = json.loads((run.artifact("gate", "candidate") / "manifest.json").read_text())
    print("\nEvaluation on the held-out users (leave-one-out; Recall, NDCG and eCPM at 10):")
    print("\n".join(_evaluation_table(json.loads((evaluation / "metrics.json").read_text()))))
    print(f"\nDeployed: {gate['chosen']} model {bundle.resolve().name} (gate: {gate['decision']['reason']})")
    print(f"Finished in {(time.perf_counter() - started) / 60:.1f} min. Where everything is:")
    places = [
        ("pipeline artifacts, one folder per step", run.run_dir),
        ("evaluation (metrics.json, metrics.md, plot)", evaluation),
        ("deployed bundle", f"{bundle} -> {bundle.resolve().relative_to(out)}"),
        ("Feast repository (SQLite online store)", repo),
        ("predictor request logs", out / "requests"),
        ("drift report", out / "drift" / "report.html"),
        ("pipeline and server logs", f"{run.log_file or 'shown above'}, {out / 'servers'}"),
    ]
    for what, where in places:
        print(f"  {what:<46} {where}")
