"""The library side of the KFP pipeline (DESIGN §2, §4): what each component runs, and how a pipeline is run.

Every KFP component in `components/` is a few lines that call one function here with the paths of its input and
output artifacts (`artifact.path`): the step functions read input artifact directories, write their output with
`write_artifact` (atomic: a failed step leaves nothing at its output path), write a Markdown (or HTML) report for
the KFP UI, and return the numbers the component logs as KFP metrics. Nothing here names an absolute path of
another step; the only outside locations are the deployment root (`deploy`, and the deployed model `evaluate`
compares against) and the Feast repository `nearline` writes to.

It also runs the pipeline: `run_local` (kfp.local, one line of progress per step, the rest in a log file),
`compile_pipeline`, `submit` and `schedule` (kfp.Client).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime as dt
import io
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import yaml

from leadre.artifacts import ArtifactError, read_manifest, write_artifact
from leadre.config import ConfigError, section

log = logging.getLogger(__name__)

CURRENT = "current"  # <deploy root>/current -> bundles/<model version>: what serving loads
BUNDLES = "bundles"
STEP_MARK = "[leadre-step]"  # components print it; run_local turns the lines into progress
VERSION_ANNOTATION = "leadre.io/model-version"
NOTHING_DEPLOYED = "nothing_deployed"  # manifest key of the deployed model's evaluation when there is none


# ---------------------------------------------------------------------------------------------------------------
# Settings that only the pipeline reads (the training steps' sections live with their steps)


@dataclass(frozen=True)
class EvalSettings:
    """The `evaluate` section of a config file."""

    splits: tuple[str, ...] = ("validation", "test")
    users: int | None = None  # a random sample of this many users per split (None: all)
    beam: int = 50


@dataclass(frozen=True)
class NearlineSettings:
    """The `nearline` section of a config file: the batch recall that fills Feast's recall lists."""

    top_n: int = 50
    beam: int | None = None  # default: top_n
    batch_size: int = 64
    users: int | None = None  # the first this many users (None: every user)


@dataclass(frozen=True)
class CompileSettings:
    """The `compile` section of a config file: the parity and timing run of `leadre compile`."""

    users: int = 32
    top_n: int = 10
    beam: int = 20
    batch_size: int = 16
    int8: bool = False


def parse_config(text: str) -> dict[str, Any]:
    """A config passed as YAML text (pipeline parameters are strings, not files)."""
    try:
        data = yaml.safe_load(text or "") or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"pipeline config: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"pipeline config: expected a mapping of sections, got {type(data).__name__}")
    return data


# ---------------------------------------------------------------------------------------------------------------
# Progress and reports


def announce(step: str, summary: str) -> None:
    """One machine-readable line per finished step on stdout (the component's log, which `run_local` watches)."""
    print(f"{STEP_MARK} {json.dumps({'step': step, 'summary': summary})}", flush=True)


def log_metrics(artifact: Any, values: dict[str, float]) -> None:
    """Log `values` on a KFP Metrics artifact (the UI reads its metadata) and write them as JSON at its path: a
    Metrics output with no file counts as missing, which makes kfp.local's cache skip every later run's lookup."""
    for name, value in values.items():
        artifact.log_metric(name, value)
    Path(artifact.path).parent.mkdir(parents=True, exist_ok=True)
    Path(artifact.path).write_text(json.dumps(values, indent=2) + "\n")


