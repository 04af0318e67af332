"""The `leadre` command: one subcommand per pipeline step (DESIGN §7). Each is a thin layer over a library call."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

from leadre.artifacts import ArtifactError
from leadre.config import DEMO_CONFIG

log = logging.getLogger("leadre")


def _data_synth(args: argparse.Namespace) -> None:
    from leadre.schema import write_data_dir
    from leadre.synth import POSITIVE_ACTIONS, SynthConfig, generate, synth_parameters

    cfg = SynthConfig(users=args.users, seed=args.seed, ads=args.ads, contents=args.contents,
                      events_per_user=args.events_per_user)
    t0 = time.perf_counter()
    tables = write_data_dir(generate(cfg), args.out, "data synth", synth_parameters(cfg), POSITIVE_ACTIONS,
                            derived={})
    print(f"wrote {args.out}: {len(tables.users):,} users, {len(tables.ads):,} ads, {len(tables.contents):,} contents, "
          f"{len(tables.events):,} events in {time.perf_counter() - t0:.1f}s")


def _data_movielens(args: argparse.Namespace) -> None:
    from leadre.loaders import load_movielens
    from leadre.schema import write_data_dir

    t0 = time.perf_counter()
    tables, derived = load_movielens(args.path)
    tables = write_data_dir(tables, args.out, "data movielens", {"path": str(args.path)}, ["rating"], derived,
                            inputs={"movielens": args.path})
    print(f"wrote {args.out}: {len(tables.users):,} users, {len(tables.ads):,} movies as ads, "
          f"{len(tables.events):,} interactions in {time.perf_counter() - t0:.1f}s")


def _data_interactions(args: argparse.Namespace) -> None:
    from leadre.loaders import load_interactions
    from leadre.schema import write_data_dir

    options = {k: getattr(args, k) for k in ("user_col", "item_col", "time_col", "time_unit", "action_col",
                                              "item_id_col", "title_col", "category_col", "advertiser_col",
                                              "ecpm_col", "sep")}
    options["text_cols"] = tuple(args.text_cols)
    tables, derived = load_interactions(args.interactions, args.items, **options)
    positives = args.positive_actions or (["interaction"] if not args.action_col else sorted(tables.events["action"].unique()))
    tables = write_data_dir(tables, args.out, "data interactions", options | {"positive_actions": positives},
                            positives, derived, inputs={"interactions": args.interactions, "items": args.items})
    print(f"wrote {args.out}: {len(tables.users):,} users, {len(tables.ads):,} items as ads, {len(tables.events):,} events")


def _data_validate(args: argparse.Namespace) -> None:
    from leadre.schema import read_data_dir

    tables = read_data_dir(args.dir)
    print(f"{args.dir}: valid — " + ", ".join(f"{name} {len(df):,}" for name, df in tables.items()))


def _data_stats(args: argparse.Namespace) -> None:
    from leadre.schema import positive_actions_of, read_data_dir
    from leadre.stats import data_stats, format_stats

    stats = data_stats(read_data_dir(args.dir), positive_actions_of(args.dir))
    print(json.dumps(stats, indent=2, default=str) if args.json else format_stats(stats))


def _sids_build(args: argparse.Namespace) -> None:
    from leadre.config import read_config, section
    from leadre.semantic_ids import SidSettings, build_sids, summary

    settings = section(read_config(args.config), "sids", SidSettings, str(args.config), levels=args.levels,
                       codes=args.codes, seed=args.seed, iters=args.iters, behaviour_weight=args.behaviour_weight,
                       behaviour_dim=args.behaviour_dim, window=args.window)
    manifest = build_sids(args.data, args.out, **dataclasses.asdict(settings), cache_dir=args.cache,
                          batch_size=args.batch_size)
    print(f"wrote {args.out}: S-IDs {manifest['level_sizes']}; {summary(manifest['stats'])}")


def _sids_assign(args: argparse.Namespace) -> None:
    from leadre.semantic_ids import assign_sids, read_ads_file, summary

    manifest = assign_sids(args.sids, read_ads_file(args.ads), args.out, cache_dir=args.cache,
                           batch_size=args.batch_size, inputs={"ads": args.ads})
    counts = manifest["counts"]
    print(f"wrote {args.out}: {counts['new']:,} new ads, {counts['kept']:,} kept their S-IDs; "
          f"S-IDs {manifest['level_sizes']}; {summary(manifest['stats'])}")


def _prompts_build(args: argparse.Namespace) -> None:
    from leadre.config import read_config, section
    from leadre.prompts import PromptConfig, build_prompts

    cfg = section(read_config(args.config), "prompts", PromptConfig, str(args.config), reuse=args.reuse,
                  templates=args.templates, max_prompt_tokens=args.max_prompt_tokens, seed=args.seed)
    manifest = build_prompts(args.data, args.sids, args.out, cfg)
    stats = manifest["stats"]
    print(f"wrote {args.out}: " + ", ".join(f"{k} {v:,}" for k, v in manifest["counts"].items())
          + " | train tasks: " + ", ".join(f"{k} {v:,}" for k, v in stats["per_task"].items()))


def _gate(args: argparse.Namespace) -> int:
    from leadre.gate import Policy, format_decision, gate

    policy = Policy(metric=args.metric, split=args.split, variant=args.variant, min_gain=args.min_gain,
                    relative_gain=args.relative_gain, guard_metric=args.guard_metric,
                    max_guard_drop=args.max_guard_drop, max_invalid_rate=args.max_invalid_rate)
    decision = gate(args.candidate, args.current, policy)
    print(format_decision(decision))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(decision.as_dict(), indent=2) + "\n")
    return 0 if decision.promote else 1


def _train_sft(args: argparse.Namespace) -> None:
    from leadre.config import read_config, section
    from leadre.sft import TrainSettings, train_sft

    config = read_config(args.config)
    settings = section(config, "sft", TrainSettings, str(args.config), epochs=args.epochs, batch_size=args.batch_size,
                       threads=args.threads, seed=args.seed)
    model = config.get("model") or {}
    if not isinstance(model, dict):
        raise ValueError(f"{args.config}: section 'model' must be a mapping")
    metadata = train_sft(args.prompts, args.sids, args.out, args.preset, settings, model)
    training = metadata["training"]
    print(f"wrote {args.out}: {metadata['model']['parameters']:,} parameters, {training['steps']} steps in "
          f"{training['wall_seconds']:.0f}s ({training['tokens_per_second']:,.0f} tokens/s); validation "
          + ", ".join(f"{k} {v:.4f}" for k, v in metadata["metrics"].items() if k.startswith(("recall", "loss"))))


def _train_dpo(args: argparse.Namespace) -> None:
    from leadre.config import read_config, section
    from leadre.dpo import DPOSettings, train_dpo

    settings = section(read_config(args.config), "dpo", DPOSettings, str(args.config), beta=args.beta,
                       pairs_per_user=args.pairs_per_user, epochs=args.epochs, threads=args.threads, seed=args.seed)
    metadata = train_dpo(args.model, args.prompts, args.data, args.out, settings)
    m = metadata["metrics"]
    print(f"wrote {args.out}: {sum(metadata['pairs'].values()):,} pairs {metadata['pairs']}, held-out preference margin "
          f"{m['heldout_margin_before']:.3f} -> {m['heldout_margin_after']:.3f}")


def _evaluate(args: argparse.Namespace) -> None:
    from leadre.evaluate import BASELINES, evaluate
    from leadre.gate import metrics_table

    splits = ["validation", "test"] if args.split == "both" else [args.split]
    report = evaluate(args.model, args.data, args.sids, args.out, splits=splits, beam=args.beam, users=args.users,
                      baselines=BASELINES if not args.no_baselines else (), renormalize=args.renormalize)
    print(metrics_table(report["results"], report["model"]))
    print(f"wrote {args.out}: metrics.json, metrics.md, recall_at_k.png")


def _bundle(args: argparse.Namespace) -> None:
    from leadre.bundle import build_bundle

    manifest = build_bundle(args.model, args.sids, args.data, args.out, args.compiled)
    counts = manifest["counts"]
    print(f"wrote {args.out}: model {manifest['model_version']}, {counts['ads']:,} ads ({counts['active_ads']:,} active), "
          f"{counts['contents']:,} contents, compiled backend: {'yes' if manifest['compiled'] else 'no'}")


def _demo(args: argparse.Namespace) -> None:
    from leadre.demo import run_demo

    run_demo(Path(args.out), users=args.users, seed=args.seed, config=args.config)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leadre", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = commands.add_parser("data", help="build, check and describe canonical data directories")
    data_cmds = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")

    p = data_cmds.add_parser("synth", help="generate the synthetic ad marketplace (deterministic by seed)")
    p.add_argument("--users", type=int, default=2000, help="number of users (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same data")
    p.add_argument("--ads", type=int, default=None, help="number of ads (default users/10, clipped to 128..10000)")
    p.add_argument("--contents", type=int, default=None, help="number of contents (default: as many as ads)")
    p.add_argument("--events-per-user", type=float, default=40.0, help="mean events per user (default 40)")
    p.add_argument("--out", type=Path, required=True, help="output data directory")
    p.set_defaults(func=_data_synth)

    p = data_cmds.add_parser("movielens", help="load MovieLens-1M or -100K original files (movie = ad)")
    p.add_argument("--path", type=Path, required=True, help="folder with movies.dat/ratings.dat/users.dat or u.data/u.item/u.user")
    p.add_argument("--out", type=Path, required=True, help="output data directory")
    p.set_defaults(func=_data_movielens)

    p = data_cmds.add_parser("interactions", help="load any (user, item, timestamp) log plus an item table")
    p.add_argument("--interactions", type=Path, required=True, help="CSV/TSV/parquet log, optionally gzipped")
    p.add_argument("--items", type=Path, required=True, help="CSV/TSV/parquet item table, optionally gzipped")
    p.add_argument("--out", type=Path, required=True, help="output data directory")
    p.add_argument("--user-col", default="user_id", help="log column with the user id (default user_id)")
    p.add_argument("--item-col", default="item_id", help="log column with the item id (default item_id)")
    p.add_argument("--time-col", default="timestamp", help="log column with the time (default timestamp)")
    p.add_argument("--time-unit", default="auto", choices=["auto", "s", "ms", "us", "iso"],
                   help="Unix time unit, or iso for dates; auto: seconds if numeric, else dates")
    p.add_argument("--action-col", default=None, help="log column with the action (default: every row is 'interaction')")
    p.add_argument("--positive-actions", nargs="+", default=None, help="actions that count as positive (default: all)")
    p.add_argument("--item-id-col", default=None, help="item-table id column (default: --item-col)")
    p.add_argument("--title-col", default="title", help="item-table title column (default title)")
    p.add_argument("--text-cols", nargs="*", default=[], help="item-table columns appended to the description")
    p.add_argument("--category-col", default=None, help="item-table category column")
    p.add_argument("--advertiser-col", default=None, help="item-table advertiser/brand column")
    p.add_argument("--ecpm-col", default=None, help="item-table eCPM column (default: derived, see the manifest)")
    p.add_argument("--sep", default=None, help="field separator (default: from the file suffix)")
    p.set_defaults(func=_data_interactions)

    p = data_cmds.add_parser("validate", help="check a data directory against the contract")
    p.add_argument("dir", type=Path)
    p.set_defaults(func=_data_validate)

    p = data_cmds.add_parser("stats", help="counts, sequence lengths, sparsity, category mix")
    p.add_argument("dir", type=Path)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=_data_stats)

    sids = commands.add_parser("sids", help="semantic IDs for ads: build codebooks, assign S-IDs to new ads")
    sids_cmds = sids.add_subparsers(dest="sids_command", required=True, metavar="SUBCOMMAND")
    cache_help = "embedding cache folder (default $LEADRE_CACHE/embeddings or ~/.cache/leadre/embeddings)"

    p = sids_cmds.add_parser("build", help="embed ad text, residual k-means into L levels x K codes, plus a collision level")
    p.add_argument("--data", type=Path, required=True, help="input data directory")
    p.add_argument("--out", type=Path, required=True, help="output S-ID artifact directory")
    p.add_argument("--config", type=Path, default=None, help="YAML config; its `sids` section sets these options")
    p.add_argument("--levels", type=int, default=None, help="k-means levels before the collision level (default 3)")
    p.add_argument("--codes", type=int, default=None,
                   help="codes per level (default 256); small catalogues use min(K, ceil(sqrt(number of ads)))")
    p.add_argument("--seed", type=int, default=None, help="random seed; the same seed gives the same S-IDs")
    p.add_argument("--iters", type=int, default=None, help="k-means iterations per level at most (default 25)")
    p.add_argument("--behaviour-weight", type=float, default=None,
                   help="share in [0, 1) of the item co-occurrence embedding (training positives only) blended "
                        "into the text vectors before quantising (default 0.3; 0: text only)")
    p.add_argument("--behaviour-dim", type=int, default=None, help="dimensions of the co-occurrence embedding (default 64)")
    p.add_argument("--window", type=int, default=None, help="positives at most this far apart co-occur (default 5)")
    p.add_argument("--cache", type=Path, default=None, help=cache_help)
    p.add_argument("--batch-size", type=int, default=64, help="texts per encoder batch (default 64)")
    p.set_defaults(func=_sids_build)

    p = sids_cmds.add_parser("assign", help="S-IDs for new ads from frozen codebooks; writes old + new ads")
    p.add_argument("--sids", type=Path, required=True, help="S-ID artifact from `sids build` or `sids assign`")
    p.add_argument("--ads", type=Path, required=True,
                   help="ads file (.parquet, .csv, .tsv, optionally .gz) or data directory with ad_id, title, "
                        "description, category, advertiser")
    p.add_argument("--out", type=Path, required=True, help="output S-ID artifact directory")
    p.add_argument("--cache", type=Path, default=None, help=cache_help)
    p.add_argument("--batch-size", type=int, default=64, help="texts per encoder batch (default 64)")
    p.set_defaults(func=_sids_assign)

    prompts = commands.add_parser("prompts", help="intent-aware prompts with alignment tasks")
    prompts_cmds = prompts.add_subparsers(dest="prompts_command", required=True, metavar="SUBCOMMAND")
    p = prompts_cmds.add_parser("build", help="train/validation/test JSONL from a data directory and its S-IDs")
    p.add_argument("--data", type=Path, required=True, help="data directory")
    p.add_argument("--sids", type=Path, required=True, help="S-ID artifact")
    p.add_argument("--out", type=Path, required=True, help="output prompts directory")
    p.add_argument("--config", type=Path, default=None, help="YAML config; its `prompts` section sets PromptConfig")
    p.add_argument("--reuse", choices=["stream", "per_target", "last"], default=None,
                   help="positive-interaction reuse: stream windows (default), one example per positive, or none")
    p.add_argument("--templates", type=int, default=None, help="number of prompt templates used for training (1-3)")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="prompt token budget (pre-tokenizer pieces)")
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=_prompts_build)

    p = commands.add_parser(
        "gate", help="promote a candidate evaluation over the deployed one, or keep the current model",
        description="Compare the evaluated model of --candidate with that of --current (evaluation directories with "
                    "metrics.json). Promote only if the gate metric gains more than --min-gain, the guard metric falls "
                    "by at most --max-guard-drop and the invalid-ID rate stays within --max-invalid-rate; a missing or empty "
                    "--current (first deployment) needs only the invalid-ID check. "
                    "Exit status: 0 promote, 1 keep current, 2 error (missing or malformed files).")
    p.add_argument("--candidate", type=Path, required=True, help="evaluation directory of the candidate model")
    p.add_argument("--current", type=Path, required=True, help="evaluation directory of the deployed model")
    p.add_argument("--metric", default="recall@10", help="gate metric (default recall@10)")
    p.add_argument("--split", choices=["validation", "test"], default="validation",
                   help="split whose metrics the gate compares (default validation)")
    p.add_argument("--variant", choices=["seen_kept", "seen_excluded"], default="seen_kept",
                   help="ranking with or without the user's already-seen ads (default seen_kept)")
    p.add_argument("--min-gain", type=float, default=0.0,
                   help="the candidate must beat the current gate metric by more than this (default 0)")
    p.add_argument("--relative-gain", action="store_true",
                   help="--min-gain is a fraction of the current value (0.02 = 2%%), not an absolute difference")
    p.add_argument("--guard-metric", default="ecpm@10",
                   help="metric that may not fall by more than --max-guard-drop (default ecpm@10)")
    p.add_argument("--max-guard-drop", type=float, default=0.05,
                   help="largest allowed fall of the guard metric as a fraction of the current value (default 0.05)")
    p.add_argument("--max-invalid-rate", type=float, default=0.01,
                   help="largest allowed invalid-ID rate of the candidate (default 0.01)")
    p.add_argument("--out", type=Path, default=None, help="also write the decision as JSON to this file")
    p.set_defaults(func=_gate)

    train = commands.add_parser("train", help="SFT with alignment tasks, then DPO toward eCPM")
    train_cmds = train.add_subparsers(dest="train_command", required=True, metavar="SUBCOMMAND")
    p = train_cmds.add_parser("sft", help="supervised fine-tuning; keeps the checkpoint with the best validation Recall@10")
    p.add_argument("--prompts", type=Path, required=True, help="prompts artifact")
    p.add_argument("--sids", type=Path, required=True, help="S-ID artifact the prompts were built with")
    p.add_argument("--out", type=Path, required=True, help="output model directory (checkpoints go to OUT.work)")
    p.add_argument("--preset", default="tiny", help="tiny | small (built from a config, trained from scratch) | PATH "
                                                   "to a local Hugging Face causal LM (LoRA)")
    p.add_argument("--config", type=Path, default=None, help="YAML config: `model` (preset overrides) and `sft` sections")
    p.add_argument("--epochs", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 2)")
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=_train_sft)

    p = train_cmds.add_parser("dpo", help="DPO on the SFT model: engaged higher-eCPM ads over lower, engaged over generated")
    p.add_argument("--model", type=Path, required=True, help="SFT model directory")
    p.add_argument("--prompts", type=Path, required=True, help="prompts artifact the SFT model was trained on")
    p.add_argument("--data", type=Path, required=True, help="data directory the prompts were built from")
    p.add_argument("--out", type=Path, required=True, help="output model directory")
    p.add_argument("--config", type=Path, default=None, help="YAML config; its `dpo` section sets DPOSettings")
    p.add_argument("--beta", type=float, default=None, help="DPO temperature (default 0.1)")
    p.add_argument("--pairs-per-user", type=int, default=None, help="cap on preference pairs per user (default 4)")
    p.add_argument("--epochs", type=float, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=_train_dpo)

    p = commands.add_parser("evaluate", help="Recall/NDCG/eCPM@K, invalid IDs, coverage for models and baselines")
    p.add_argument("--model", type=Path, nargs="*", default=[], help="model directories (SFT, DPO, ...); the first "
                                                                  "is the one `leadre gate` compares")
    p.add_argument("--data", type=Path, required=True, help="data directory")
    p.add_argument("--sids", type=Path, required=True, help="S-ID artifact")
    p.add_argument("--out", type=Path, required=True, help="output evaluation directory")
    p.add_argument("--split", choices=["validation", "test", "both"], default="validation")
    p.add_argument("--beam", type=int, default=50, help="beam width (at least the largest K, 50)")
    p.add_argument("--users", type=int, default=None, help="evaluate a random sample of this many users")
    p.add_argument("--no-baselines", action="store_true", help="skip popularity and co-occurrence")
    p.add_argument("--renormalize", action="store_true",
                   help="score each S-ID code by its softmax over the codes the trie allows (default: full softmax)")
    p.set_defaults(func=_evaluate)

    p = commands.add_parser("bundle", help="the deployable unit: model, S-IDs, prompt settings, catalogue snapshot",
                            description="Copy the promoted model, its S-ID artifact, the ad and content catalogue "
                                        "and optionally a compiled backend into one self-describing directory that "
                                        "serving loads. Files are named by SHA-256 in the manifest, never by path.")
    p.add_argument("--model", type=Path, required=True, help="model directory (`train sft` or `train dpo`)")
    p.add_argument("--sids", type=Path, required=True, help="S-ID artifact the model was trained with (or a later "
                                                              "`sids assign` of it)")
    p.add_argument("--data", type=Path, required=True, help="data directory: the ad catalogue snapshot and status")
    p.add_argument("--compiled", type=Path, default=None, help="compiled backend from `leadre compile` (optional)")
    p.add_argument("--out", type=Path, required=True, help="output bundle directory")
    p.set_defaults(func=_bundle)

    p = commands.add_parser("demo", help="the README's main job: every step end to end on the synthetic marketplace")
    p.add_argument("--out", default="demo-run", help="working directory for all artifacts (default demo-run)")
    p.add_argument("--users", type=int, default=2000, help="synthetic users (default 2000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", type=Path, default=DEMO_CONFIG, help=f"YAML config (default {DEMO_CONFIG.name})")
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        status = args.func(args)  # a handler may return an exit status (gate: 1 = keep current)
    except (ValueError, FileNotFoundError, ArtifactError) as e:  # DataError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
