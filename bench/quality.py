"""Recall quality under a CPU budget, with the ablations of the design: what each idea buys.

    python bench/quality.py --data DIR --name NAME [--config YAML] [--minutes 20] [--splits validation]

One S-ID build, then per variant: prompts, SFT for at most `--minutes` of wall-clock time (the same budget for
every variant), and for the full system DPO on top; finally one evaluation of every model and the baselines on the
same users (leave-one-out, full ranking over the active ads; all evaluated users unless --eval-users samples).
Choices are made on the validation split alone (`--splits validation`, half the evaluation time); the test split
is for the final table: `--reuse --splits test` evaluates the models a run of the same name trained, untouched.
Every cell carries its 95% confidence interval (bootstrap over users); "seen excluded" is the headline protocol.
Variants:

- full: SFT with alignment tasks and augmentation, then DPO (the gate's decision against SFT is reported);
- no_dpo: the full system's SFT model;
- no_alignment: no explicit or implicit alignment examples;
- no_augmentation: one template, fixed profile order, no positive-interaction reuse (only each user's last
  training positive is a target).

Writes bench/results/quality-NAME.{json,md} and prints the markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import time
from pathlib import Path

from leadre.config import read_config, section
from leadre.devices import describe, resolve_device
from leadre.dpo import DPOSettings, train_dpo
from leadre.evaluate import evaluate
from leadre.gate import DPO_POLICY, decide, read_evaluation
from leadre.prompts import PromptConfig, build_prompts
from leadre.semantic_ids import SidSettings, build_sids
from leadre.sft import TrainSettings, train_sft

VARIANTS = {
    "full": {},
    "no_alignment": {"implicit_per_user": 0, "explicit_repeats": 0},
    "no_augmentation": {"templates": 1, "shuffle_profile": False, "reuse": "last"},
}
RESULTS = Path(__file__).resolve().parent / "results"
COLUMNS = [("validation", "seen_excluded"), ("test", "seen_excluded"), ("test", "seen_kept")]


def _trained(artifact: Path, args: argparse.Namespace) -> bool:
    """With --reuse, whether an earlier run of this name left `artifact` complete (its manifest is written last)."""
    return args.reuse and (artifact / "manifest.json").is_file()


def _suffix(args: argparse.Namespace) -> str:
    """A re-evaluation's results sit beside the training run's, named by the splits evaluated."""
    return "-" + "-".join(args.splits) if args.reuse else ""


def run(args: argparse.Namespace) -> dict:
    config = read_config(args.config)
    work = args.work / args.name
    work.mkdir(parents=True, exist_ok=True)
    earlier = args.results / f"quality-{args.name}.json"
    timings: dict[str, float] = {}
    if args.reuse and earlier.is_file():
        trained_with = json.loads(earlier.read_text())
        for key, value in (("data", str(args.data)), ("config", str(args.config)), ("preset", args.preset)):
            if trained_with[key] != value:
                raise SystemExit(f"--reuse: {earlier} was trained with {key} {trained_with[key]!r}, not {value!r}")
        timings = trained_with["timings_seconds"]  # the training times of reused models are the earlier run's

    started = time.perf_counter()
    if _trained(work / "sids", args):
        sids = json.loads((work / "sids" / "manifest.json").read_text())
    else:
        sid_settings = section(config, "sids", SidSettings, str(args.config), seed=args.seed)
        sids = build_sids(args.data, work / "sids", **dataclasses.asdict(sid_settings))
        timings["sids"] = time.perf_counter() - started
    models: dict[str, Path] = {}
    for variant in args.variants:
        models["no_dpo" if variant == "full" else variant] = work / f"sft-{variant}"
        if _trained(work / f"sft-{variant}", args):
            continue
        prompt_cfg = dataclasses.replace(section(config, "prompts", PromptConfig, str(args.config)), **VARIANTS[variant])
        build_prompts(args.data, work / "sids", work / f"prompts-{variant}", prompt_cfg)
        settings = section(config, "sft", TrainSettings, str(args.config), max_minutes=args.minutes, seed=args.seed,
                           device=args.device, epochs=args.epochs)
        started = time.perf_counter()
        train_sft(work / f"prompts-{variant}", work / "sids", work / f"sft-{variant}", args.preset, settings,
                  config.get("model") or {})
        timings[f"sft-{variant}"] = time.perf_counter() - started
    if "full" in args.variants and not _trained(work / "dpo-full", args):
        started = time.perf_counter()
        train_dpo(work / "sft-full", work / "prompts-full", args.data, work / "dpo-full",
                  section(config, "dpo", DPOSettings, str(args.config), seed=args.seed, device=args.device))
        timings["dpo-full"] = time.perf_counter() - started
    if "full" in args.variants:
        models = {"full": work / "dpo-full", **models}

    started = time.perf_counter()
    evaluation = work / f"evaluation{_suffix(args)}"
    report = evaluate(list(models.values()), args.data, work / "sids", evaluation, splits=args.splits,
                      beam=args.beam, users=args.eval_users, names=list(models), device=args.device)
    timings["evaluate"] = time.perf_counter() - started
    results = report["results"]
    gate = None
    if "full" in results and "validation" in args.splits:  # the gate decides on validation alone
        document = read_evaluation(evaluation)  # with the per-user values the gate's paired test reads
        gate = decide(document | {"model": "full"}, document | {"model": "no_dpo"}, DPO_POLICY)
    return {
        "name": args.name, "data": str(args.data), "config": str(args.config), "minutes_per_sft": args.minutes,
        "epochs": args.epochs,
        "preset": args.preset, "eval_users": args.eval_users, "beam": args.beam, "sids": sids["stats"],
        "results": results, "intervals": report["intervals"], "protocol": report["protocol"],
        "dpo_gate": gate.as_dict() if gate else None,
        "timings_seconds": {k: round(v, 1) for k, v in timings.items()},
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}",
        "device": describe(resolve_device(args.device)),
    }


def _cell(report: dict, name: str, split: str, variant: str) -> str:
    """Recall@10 / NDCG@10 with their 95% intervals."""
    metrics, bounds = report["results"][name][split][variant], report["intervals"][name][split][variant]
    return " / ".join(f"{metrics[m]:.4f} ({bounds[m][0]:.3f}–{bounds[m][1]:.3f})" for m in ("recall@10", "ndcg@10"))


def table(report: dict) -> str:
    users = {s: u["count"] for s, u in report["protocol"]["users"].items()}
    columns = [(s, v) for s, v in COLUMNS if s in users]
    last = columns[-1][0]  # the eCPM and list-length columns: test where it was evaluated
    head = ("| variant | " + " | ".join(f"R@10 / NDCG@10 {s}, {v.replace('_', ' ')}" for s, v in columns)
            + f" | eCPM@10 ({last}) | list length ({last}, seen excluded) |")
    lines = [f"# Quality: {report['name']} ({report['data']})", "",
             f"SFT budget {report['minutes_per_sft']} min per variant, preset {report['preset']}, beam {report['beam']}, "
             f"{report['machine']}, {report['device']}; users: " + ", ".join(f"{s} {n:,}" for s, n in users.items())
             + "; in brackets 95% confidence intervals (bootstrap over users).", "",
             head, "|---" * (len(columns) + 3) + "|"]
    for name, splits in report["results"].items():
        cells = [_cell(report, name, s, v) for s, v in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {splits[last]['seen_kept']['ecpm@10']:.2f} | "
                     f"{splits[last]['seen_excluded']['list_length']:.1f} |")
    if report["dpo_gate"]:
        lines += ["", f"DPO gate (full vs no_dpo, validation): {'promote' if report['dpo_gate']['promote'] else 'keep SFT'}"
                      f" — {report['dpo_gate']['reason']}"]
    lines += ["", "Timings (s): " + ", ".join(f"{k} {v:,.0f}" for k, v in report["timings_seconds"].items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="a data directory (leadre data synth / movielens)")
    parser.add_argument("--name", required=True, help="names the results: bench/results/quality-NAME.*")
    parser.add_argument("--config", type=Path, default=None, help="YAML config (prompts, model, sft, dpo sections)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--minutes", type=float, default=20.0, help="SFT wall-clock budget per variant")
    parser.add_argument("--epochs", type=float, default=None, help="SFT epochs (default: the config's)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--eval-users", type=int, default=None, help="evaluate a sample of users (default: all)")
    parser.add_argument("--splits", nargs="+", default=["validation", "test"], choices=["validation", "test"],
                        help="splits evaluated: validation alone while choosing, test for the final table")
    parser.add_argument("--reuse", action="store_true",
                        help="evaluate the models an earlier run of this --name trained instead of training again")
    parser.add_argument("--beam", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda: training and decoding (leadre.devices)")
    parser.add_argument("--work", type=Path, default=RESULTS / "work")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where quality-NAME.{json,md} go")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    report = run(args)
    args.results.mkdir(parents=True, exist_ok=True)
    suffix = _suffix(args)
    (args.results / f"quality-{args.name}{suffix}.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = table(report)
    (args.results / f"quality-{args.name}{suffix}.md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