def _write_report(path: str | Path, title: str, lines: Sequence[str]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(f"# {title}\n\n" + "\n".join(lines) + "\n")


def _fmt(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:.4f}" if isinstance(value, float) else str(value)


def _table(rows: dict[str, Any]) -> list[str]:
    return ["| | |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in rows.items()]


# ---------------------------------------------------------------------------------------------------------------
# Steps: ingest → semantic_ids → prompts → sft → dpo → evaluate → gate → compile → bundle → nearline → deploy


def ingest(source: str, path: str, users: int, seed: int, out: str, report: str) -> dict[str, int]:
    """Validated canonical tables: the synthetic marketplace, MovieLens files, or an existing data directory."""
    from leadre.schema import DATA_STEPS, read_data_dir, split_settings_of, write_data_dir

    if source == "synth":
        from leadre.synth import POSITIVE_ACTIONS, SynthConfig, generate, synth_parameters

        cfg = SynthConfig(users=users, seed=seed)
        tables = write_data_dir(generate(cfg), out, "data synth", synth_parameters(cfg), POSITIVE_ACTIONS)
    elif source == "movielens":
        from leadre.loaders import load_movielens

        loaded, derived = load_movielens(path)
        tables = write_data_dir(loaded, out, "data movielens", {"path": path}, ["rating"], derived,
                                inputs={"movielens": path})
    elif source == "dir":  # e.g. a dated snapshot exported from the user-feature store: copied, validated again
        source_manifest = read_manifest(path, DATA_STEPS)
        split = split_settings_of(path)
        tables = write_data_dir(read_data_dir(path), out, source_manifest["step"], source_manifest["parameters"],
                                split.positive_actions, source_manifest.get("derived"), inputs={"data": path},
                                min_positives=split.min_positives)
    else:
        raise ValueError(f"ingest: unknown source {source!r}: expected synth, movielens or dir")
    counts = {name: len(df) for name, df in tables.items()}
    _write_report(report, f"Data ({source})", _table(counts))
    announce("ingest", f"{counts['users']:,} users, {counts['ads']:,} ads, {counts['events']:,} events")
    return counts


def semantic_ids(data: str, out: str, config: str, levels: int, codes: int, seed: int, report: str) -> dict[str, float]:
    """S-IDs of the ads; `levels`/`codes` 0 keep the config's (or the default) setting."""
    from leadre.semantic_ids import SidSettings, build_sids, summary

    settings = section(parse_config(config), "sids", SidSettings, "pipeline config", levels=levels or None,
                       codes=codes or None, seed=seed)
    manifest = build_sids(data, out, **dataclasses.asdict(settings), progress=False)
    stats = manifest["stats"]
    _write_report(report, "Semantic IDs", [summary(stats), "", f"level sizes: {manifest['level_sizes']}"])
    announce("semantic_ids", f"levels {manifest['level_sizes']}, collision rate {stats['collision_rate']:.1%}")
    return {"collision_rate": float(stats["collision_rate"]), "ads": float(stats["ads"])}


def prompts(data: str, sids: str, out: str, config: str, seed: int, report: str) -> dict[str, int]:
    from leadre.prompts import PromptConfig, build_prompts

    cfg = section(parse_config(config), "prompts", PromptConfig, "pipeline config", seed=seed)
    manifest = build_prompts(data, sids, out, cfg)
    counts = manifest["counts"]
    _write_report(report, "Prompts", _table(counts) + ["", "Training examples per task:", ""]
                  + _table(manifest["stats"]["per_task"]))
    announce("prompts", ", ".join(f"{v:,} {k}" for k, v in counts.items()) + " examples")
    return counts


def _remove_work_dir(out: str | Path) -> None:
    """Trainers checkpoint into `<out>.work`; the finished artifact is `out`, so the work folder goes."""
    shutil.rmtree(Path(out).parent / f"{Path(out).name}.work", ignore_errors=True)


def sft(prompts_dir: str, sids: str, out: str, preset: str, config: str, device: str, seed: int,
        report: str) -> dict[str, float]:
    from leadre.sft import TrainSettings, train_sft

    cfg = parse_config(config)
    settings = section(cfg, "sft", TrainSettings, "pipeline config", seed=seed, device=device or None)
    metadata = train_sft(prompts_dir, sids, out, preset, settings, cfg.get("model") or {})
    _remove_work_dir(out)
    metrics = {k: float(v) for k, v in metadata["metrics"].items() if isinstance(v, (int, float))}
    training = metadata["training"]
    _write_report(report, f"SFT ({preset})", _table({"parameters": metadata["model"]["parameters"],
                                                      "steps": training["steps"],
                                                      "seconds": round(training["wall_seconds"], 1)} | metrics))
    announce("sft", f"{metadata['model']['parameters']:,} parameters, {training['steps']} steps, "
                    f"validation Recall@10 {metrics.get('recall@10', float('nan')):.3f}")
    return metrics


def dpo(model: str, prompts_dir: str, data: str, out: str, config: str, device: str, seed: int,
        report: str) -> dict[str, float]:
    from leadre.dpo import DPOSettings, train_dpo

    settings = section(parse_config(config), "dpo", DPOSettings, "pipeline config", seed=seed, device=device or None)
    metadata = train_dpo(model, prompts_dir, data, out, settings)
    _remove_work_dir(out)
    m = metadata["metrics"]
    metrics = {k: float(v) for k, v in m.items() if isinstance(v, (int, float))}
    _write_report(report, "DPO", _table({f"pairs ({k})": v for k, v in metadata["pairs"].items()} | metrics))
    announce("dpo", f"{sum(metadata['pairs'].values()):,} preference pairs, held-out margin "
                    f"{m['heldout_margin_before']:.2f} -> {m['heldout_margin_after']:.2f}")
    return metrics


def deployed_bundle(deploy_root: str | Path | None) -> Path | None:
    """The bundle `<deploy root>/current` points at; None when nothing has been deployed there."""
    if not deploy_root:
        return None
    current = Path(deploy_root) / CURRENT
    if not current.exists():
        return None
    return current.resolve()


def evaluate(data: str, sids: str, models: dict[str, str], deploy_root: str, out: str, deployed_out: str, config: str,
             device: str, seed: int, table: str, plot: str) -> dict[str, float]:
    """The candidates (`models`: name -> model dir, the one the gate compares first) and the baselines into `out`;
    the model deployed under `deploy_root` on the same data, split and users into `deployed_out` — or, when nothing
    is deployed there, an artifact that records exactly that (the gate's first-deployment case)."""
    from leadre.evaluate import evaluate as evaluate_models
    from leadre.gate import PLOT_FILE, TABLE_FILE

    if not deploy_root:
        raise ValueError("evaluate: no deploy root: the gate compares the candidate with the model deployed there "
                         "(an empty one is a first deployment)")
    settings = section(parse_config(config), "evaluate", EvalSettings, "pipeline config")
    options = dict(splits=settings.splits, beam=settings.beam, users=settings.users, seed=seed, device=device or "auto")
    results = evaluate_models(list(models.values()), data, sids, out, names=list(models), **options)["results"]
    deployed = deployed_bundle(deploy_root)
    if deployed is None:
        with write_artifact(deployed_out, "evaluate", parameters={"deploy_root": deploy_root}) as (_, manifest):
            manifest[NOTHING_DEPLOYED] = True
    else:
        with tempfile.TemporaryDirectory(prefix="leadre-sids-") as tmp:
            deployed_sids = _deployed_sids(deployed, data, Path(tmp) / "sids")
            results |= evaluate_models([deployed / "model"], data, deployed_sids, deployed_out, names=["deployed"],
                                       baselines=(), **options)["results"]
    tables = [Path(out) / TABLE_FILE] + ([Path(deployed_out) / TABLE_FILE] if deployed else [])
    Path(table).write_text("\n".join(t.read_text() for t in tables))
    images = [Path(out) / PLOT_FILE] + ([Path(deployed_out) / PLOT_FILE] if deployed else [])
    Path(plot).write_text("<html><body><h1>Recall@K</h1>" + "".join(
        f'<img src="data:image/png;base64,{base64.b64encode(i.read_bytes()).decode()}">' for i in images)
        + "</body></html>\n")
    split = settings.splits[0]
    variant = next(iter(results[next(iter(models))][split]))
    metrics = {f"{name}/{split}/{variant}/{metric}": float(value) for name in results
               for metric, value in results[name][split][variant].items()
               if metric in ("recall@10", "ndcg@10", "ecpm@10", "invalid_id_rate")}
    shown = ", ".join(f"{name} {results[name][split][variant]['recall@10']:.3f}" for name in results)
    announce("evaluate", f"{split} Recall@10 ({variant.replace('_', ' ')}): {shown}")
    return metrics


def _deployed_sids(bundle_dir: Path, data: str, out: Path) -> Path:
    """The deployed bundle's S-IDs, extended to the ads created since it was built from its frozen codebooks (as
    serving does), so that it is scored over the same catalogue as the candidates."""
    from leadre.schema import read_data_dir
    from leadre.semantic_ids import assign_sids
    from leadre.sid import load_sid_table

    sids = bundle_dir / "sids"
    ads = read_data_dir(data, validate=False).ads
    if set(ads["ad_id"]) <= set(load_sid_table(sids).ad_ids):
        return sids
    assign_sids(sids, ads[["ad_id", "title", "description", "category", "advertiser"]], out, progress=False)
    return out


def gate(evaluation: str, deployed_evaluation: str, models: dict[str, str], config: str, out: str,
         report: str) -> tuple[bool, dict[str, float]]:
    """Pick the candidate (DPO only if it beats its SFT model under DPO_POLICY), then promote it only if it beats
    the deployed model under the config's `gate` policy (default: DEPLOY_POLICY; S-IDs are rebuilt every run, so
    the two evaluations may differ in them). The chosen model is copied to `out` either way, so the decision and
    the model it is about travel together. Returns (promote, metrics)."""
    from leadre.gate import DEPLOY_POLICY, DPO_POLICY, Policy, decide, format_decision, read_evaluation

    cfg = parse_config(config)
    policy = section(cfg, "gate", Policy, "pipeline config", allow_new_sids=True) if "gate" in cfg else \
        dataclasses.replace(DEPLOY_POLICY, allow_new_sids=True)
    document = read_evaluation(evaluation)
    lines = []
    chosen = "sft"
    if "dpo" in models:  # sft and dpo were scored together: one document, evaluated alike by construction
        dpo_decision = decide(document | {"model": "dpo"}, document | {"model": "sft"}, DPO_POLICY)
        chosen = "dpo" if dpo_decision.promote else "sft"
        lines += ["## DPO over SFT", "", "```", format_decision(dpo_decision), "```", ""]
    first_deploy = read_manifest(deployed_evaluation, "evaluate").get(NOTHING_DEPLOYED, False)
    current = None if first_deploy else read_evaluation(deployed_evaluation)
    if current is None and not first_deploy:
        raise ArtifactError(f"{deployed_evaluation}: no evaluation of the deployed model")
    decision = decide(document | {"model": chosen}, current, policy)
    lines += [f"## {chosen} over the deployed model", "", "```", format_decision(decision), "```"]
    with write_artifact(out, "gate", {"evaluation": evaluation, "deployed_evaluation": deployed_evaluation,
                                      "model": models[chosen]}) as (tmp, manifest):
        shutil.copytree(models[chosen], tmp / "model")
        manifest["decision"] = decision.as_dict()
        manifest["chosen"] = chosen
    verdict = "promote" if decision.promote else "keep the deployed model (deploy skipped)"
    _write_report(report, f"Gate: {verdict}", lines)
    announce("gate", f"{chosen}: {verdict}; {decision.reason}")
    metrics = {f"candidate/{k}": float(v) for k, v in decision.candidate.items() if k != "model"}
    metrics["promote"] = float(decision.promote)
    return decision.promote, metrics


def compile_model(candidate: str, sids: str, out: str, backend: str, config: str, device: str,
                  report: str) -> dict[str, str]:
    """`leadre compile` on the gated model: ONNX (checked against PyTorch on its real S-IDs) on CPUs, TensorRT where
    CUDA and TensorRT are there."""
    from leadre.export import compile_model as export

    settings = section(parse_config(config), "compile", CompileSettings, "pipeline config")
    manifest = export(Path(candidate) / "model", out, backend=backend, device=device or "auto", sids_dir=sids,
                      **dataclasses.asdict(settings))
    _write_report(report, "Compile", [f"backend: **{manifest['backend']}** ({manifest['backend_reason']})", ""]
                  + _table({name: entry["ms_per_user"] for name, entry in manifest["parity"]["backends"].items()}))
    announce("compile", f"backend {manifest['backend']} ({manifest['backend_reason']})")
    return {"backend": manifest["backend"], "model_version": manifest["model_version"]}


def bundle(candidate: str, sids: str, data: str, compiled: str | None, out: str, report: str) -> dict[str, Any]:
    from leadre.bundle import build_bundle

    manifest = build_bundle(Path(candidate) / "model", sids, data, out, compiled)
    counts = manifest["counts"]
    _write_report(report, f"Bundle {manifest['model_version']}", _table(counts | {"compiled": manifest["compiled"]}))
    announce("bundle", f"{manifest['model_version']}, {counts['active_ads']:,} active ads"
                       + (", compiled backend included" if manifest["compiled"] else ""))
    return manifest


def nearline(bundle_dir: str, data: str, feature_repo: str, production: bool, config: str, device: str, out: str,
             report: str) -> dict[str, float]:
    """Batch recall for every user with the new bundle; the lists go to an artifact and, with a Feast repository,
    to its online store, after the same data's user and ad features are registered and materialised there (what
    the recall predictor reads beside the lists)."""
    from leadre.bundle import RecallBundle
    from leadre.schema import read_data_dir

    settings = section(parse_config(config), "nearline", NearlineSettings, "pipeline config")
    recall_bundle = RecallBundle.load(bundle_dir, device=device or "auto")
    tables = read_data_dir(data, validate=False)
    users = tables.users.set_index("user_id")
    user_ids = list(users.index[: settings.users] if settings.users else users.index)
    events = {u: df for u, df in tables.events.groupby("user_id", sort=False)}
    empty = tables.events.iloc[:0]
    generated_at = dt.datetime.now(dt.timezone.utc)
    rows: list[dict[str, Any]] = []
    for start in range(0, len(user_ids), settings.batch_size):
        batch = user_ids[start:start + settings.batch_size]
        histories = [recall_bundle.history(u, users.loc[u].to_dict(), events.get(u, empty))[0] for u in batch]
        for user_id, ranked in zip(batch, recall_bundle.recall(histories, settings.top_n, settings.beam)):
            rows.append({"user_id": user_id, "ad_ids": [a for a, _ in ranked], "scores": [float(s) for _, s in ranked],
                         "model_version": recall_bundle.model_version, "generated_at": generated_at})
    import pandas as pd

    inputs = {"bundle": bundle_dir, "data": data}
    with write_artifact(out, "nearline", inputs, dataclasses.asdict(settings)) as (tmp, manifest):
        pd.DataFrame(rows).to_parquet(tmp / "recall_lists.parquet", index=False)
        manifest["model_version"] = recall_bundle.model_version
        manifest["counts"] = {"users": len(rows)}
        if feature_repo:
            from leadre import features

            features.apply(feature_repo, data, production)
            features.materialize(feature_repo, data, production)
            features.push_recall_lists(features.open_store(feature_repo, production), rows)
            manifest["feature_repo"] = str(feature_repo)
    lengths = [len(r["ad_ids"]) for r in rows]
    _write_report(report, "Near-line recall", _table({"users": len(rows), "model version": recall_bundle.model_version,
                                                      "mean list length": sum(lengths) / max(len(lengths), 1),
                                                      "pushed to Feast": bool(feature_repo)}))
    announce("nearline", f"{len(rows):,} users' recall lists" + (f" pushed to Feast at {feature_repo}" if feature_repo else ""))
    return {"users": float(len(rows))}


def switch_current(deploy_root: str | Path, bundle_dir: str | Path) -> Path:
    """Copy the bundle to `<root>/bundles/<model version>` and point `<root>/current` at it in one rename, so a
    reader sees the old bundle or the new one, never a mix. Returns the deployed bundle's directory."""
    from leadre.bundle import read_bundle_manifest

    root = Path(deploy_root)
    version = read_bundle_manifest(bundle_dir)["model_version"]
    target = root / BUNDLES / version
    if not target.exists():  # copied beside its final name, renamed into place: never a half-copied bundle
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{version}.tmp-", dir=target.parent))
        try:
            shutil.copytree(bundle_dir, tmp, dirs_exist_ok=True)
            tmp.chmod(0o755)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    link = root / f".{CURRENT}.tmp-{os.getpid()}"
    link.unlink(missing_ok=True)
    link.symlink_to(Path(BUNDLES) / version)  # relative: the deploy root can move or be mounted elsewhere
    os.replace(link, root / CURRENT)
    return target


def patch_inference_services(api: Any, names: Sequence[str], namespace: str, storage_uri: str,
                             version: str) -> list[str]:
    """Point KServe InferenceServices at a new bundle: the container's STORAGE_URI (KServe's storage initializer
    then mounts it at /mnt/models) and a model-version annotation; KServe rolls the pods. `api` is a
    `kubernetes.client.CustomObjectsApi`. Returns the names patched."""
    patched = []
    for name in names:
        isvc = api.get_namespaced_custom_object("serving.kserve.io", "v1beta1", namespace, "inferenceservices", name)
        predictor = isvc["spec"]["predictor"]
        containers = predictor.get("containers") or []
        if not containers:
            raise ValueError(f"InferenceService {namespace}/{name} has no predictor container to point at the bundle")
        env = [e for e in containers[0].get("env", []) if e.get("name") != "STORAGE_URI"]
        containers[0]["env"] = env + [{"name": "STORAGE_URI", "value": storage_uri}]
        body = {"metadata": {"annotations": {VERSION_ANNOTATION: version}},
                "spec": {"predictor": {"containers": containers}}}
        api.patch_namespaced_custom_object("serving.kserve.io", "v1beta1", namespace, "inferenceservices", name, body)
        patched.append(name)
    return patched


def deploy(bundle_dir: str, bundle_uri: str, deploy_root: str, inference_services: str, namespace: str,
           deploy_pvc: str, report: str) -> str:
    """Switch `<deploy root>/current` to the bundle. On a cluster (`inference_services` set): also patch
    those InferenceServices to the bundle's storage URI — `pvc://<claim>/bundles/<version>` when the deploy root
    is that claim, else the artifact's own URI in the pipeline's object store. Returns the model version."""
    from leadre.bundle import read_bundle_manifest

    if not deploy_root:
        raise ValueError("deploy: no deploy root: the next run's gate compares with the bundle deployed there")
    version = read_bundle_manifest(bundle_dir)["model_version"]
    target = switch_current(deploy_root, bundle_dir)
    lines = [f"model version: `{version}`", f"{Path(deploy_root) / CURRENT} -> {target}"]
    names = [n.strip() for n in inference_services.split(",") if n.strip()]
    if names:
        from kubernetes import client, config as kube_config

        kube_config.load_incluster_config()
        uri = f"pvc://{deploy_pvc}/{BUNDLES}/{version}" if deploy_pvc else bundle_uri
        patched = patch_inference_services(client.CustomObjectsApi(), names, namespace, uri, version)
        lines.append(f"InferenceServices {', '.join(patched)} in {namespace} -> {uri}")
    _write_report(report, "Deploy", [f"- {line}" for line in lines])
    announce("deploy", "; ".join(lines))
    return version


# ---------------------------------------------------------------------------------------------------------------
# Running the pipeline


@dataclass
class LocalRun:
    """A finished `run_local`: the run's folder (one sub-folder per task, one per output artifact inside)."""

    run_dir: Path
    log_file: Path | None
    steps: dict[str, str]  # step -> its one-line summary, in the order they finished
    seconds: float

    @property
    def promoted(self) -> bool:
        return "deploy" in self.steps

    def artifact(self, task: str, output: str) -> Path:
        return self.run_dir / task / output


class PipelineFailed(RuntimeError):
    """A task of a local run failed; the message names it and the log to read."""


class _Progress(io.TextIOBase):
    """A text stream that passes everything to `sink` and calls `on_step` for each step's summary line."""

    def __init__(self, sink: TextIO, on_step: Callable[[str, str], None]):
        self.sink, self.on_step, self.pending = sink, on_step, ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.sink.write(text)
        self.sink.flush()
        *lines, self.pending = (self.pending + text).split("\n")
        for line in lines:
            if STEP_MARK in line:
                event = json.loads(line.split(STEP_MARK, 1)[1])
                self.on_step(event["step"], event["summary"])
        return len(text)


def run_local(pipeline_func: Any, arguments: dict[str, Any], root: str | Path, verbose: bool = False,
              cache: bool = False, out: TextIO | None = None) -> LocalRun:
    """Run a pipeline with kfp.local's SubprocessRunner in this Python environment (the project's image locally).
    Artifacts go under `<root>/kfp/<run>/`; kfp's and the components' own output to `<root>/pipeline.log` (or
    to `out` as well, with `verbose`); `out` gets one line per finished step. With `cache`, a task whose inputs
    match an earlier run's (under the same root) reuses its outputs, as KFP does on a cluster; the steps that
    read or write outside state (evaluate, nearline, deploy) never do."""
    from kfp import local

    out = out or sys.stdout
    root = Path(root).resolve()
    pipeline_root = root / "kfp"
    pipeline_root.mkdir(parents=True, exist_ok=True)
    before = set(pipeline_root.iterdir())
    started = last = time.perf_counter()
    steps: dict[str, str] = {}

    def on_step(step: str, summary: str) -> None:
        nonlocal last
        now = time.perf_counter()
        steps[step] = summary
        print(f"[{step}] {summary} ({now - last:.0f} s)", file=out, flush=True)
        last = now

    log_file = None if verbose else root / "pipeline.log"
    with contextlib.ExitStack() as stack:
        stream = _Progress(stack.enter_context(open(log_file, "w")) if log_file else out, on_step)
        stack.enter_context(contextlib.redirect_stdout(stream))
        stack.enter_context(contextlib.redirect_stderr(stream))
        stack.enter_context(warnings.catch_warnings())
        # The components name the project's image (leadre:cpu); the subprocess runner runs them in this
        # environment instead, which is what that image holds, and would warn that the image is not a Python one.
        warnings.filterwarnings("ignore", message=".*non-Python base image.*", category=RuntimeWarning)
        # Resource requests are for the cluster; kfp.local says once per task that it ignores them.
        warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root), raise_on_error=True,
                   enable_caching=cache, cache_root=str(root / "kfp-cache"))
        if not verbose:  # kfp logs to the root logger outside its own log contexts too (e.g. its clean-up)
            root_logger = logging.getLogger()
            stack.callback(root_logger.setLevel, root_logger.level)
            root_logger.setLevel(logging.WARNING)
        try:
            pipeline_func(**arguments)
        except RuntimeError as e:
            failed = re.search(r"Inner task failed: (.*)\.", str(e))
            task = re.sub(r"\x1b\[[0-9;]*m", "", failed.group(1)) if failed else "?"
            where = f"; its output is in {log_file}" if log_file else ""
            raise PipelineFailed(f"pipeline task {task} failed{where}") from None
    runs = sorted(set(pipeline_root.iterdir()) - before)
    if len(runs) != 1:
        raise PipelineFailed(f"expected one new run folder under {pipeline_root}, found {len(runs)}")
    return LocalRun(runs[0], log_file, steps, time.perf_counter() - started)


