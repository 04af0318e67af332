"""Evaluation results on disk and the promotion gate (DESIGN §4 step 6): a candidate model replaces the deployed
one only if it beats it on the gate metric, over the same users and by more than noise, without losing eCPM or
generating invalid IDs.

An evaluation directory holds `metrics.json`, the per-user values behind it (`per_user.parquet`), a table
(`metrics.md`) and a Recall@K plot (`recall_at_k.png`). The schema of `metrics.json`:

    {
      "schema_version": 2,
      "model": "sft",                 # the model under evaluation: the one the gate compares
      "ks": [1, 5, 10, 20, 50],
      "protocol": {                   # what two evaluations must share to be compared
        "data": "<sha256>",           # content of the data directory (ads, events, ...)
        "sids": "<sha256>",           # content of the S-ID artifact
        "split": {"positive_actions": [...], "min_positives": 3},
        "search": {"beam": 50, "renormalize": false, "dtype": "float32"},
        "users": {"<split>": {"count": 2999, "fingerprint": "<sha256 of the users and their targets>",
                              "sample": null, "seed": 0}}
      },
      "results": {                    # every model of the run, baselines included
        "<model>": {
          "<split>": {                # "validation", "test"
            "<variant>": {            # "seen_excluded" (the headline), "seen_kept"
              "<metric>": value       # the names of `leadre.metrics.summarize`: "recall@10", "ndcg@10",
            }                         # "ecpm@10", "coverage@10", ..., "invalid_id_rate", "list_length", "users"
          }
        }
      },
      "intervals": {"<model>": {"<split>": {"<variant>": {"recall@10": [low, high], ...}}}},  # 95%, bootstrap
      "confidence": 0.95                                                                    # over users
    }

`per_user.parquet` has one row per (model, split, variant, user): the target's `rank` (-1: missed), the list
`length` and `ecpm@K`; the gate's paired test reads it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from leadre.artifacts import ArtifactError
from leadre.metrics import KS, bootstrap_gain, confidence_interval, parse_user_metric, user_metric

METRICS_FILE = "metrics.json"
PER_USER_FILE = "per_user.parquet"
TABLE_FILE = "metrics.md"
PLOT_FILE = "recall_at_k.png"
SCHEMA_VERSION = 2
PER_USER = "per_user"  # the key under which `read_evaluation` puts the per-user table

Results = dict[str, dict[str, dict[str, dict[str, float]]]]  # model -> split -> variant -> metric -> value
Intervals = dict[str, dict[str, dict[str, dict[str, list[float]]]]]  # model -> split -> variant -> metric -> [lo, hi]


class MetricsError(ValueError):
    """Evaluation metrics lack a key the gate needs, or hold a bad value there."""

    def __init__(self, source: str, key: str, problem: str):
        self.source, self.key, self.problem = source, key, problem
        super().__init__(f"{source}: {key}: {problem}")


class EvaluationMismatch(ValueError):
    """Candidate and current were not evaluated alike (data, S-IDs, split, search or users differ)."""


def _model_order(results: Results, model: str) -> list[str]:
    return [model] + [name for name in results if name != model]


def _sections(results: Results, models: list[str]) -> list[tuple[str, str]]:
    """(split, variant) pairs present in any model, in first-seen order."""
    return list(dict.fromkeys((split, variant) for name in models
                              for split, variants in results[name].items() for variant in variants))


def _format(value: float) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:.4f}"


def _cell(metrics: dict[str, float], interval: dict[str, list[float]], metric: str) -> str:
    if metric not in metrics:
        return "–"
    if metric not in interval:
        return _format(metrics[metric])
    low, high = interval[metric]
    return f"{_format(metrics[metric])} ({low:.4f}–{high:.4f})"


def metrics_table(results: Results, model: str, intervals: Intervals | None = None, confidence: float = 0.95) -> str:
    """Markdown: per split and variant (seen excluded, the headline, first), one row per metric and one column per
    model (the evaluated one first); Recall and NDCG with their bootstrap intervals where given."""
    models = _model_order(results, model)
    intervals = intervals or {}
    lines = [f"# Evaluation of `{model}`"]
    if intervals:
        lines += ["", f"In brackets: {confidence:.0%} confidence intervals, bootstrap over users."]
    for split, variant in _sections(results, models):
        columns = [results[name].get(split, {}).get(variant, {}) for name in models]
        bounds = [intervals.get(name, {}).get(split, {}).get(variant, {}) for name in models]
        metrics = list(dict.fromkeys(metric for column in columns for metric in column))
        lines += ["", f"## {split}, {variant.replace('_', ' ')}", "",
                  "| metric | " + " | ".join(models) + " |", "|---" * (len(models) + 1) + "|"]
        lines += [f"| {metric} | " + " | ".join(_cell(c, b, metric) for c, b in zip(columns, bounds)) + " |"
                  for metric in metrics]
    return "\n".join(lines) + "\n"


def plot_recall(results: Results, model: str, ks: Sequence[int], file: Path) -> None:
    """Recall@K against K, one line per model, one panel per split and variant."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg

    models = _model_order(results, model)
    sections = _sections(results, models)
    fig = Figure(figsize=(4.5 * len(sections), 3.6), layout="constrained")
    for ax, (split, variant) in zip(fig.subplots(1, len(sections), squeeze=False)[0], sections):
        for name in models:
            metrics = results[name].get(split, {}).get(variant, {})
            points = [(k, metrics[f"recall@{k}"]) for k in ks if f"recall@{k}" in metrics]
            if points:
                ax.plot(*zip(*points), marker="o", label=name, linewidth=2.5 if name == model else 1.2)
        ax.set(xscale="log", xticks=list(ks), xticklabels=[str(k) for k in ks], xlabel="K", ylabel="Recall@K",
               title=f"{split}, {variant.replace('_', ' ')}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.savefig(file, dpi=100)


def write_evaluation(directory: str | Path, results: Results, model: str, ks: Sequence[int] = KS,
                     intervals: Intervals | None = None, per_user: pd.DataFrame | None = None,
                     protocol: dict[str, Any] | None = None, confidence: float = 0.95) -> None:
    """Write metrics.json, per_user.parquet (when given), metrics.md and recall_at_k.png into `directory`; call it
    inside `write_artifact`, which adds the manifest and makes the whole directory appear atomically."""
    if model not in results:
        raise ValueError(f"model {model!r} is not among the results ({', '.join(results)})")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    document = {"schema_version": SCHEMA_VERSION, "model": model, "ks": list(ks), "protocol": protocol or {},
                "results": results, "intervals": intervals or {}, "confidence": confidence}
    (directory / METRICS_FILE).write_text(json.dumps(document, indent=2) + "\n")
    if per_user is not None:
        per_user.to_parquet(directory / PER_USER_FILE, index=False)
    (directory / TABLE_FILE).write_text(metrics_table(results, model, intervals, confidence))
    plot_recall(results, model, ks, directory / PLOT_FILE)


def read_evaluation(directory: str | Path) -> dict[str, Any] | None:
    """The parsed metrics.json of an evaluation directory, with its per-user table under "per_user" (a DataFrame)
    when the directory has one; None if the directory is missing or empty."""
    directory = Path(directory)
    if not directory.exists() or (directory.is_dir() and not any(directory.iterdir())):
        return None
    file = directory / METRICS_FILE
    if not file.is_file():
        raise ArtifactError(f"{directory}: no {METRICS_FILE}; is it an evaluation directory (leadre evaluate --out)?")
    try:
        document = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{file}: not valid JSON ({e})") from None
    if isinstance(document, dict) and (directory / PER_USER_FILE).is_file():
        document[PER_USER] = pd.read_parquet(directory / PER_USER_FILE)
    return document


@dataclass(frozen=True)
class Policy:
    metric: str = "recall@10"  # a per-user metric: recall@K, ndcg@K or ecpm@K
    split: str = "validation"
    variant: str = "seen_excluded"
    min_gain: float = 0.0  # the lower confidence bound of the gain must exceed this
    relative_gain: bool = False  # the gain is a fraction of the current value rather than a difference
    confidence: float = 0.95  # of the paired bootstrap interval of the gain
    resamples: int = 2000  # bootstrap resamples (seeded: the same evaluations give the same decision)
    guard_metric: str = "ecpm@10"  # a metric that may not fall much while the gate metric rises
    max_guard_drop: float = 0.05  # the largest allowed fall of guard_metric, as a fraction of the current value
    max_invalid_rate: float = 0.01  # the largest allowed invalid_id_rate of the candidate
    allow_new_sids: bool = False  # candidate and current may be evaluated with different S-ID artifacts

    def __post_init__(self) -> None:
        parse_user_metric(self.metric)  # the paired test needs per-user values
        if not 0 < self.confidence < 1 or self.resamples < 100:
            raise ValueError("confidence must be in (0, 1) and resamples at least 100")


# Deploying a new model: it must recall better, beyond noise, without losing much eCPM.
DEPLOY_POLICY = Policy()
# DPO over its SFT model: DPO exists to raise eCPM, so it ships if eCPM@10 rises while Recall@10 falls by at most 2%.
DPO_POLICY = Policy(metric="ecpm@10", relative_gain=True, guard_metric="recall@10", max_guard_drop=0.02)


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    policy: Policy
    candidate: dict[str, Any]  # model name and the numbers the gate read
    current: dict[str, Any] | None  # None: first deployment
    gain: dict[str, Any] | None = None  # the paired test: estimate, interval, confidence, users

    def as_dict(self) -> dict[str, Any]:
        return {"decision": "promote" if self.promote else "keep current", **dataclasses.asdict(self)}


def _check_document(metrics: Any, source: str) -> None:
    if not isinstance(metrics, dict):
        raise MetricsError(source, "(top level)", f"expected a JSON object, got {type(metrics).__name__}")
    if metrics.get("schema_version") != SCHEMA_VERSION:
        raise MetricsError(source, "schema_version", f"{metrics.get('schema_version')!r}, expected {SCHEMA_VERSION} "
                                                     "(re-run leadre evaluate)")
    if not isinstance(metrics.get("model"), str):
        raise MetricsError(source, "model", f"missing or not a model name: {metrics.get('model')!r}")


def _value(metrics: dict[str, Any], source: str, policy: Policy, metric: str) -> float:
    node: Any = metrics
    path: list[str] = []
    for key in ("results", metrics["model"], policy.split, policy.variant, metric):
        if not isinstance(node, dict):
            raise MetricsError(source, ".".join(path), f"expected an object, got {type(node).__name__}")
        if key not in node:
            raise MetricsError(source, ".".join(path + [key]), f"missing (has: {', '.join(map(str, node)) or 'nothing'})")
        node = node[key]
        path.append(key)
    if isinstance(node, bool) or not isinstance(node, (int, float)) or not math.isfinite(node):
        raise MetricsError(source, ".".join(path), f"not a finite number: {node!r}")
    return float(node)


def _numbers(metrics: Any, source: str, policy: Policy, names: Sequence[str]) -> dict[str, Any]:
    _check_document(metrics, source)
    values = {name: _value(metrics, source, policy, name) for name in names}
    return {"model": metrics["model"], **values}


def check_comparable(candidate: dict[str, Any], current: dict[str, Any], policy: Policy) -> None:
    """Raise `EvaluationMismatch` unless both evaluations used the same data, split, search and users of the gate's
    split (and S-IDs, unless the policy allows new ones)."""
    keys = ["data", "split", "search"] + ([] if policy.allow_new_sids else ["sids"])
    protocols = {}
    for source, document in (("candidate", candidate), ("current", current)):
        protocol = document.get("protocol")
        if not isinstance(protocol, dict):
            raise MetricsError(source, "protocol", "missing (re-run leadre evaluate)")
        for key in keys:
            if key not in protocol:
                raise MetricsError(source, f"protocol.{key}", "missing (re-run leadre evaluate)")
        users = protocol.get("users", {})
        if not isinstance(users, dict) or policy.split not in users:
            raise MetricsError(source, f"protocol.users.{policy.split}", "missing: that split was not evaluated")
        protocols[source] = {key: protocol[key] for key in keys} | {"users": users[policy.split]}
    for key, value in protocols["candidate"].items():
        if value != protocols["current"][key]:
            hint = {"users": f"the same users of the {policy.split} split (all, or the same sample and seed)",
                    "sids": "the same S-ID artifact (or pass --allow-new-sids when the candidate brings its own)",
                    "search": "the same beam width, scoring and precision"}.get(key, f"the same {key}")
            raise EvaluationMismatch(f"candidate and current were evaluated with different {key} "
                                     f"({value!r} vs {protocols['current'][key]!r}): evaluate both with {hint}")


def _user_values(document: dict[str, Any], source: str, policy: Policy) -> pd.DataFrame:
    """The per-user rows of the document's model on the policy's split and variant, indexed by user."""
    table = document.get(PER_USER)
    if not isinstance(table, pd.DataFrame):
        raise MetricsError(source, PER_USER, f"missing: the paired test needs {PER_USER_FILE} (re-run leadre evaluate)")
    rows = table[(table["model"] == document["model"]) & (table["split"] == policy.split)
                 & (table["variant"] == policy.variant)]
    if rows.empty:
        raise MetricsError(source, PER_USER, f"no rows for {document['model']} on {policy.split}/{policy.variant}")
    return rows.set_index("user_id")


def decide(candidate_metrics: Any, current_metrics: Any | None, policy: Policy = DEPLOY_POLICY) -> Decision:
    """Promote the candidate's model over the current one (None: a first deployment) under `policy`.

    The gain is tested on the users both were evaluated on, paired: the lower bound of the bootstrap interval of
    the gain must exceed `min_gain`, so a difference that noise could make does not promote. Raises `MetricsError`
    naming the side and key when a document lacks what the policy reads, and `EvaluationMismatch` when the two
    were not evaluated alike."""
    p = policy
    where = f"{p.split}/{p.variant}"
    candidate = _numbers(candidate_metrics, "candidate", p, (p.metric, p.guard_metric, "invalid_id_rate"))
    invalid = candidate["invalid_id_rate"]
    checks = [(invalid <= p.max_invalid_rate, f"invalid-ID rate {invalid:.4f} (limit {p.max_invalid_rate:.4f})")]
    if current_metrics is None:
        promote, text = checks[0]
        return Decision(promote, f"first deployment; {text}", p, candidate, None)

    current = _numbers(current_metrics, "current", p, (p.metric, p.guard_metric))
    check_comparable(candidate_metrics, current_metrics, p)
    new_users = _user_values(candidate_metrics, "candidate", p)
    old_users = _user_values(current_metrics, "current", p)
    if len(old_users) != len(new_users) or not new_users.index.isin(old_users.index).all():
        raise EvaluationMismatch(f"candidate and current per-user values cover different users on {where}")
    old_users = old_users.loc[new_users.index]  # paired: the same user in the same row
    estimate, samples = bootstrap_gain(user_metric(new_users, p.metric), user_metric(old_users, p.metric),
                                       p.relative_gain, p.resamples)
    low, high = confidence_interval(samples, p.confidence)
    gain = {"metric": p.metric, "relative": p.relative_gain, "estimate": estimate, "low": low, "high": high,
            "confidence": p.confidence, "users": len(new_users)}
    unit = (lambda x: f"{x:+.2%}") if p.relative_gain else (lambda x: f"{x:+.4f}")
    checks.append((low > p.min_gain,
                   f"{where} {p.metric} {candidate[p.metric]:.4f} vs current {current[p.metric]:.4f}: gain "
                   f"{unit(estimate)}, {p.confidence:.0%} interval [{unit(low)}, {unit(high)}] over "
                   f"{len(new_users):,} users; its lower bound must exceed {unit(p.min_gain)}"))
    new_guard, old_guard = candidate[p.guard_metric], current[p.guard_metric]
    shown = f"{where} {p.guard_metric} {new_guard:.4f} vs current {old_guard:.4f}"
    if old_guard > 0:
        drop = (old_guard - new_guard) / old_guard
        checks.append((drop <= p.max_guard_drop, f"{shown} (drop {drop:.2%}, limit {p.max_guard_drop:.2%})"))
    else:  # no relative drop to measure: the guard holds only if the candidate has something to guard
        checks.append((new_guard > 0, f"{shown} (a current value of 0 guards nothing; the candidate's must be above 0)"))
    failed = [text for ok, text in checks if not ok]
    if failed:
        return Decision(False, "; ".join(failed), p, candidate, current, gain)
    return Decision(True, "; ".join(text for _, text in checks), p, candidate, current, gain)


def gate(candidate_dir: str | Path, current_dir: str | Path | None, policy: Policy = DEPLOY_POLICY,
         first_deploy: bool = False) -> Decision:
    """`decide` on two evaluation directories; errors name the file and key. A missing or empty `current_dir` is an
    error unless `first_deploy` says that nothing is deployed yet (and then `current_dir` must hold nothing)."""
    candidate = read_evaluation(candidate_dir)
    if candidate is None:
        raise ArtifactError(f"{candidate_dir}: no candidate evaluation (missing or empty directory)")
    current = None if current_dir is None else read_evaluation(current_dir)
    if first_deploy and current is not None:
        raise ArtifactError(f"{current_dir}: holds an evaluation of a deployed model, but --first-deploy says nothing "
                            "is deployed; drop one of the two")
    if not first_deploy and current is None:
        raise ArtifactError(f"{current_dir if current_dir is not None else '--current'}: no evaluation of the deployed "
                            "model (missing or empty directory); pass --first-deploy if nothing is deployed yet")
    try:
        return decide(candidate, current, policy)
    except MetricsError as e:
        directory = candidate_dir if e.source == "candidate" else current_dir
        raise MetricsError(str(Path(directory) / METRICS_FILE), e.key, e.problem) from None


def format_decision(decision: Decision) -> str:
    lines = [f"{'PROMOTE' if decision.promote else 'KEEP CURRENT'}: {decision.reason}"]
    for side, numbers in (("candidate", decision.candidate), ("current", decision.current)):
        if numbers is not None:
            shown = "  ".join(f"{k} {v:.4f}" for k, v in numbers.items() if k != "model")
            lines.append(f"  {side:<9} {numbers['model']}: {shown}")
    return "\n".join(lines)
