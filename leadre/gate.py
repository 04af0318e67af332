"""Evaluation results on disk and the promotion gate (DESIGN §4 step 6): a candidate model replaces the deployed
one only if it beats it on the gate metric without losing eCPM or generating invalid IDs.

An evaluation directory holds `metrics.json`, a table of it (`metrics.md`) and a Recall@K plot
(`recall_at_k.png`). The schema of `metrics.json`:

    {
      "schema_version": 1,
      "model": "sft",                 # the model under evaluation: the one the gate compares
      "ks": [1, 5, 10, 20, 50],
      "results": {                    # every model of the run, baselines included
        "<model>": {
          "<split>": {                # "validation", "test"
            "<variant>": {            # "seen_kept", "seen_excluded"
              "<metric>": value       # the names of `leadre.metrics.recall_metrics`: "recall@10", "ndcg@10",
            }                         # "ecpm@10", "coverage@10", ..., "invalid_id_rate", "users"
          }
        }
      }
    }
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from leadre.artifacts import ArtifactError
from leadre.metrics import KS

METRICS_FILE = "metrics.json"
TABLE_FILE = "metrics.md"
PLOT_FILE = "recall_at_k.png"
SCHEMA_VERSION = 1

Results = dict[str, dict[str, dict[str, dict[str, float]]]]  # model -> split -> variant -> metric -> value


class MetricsError(ValueError):
    """Evaluation metrics lack a key the gate needs, or hold a bad value there."""

    def __init__(self, source: str, key: str, problem: str):
        self.source, self.key, self.problem = source, key, problem
        super().__init__(f"{source}: {key}: {problem}")


def _model_order(results: Results, model: str) -> list[str]:
    return [model] + [name for name in results if name != model]


def _sections(results: Results, models: list[str]) -> list[tuple[str, str]]:
    """(split, variant) pairs present in any model, in first-seen order."""
    return list(dict.fromkeys((split, variant) for name in models
                              for split, variants in results[name].items() for variant in variants))


def _format(value: float) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:.4f}"


def metrics_table(results: Results, model: str) -> str:
    """Markdown: per split and variant, one row per metric and one column per model (the evaluated one first)."""
    models = _model_order(results, model)
    lines = [f"# Evaluation of `{model}`"]
    for split, variant in _sections(results, models):
        columns = [results[name].get(split, {}).get(variant, {}) for name in models]
        metrics = list(dict.fromkeys(metric for column in columns for metric in column))
        lines += ["", f"## {split}, {variant.replace('_', ' ')}", "",
                  "| metric | " + " | ".join(models) + " |", "|---" * (len(models) + 1) + "|"]
        lines += [f"| {metric} | " + " | ".join(_format(c[metric]) if metric in c else "–" for c in columns) + " |"
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


def write_evaluation(directory: str | Path, results: Results, model: str, ks: Sequence[int] = KS) -> None:
    """Write metrics.json, metrics.md and recall_at_k.png into `directory`; call it inside `write_artifact`,
    which adds the manifest and makes the whole directory appear atomically."""
    if model not in results:
        raise ValueError(f"model {model!r} is not among the results ({', '.join(results)})")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    document = {"schema_version": SCHEMA_VERSION, "model": model, "ks": list(ks), "results": results}
    (directory / METRICS_FILE).write_text(json.dumps(document, indent=2) + "\n")
    (directory / TABLE_FILE).write_text(metrics_table(results, model))
    plot_recall(results, model, ks, directory / PLOT_FILE)


def read_evaluation(directory: str | Path) -> dict[str, Any] | None:
    """The parsed metrics.json of an evaluation directory; None if the directory is missing or empty (no model
    has been deployed yet)."""
    directory = Path(directory)
    if not directory.exists() or (directory.is_dir() and not any(directory.iterdir())):
        return None
    file = directory / METRICS_FILE
    if not file.is_file():
        raise ArtifactError(f"{directory}: no {METRICS_FILE}; is it an evaluation directory (leadre evaluate --out)?")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{file}: not valid JSON ({e})") from None


@dataclass(frozen=True)
class Policy:
    metric: str = "recall@10"
    split: str = "validation"
    variant: str = "seen_kept"
    min_gain: float = 0.0  # the candidate must beat the current model by more than this
    relative_gain: bool = False  # min_gain is a fraction of the current value rather than a difference
    guard_metric: str = "ecpm@10"  # a metric that may not fall much while the gate metric rises
    max_guard_drop: float = 0.05  # the largest allowed fall of guard_metric, as a fraction of the current value
    max_invalid_rate: float = 0.01  # the largest allowed invalid_id_rate of the candidate


# Deploying a new model: it must recall better without losing much eCPM.
DEPLOY_POLICY = Policy()
# DPO over its SFT model: DPO exists to raise eCPM, so it ships if eCPM@10 rises while Recall@10 falls by at most 2%.
DPO_POLICY = Policy(metric="ecpm@10", relative_gain=True, guard_metric="recall@10", max_guard_drop=0.02)


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    policy: Policy
    candidate: dict[str, Any]  # model name and the numbers the gate read
    current: dict[str, Any] | None  # None: nothing deployed yet

    def as_dict(self) -> dict[str, Any]:
        return {"decision": "promote" if self.promote else "keep current", **dataclasses.asdict(self)}


def _value(metrics: Any, source: str, policy: Policy, metric: str) -> float:
    if not isinstance(metrics, dict):
        raise MetricsError(source, "(top level)", f"expected a JSON object, got {type(metrics).__name__}")
    if metrics.get("schema_version") != SCHEMA_VERSION:
        raise MetricsError(source, "schema_version", f"{metrics.get('schema_version')!r}, expected {SCHEMA_VERSION}")
    if not isinstance(metrics.get("model"), str):
        raise MetricsError(source, "model", f"missing or not a model name: {metrics.get('model')!r}")
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
    values = {name: _value(metrics, source, policy, name) for name in names}
    return {"model": metrics["model"], **values}


def decide(candidate_metrics: Any, current_metrics: Any | None, policy: Policy = Policy()) -> Decision:
    """Promote the candidate's model over the current one (None: nothing deployed) under `policy`; raises
    `MetricsError` naming the side and key when either document lacks what the policy reads."""
    p = policy
    where = f"{p.split}/{p.variant}"
    candidate = _numbers(candidate_metrics, "candidate", p, (p.metric, p.guard_metric, "invalid_id_rate"))
    current = None if current_metrics is None else _numbers(current_metrics, "current", p, (p.metric, p.guard_metric))

    invalid = candidate["invalid_id_rate"]
    checks = [(invalid <= p.max_invalid_rate, f"invalid-ID rate {invalid:.4f} (limit {p.max_invalid_rate:.4f})")]
    if current is not None:
        new, old = candidate[p.metric], current[p.metric]
        if p.relative_gain:
            gain = (new - old) / old if old else (math.inf if new > old else 0.0)
            shown = f"{gain:+.2%}, must exceed {p.min_gain:.2%}"
        else:
            gain = new - old
            shown = f"{gain:+.4f}, must exceed {p.min_gain:.4f}"
        checks.append((gain > p.min_gain, f"{where} {p.metric} {new:.4f} vs current {old:.4f} (gain {shown})"))
        new_guard, old_guard = candidate[p.guard_metric], current[p.guard_metric]
        drop = (old_guard - new_guard) / old_guard if old_guard else 0.0
        checks.append((drop <= p.max_guard_drop, f"{where} {p.guard_metric} {new_guard:.4f} vs current {old_guard:.4f} "
                                                  f"(drop {drop:.2%}, limit {p.max_guard_drop:.2%})"))
    failed = [text for ok, text in checks if not ok]
    if failed:
        return Decision(False, "; ".join(failed), p, candidate, current)
    passed = "; ".join(text for _, text in checks)
    return Decision(True, passed if current is not None else f"nothing deployed yet; {passed}", p, candidate, current)


def gate(candidate_dir: str | Path, current_dir: str | Path, policy: Policy = Policy()) -> Decision:
    """`decide` on two evaluation directories; errors name the file and key."""
    candidate = read_evaluation(candidate_dir)
    if candidate is None:
        raise ArtifactError(f"{candidate_dir}: no candidate evaluation (missing or empty directory)")
    try:
        return decide(candidate, read_evaluation(current_dir), policy)
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