def compile_pipeline(pipeline_func: Any, file: str | Path) -> Path:
    from kfp import compiler

    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(pipeline_func, str(file))
    return file


def submit(client: Any, package: str | Path, arguments: dict[str, Any], run_name: str, experiment: str) -> Any:
    """One run of a compiled pipeline on a KFP server (`client`: a `kfp.Client`)."""
    return client.create_run_from_pipeline_package(str(package), arguments=arguments, run_name=run_name,
                                                   experiment_name=experiment)


def schedule(client: Any, package: str | Path, arguments: dict[str, Any], cron: str, job_name: str, experiment: str,
             max_concurrency: int = 1) -> Any:
    """A recurring run (e.g. daily: cron `0 0 3 * * *`, KFP's six-field cron with seconds) of a compiled pipeline."""
    if len(cron.split()) != 6:
        raise ValueError(f"cron {cron!r}: KFP expects six fields (seconds first), e.g. '0 0 3 * * *' for 03:00 daily")
    experiment_id = client.create_experiment(experiment).experiment_id
    return client.create_recurring_run(experiment_id=experiment_id, job_name=job_name, cron_expression=cron,
                                       pipeline_package_path=str(package), params=arguments,
                                       max_concurrency=max_concurrency, no_catchup=True, enabled=True)
