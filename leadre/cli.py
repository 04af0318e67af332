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
                            derived={}, min_positives=args.min_positives)
    print(f"wrote {args.out}: {len(tables.users):,} users, {len(tables.ads):,} ads, {len(tables.contents):,} contents, "
          f"{len(tables.events):,} events in {time.perf_counter() - t0:.1f}s")


def _data_movielens(args: argparse.Namespace) -> None:
    from leadre.loaders import MOVIELENS_POSITIVE_ACTIONS, load_movielens
    from leadre.schema import write_data_dir

    t0 = time.perf_counter()
    tables, derived = load_movielens(args.path, args.min_positives, args.last)
    tables = write_data_dir(tables, args.out, "data movielens", {"path": str(args.path), "last": args.last},
                            MOVIELENS_POSITIVE_ACTIONS, derived, inputs={"movielens": args.path},
                            min_positives=args.min_positives)
    print(f"wrote {args.out}: {len(tables.users):,} users, {len(tables.ads):,} movies as ads, "
          f"{len(tables.events):,} interactions in {time.perf_counter() - t0:.1f}s")


def _data_interactions(args: argparse.Namespace) -> None:
    from leadre.loaders import interaction_split, load_interactions
    from leadre.schema import write_data_dir

    options = {k: getattr(args, k) for k in ("user_col", "item_col", "time_col", "time_unit", "action_col",
                                              "item_id_col", "title_col", "category_col", "advertiser_col",
                                              "ecpm_col", "sep")}
    options["text_cols"] = tuple(args.text_cols)
    tables, derived = load_interactions(args.interactions, args.items, **options,
                                        positive_actions=args.positive_actions, min_positives=args.min_positives)
    positives = list(interaction_split(tables.events, args.positive_actions, args.min_positives).positive_actions)
    tables = write_data_dir(tables, args.out, "data interactions", options | {"positive_actions": positives},
                            positives, derived, inputs={"interactions": args.interactions, "items": args.items},
                            min_positives=args.min_positives)
    print(f"wrote {args.out}: {len(tables.users):,} users, {len(tables.ads):,} items as ads, {len(tables.events):,} events")


def _data_validate(args: argparse.Namespace) -> None:
    from leadre.schema import read_data_dir

    tables = read_data_dir(args.dir)
    print(f"{args.dir}: valid — " + ", ".join(f"{name} {len(df):,}" for name, df in tables.items()))


def _data_stats(args: argparse.Namespace) -> None:
    from leadre.schema import read_data_dir, split_settings_of
    from leadre.stats import data_stats, format_stats

    stats = data_stats(read_data_dir(args.dir), split_settings_of(args.dir))
    print(json.dumps(stats, indent=2, default=str) if args.json else format_stats(stats))


def _sids_build(args: argparse.Namespace) -> None:
    from leadre.config import read_config, section
    from leadre.semantic_ids import SidSettings, build_sids, summary

    settings = section(read_config(args.config), "sids", SidSettings, str(args.config), levels=args.levels,
                       codes=args.codes, seed=args.seed, iters=args.iters, behaviour_weight=args.behaviour_weight,
                       behaviour_dim=args.behaviour_dim, window=args.window, quantizer=args.quantizer)
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
                    relative_gain=args.relative_gain, confidence=args.confidence, resamples=args.resamples,
                    guard_metric=args.guard_metric, max_guard_drop=args.max_guard_drop,
                    max_invalid_rate=args.max_invalid_rate, allow_new_sids=args.allow_new_sids)
    if args.current is None and not args.first_deploy:
        raise ValueError("gate: give --current (the deployed model's evaluation), or --first-deploy if nothing "
                         "is deployed")
    decision = gate(args.candidate, args.current, policy, first_deploy=args.first_deploy)
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
                       threads=args.threads, seed=args.seed, device=args.device)
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
                       pairs_per_user=args.pairs_per_user, epochs=args.epochs, threads=args.threads, seed=args.seed,
                       device=args.device)
    metadata = train_dpo(args.model, args.prompts, args.data, args.out, settings)
    m = metadata["metrics"]
    print(f"wrote {args.out}: {sum(metadata['pairs'].values()):,} pairs {metadata['pairs']}, held-out preference margin "
          f"{m['heldout_margin_before']:.3f} -> {m['heldout_margin_after']:.3f}")


def _evaluate(args: argparse.Namespace) -> None:
    from leadre.evaluate import BASELINES, evaluate
    from leadre.gate import metrics_table

    splits = ["validation", "test"] if args.split == "both" else [args.split]
    report = evaluate(args.model, args.data, args.sids, args.out, splits=splits, beam=args.beam, users=args.users,
                      baselines=BASELINES if not args.no_baselines else (), renormalize=args.renormalize,
                      device=args.device)
    print(metrics_table(report["results"], report["model"], report["intervals"]))
    print(f"wrote {args.out}: metrics.json, per_user.parquet, metrics.md, recall_at_k.png")


def _compile(args: argparse.Namespace) -> None:
    from leadre.export import compile_model

    manifest = compile_model(args.model, args.out, backend=args.backend, device=args.device, int8=args.int8,
                             sids_dir=args.sids, users=args.users, prompts_dir=args.prompts)
    onnx = manifest["parity"]["backends"]["onnx"]
    print(f"wrote {args.out}: {', '.join(manifest['files'])}; ONNX vs PyTorch: max |Δlogit| "
          f"{onnx['max_abs_logit_diff']:.2e}, same top-{manifest['parity']['top_n']} for {onnx['same_top_n_users']}/"
          f"{onnx['users']} users; auto backend on {manifest['device']}: {manifest['backend']} ({manifest['backend_reason']})")
    if "int8_cost" in manifest:
        cost = manifest["int8_cost"]
        print(f"int8 on {cost['users']} validation users: Recall@10 {cost['float32']['recall@10']:.4f} -> "
              f"{cost['int8']['recall@10']:.4f}")


def _bundle(args: argparse.Namespace) -> None:
    from leadre.bundle import build_bundle

    manifest = build_bundle(args.model, args.sids, args.data, args.out, args.compiled, args.segment_fields)
    counts = manifest["counts"]
    print(f"wrote {args.out}: model {manifest['model_version']}, {counts['ads']:,} ads ({counts['active_ads']:,} active), "
          f"{counts['contents']:,} contents, fallback by {manifest['segment_fields']}, "
          f"compiled backend: {'yes' if manifest['compiled'] else 'no'}")


def _serve(args: argparse.Namespace) -> None:
    import os

    from leadre.config import read_config, section
    from leadre.serving import ServingSettings

    bundle = args.bundle or os.environ.get("LEADRE_BUNDLE")
    repo = args.feature_repo or os.environ.get("LEADRE_FEATURE_REPO")
    if not bundle or not repo:
        raise ValueError("serve needs --bundle and --feature-repo (or LEADRE_BUNDLE and LEADRE_FEATURE_REPO)")
    settings = section(read_config(args.config), "serving", ServingSettings, str(args.config))
    from leadre.predictors import NearlineModel, RecallModel, serve

    common = dict(production=args.production, settings=settings, data_dir=args.data, log_dir=args.log_dir,
                  backend=args.backend)
    if args.service == "recall":
        model = RecallModel(bundle, repo, nearline_url=args.nearline_url, device=args.device or "cpu", **common)
    else:
        model = NearlineModel(bundle, repo, device=args.device or "auto", **common)
    if args.drift_reports is not None:
        from leadre.monitor import watch_drift

        watch_drift(args.drift_reports)
    serve(model, args.port)


def _features(args: argparse.Namespace) -> None:
    from leadre import features

    counts = getattr(features, args.features_command)(args.repo, args.data, production=args.production)
    done = "registered" if args.features_command == "apply" else "materialized into the online store"
    print(f"{args.repo}: {done}; offline sources " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))


def _nearline(args: argparse.Namespace) -> None:
    from leadre.pipeline import nearline

    config = args.config.read_text() if args.config else ""
    nearline(str(args.bundle), str(args.data), str(args.feature_repo or ""), args.production, config, args.device,
             str(args.out), str(args.out / "report.md"))


def _monitor_report(args: argparse.Namespace) -> int:
    from leadre.config import read_config, section
    from leadre.monitor import EXIT_DRIFT, DriftSettings, drift_report, format_summary, since_last

    settings = section(read_config(args.config), "monitor", DriftSettings, str(args.config), threshold=args.threshold,
                       min_users=args.min_users)
    if args.last is not None and (args.since is not None or args.until is not None):
        raise ValueError("--last is a window that ends now: give it alone, or --since/--until")
    since = since_last(args.last) if args.last is not None else args.since
    summary = drift_report(args.reference, args.logs, args.out, settings, since=since, until=args.until,
                           model=args.model)
    print(format_summary(summary))
    print(f"wrote {args.out}: report.html, summary.json" + (", retrain_signal.json" if summary["drift_detected"] else ""))
    return EXIT_DRIFT if summary["drift_detected"] else 0


def _pipeline_shape(args: argparse.Namespace):
    from pipelines.daily import Shape

    env = dict(item.split("=", 1) for item in args.env)
    return Shape(dpo=args.dpo, gpu=args.gpu, accelerator=args.accelerator, image=args.image, gpu_image=args.gpu_image,
                 deploy_pvc=args.deploy_pvc, deploy_mount=args.deploy_mount, env=env)


def _pipeline_arguments(args: argparse.Namespace) -> dict:
    """The pipeline's run-time parameters from the command line; the config file travels as its text."""
    arguments = {"source": args.data, "path": str(args.path or ""), "users": args.users, "seed": args.seed,
                 "preset": args.preset, "config": args.config.read_text() if args.config else "",
                 "sid_levels": args.levels, "sid_codes": args.codes, "device": args.device,
                 "feature_repo": str(args.feature_repo or ""), "feast_production": args.feast_production,
                 "compile_backend": args.compile_backend}
    if args.data != "synth" and not args.path:
        raise ValueError(f"--data {args.data} needs --path")
    return arguments


def _pipeline_compile(args: argparse.Namespace) -> None:
    from leadre.pipeline import compile_pipeline
    from pipelines import build_pipeline

    print(f"wrote {compile_pipeline(build_pipeline(_pipeline_shape(args)), args.out)}")


def _pipeline_run(args: argparse.Namespace) -> int:
    from leadre.pipeline import PipelineFailed, run_local
    from pipelines import build_pipeline

    out = Path(args.out)
    arguments = _pipeline_arguments(args) | {"deploy_root": str((args.deploy_root or out / "deploy").resolve())}
    try:
        run = run_local(build_pipeline(_pipeline_shape(args)), arguments, out, verbose=args.verbose, cache=args.cache)
    except PipelineFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    verdict = f"deployed to {arguments['deploy_root']}/current" if run.promoted else "the gate kept the deployed model"
    print(f"pipeline finished in {run.seconds:.0f} s: {verdict}; artifacts under {run.run_dir}")
    return 0


def _kfp_client(args: argparse.Namespace):
    import kfp

    return kfp.Client(host=args.host, namespace=args.kfp_namespace)


def _cluster_package(args: argparse.Namespace, directory: str) -> Path:
    """The compiled pipeline to send: --package as given, or this one compiled now."""
    from leadre.pipeline import compile_pipeline
    from pipelines import build_pipeline

    return args.package or compile_pipeline(build_pipeline(_pipeline_shape(args)), Path(directory) / "leadre-daily.yaml")


def _cluster_arguments(args: argparse.Namespace) -> dict:
    deploy_root = args.deploy_root or (args.deploy_mount if args.deploy_pvc else None)
    if not deploy_root:
        raise ValueError("a cluster run needs --deploy-pvc CLAIM (or --deploy-root PATH on a volume every pod mounts): "
                         "the gate compares each candidate with the model deployed there")
    return _pipeline_arguments(args) | {"inference_services": args.inference_services, "namespace": args.namespace,
                                        "deploy_root": str(deploy_root)}


def _pipeline_submit(args: argparse.Namespace) -> None:
    import tempfile

    from leadre.pipeline import submit

    arguments = _cluster_arguments(args)
    with tempfile.TemporaryDirectory() as tmp:
        result = submit(_kfp_client(args), _cluster_package(args, tmp), arguments, args.run_name, args.experiment)
    print(f"submitted run {result.run_id} to {args.host} (experiment {args.experiment})")


def _pipeline_schedule(args: argparse.Namespace) -> None:
    import tempfile

    from leadre.pipeline import schedule

    arguments = _cluster_arguments(args)
    with tempfile.TemporaryDirectory() as tmp:
        job = schedule(_kfp_client(args), _cluster_package(args, tmp), arguments, args.cron, args.job_name,
                       args.experiment)
    print(f"scheduled recurring run {job.recurring_run_id} ({args.cron}) on {args.host}")


def _demo(args: argparse.Namespace) -> None:
    from leadre.demo import run_demo

    run_demo(Path(args.out), users=args.users, seed=args.seed, config=args.config, verbose=args.verbose)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leadre", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = commands.add_parser("data", help="build, check and describe canonical data directories")
    data_cmds = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    # the split is chosen here, once; every later step reads it from the data manifest
    min_positives = {"type": int, "default": 3, "help": "users with fewer positive ad interactions are training-only "
                     "(leave-one-out split: last positive = test, second-to-last = validation; default 3)"}

    p = data_cmds.add_parser("synth", help="generate the synthetic ad marketplace (deterministic by seed)")
    p.add_argument("--users", type=int, default=2000, help="number of users (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same data")
    p.add_argument("--ads", type=int, default=None, help="number of ads (default users/10, clipped to 128..10000)")
    p.add_argument("--contents", type=int, default=None, help="number of contents (default: as many as ads)")
    p.add_argument("--events-per-user", type=float, default=40.0, help="mean events per user (default 40)")
    p.add_argument("--out", type=Path, required=True, help="output data directory")
    p.add_argument("--min-positives", **min_positives)
    p.set_defaults(func=_data_synth)

    p = data_cmds.add_parser("movielens", help="load MovieLens-1M or -100K original files (movie = ad)")
    p.add_argument("--path", type=Path, required=True, help="folder with movies.dat/ratings.dat/users.dat or u.data/u.item/u.user")
    p.add_argument("--out", type=Path, required=True, help="output data directory")
    p.add_argument("--min-positives", **min_positives)
    p.add_argument("--last", type=int, default=None,
                   help="keep each user's N latest ratings: a sparse cut (default: all)")
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
    p.add_argument("--min-positives", **min_positives)
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
    p.add_argument("--quantizer", choices=("residual", "tree"), default=None,
                   help="residual: one codebook per level (default); tree: each code split by its own k-means")
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
        description="Compare the evaluated model of --candidate with that of --current (evaluation directories of "
                    "`leadre evaluate`). Both must have been evaluated alike (same data, S-IDs, split, beam and "
                    "users), else the gate refuses. Promote only if the lower bound of the --confidence interval of "
                    "the gain (paired bootstrap over the same users) exceeds --min-gain, the guard metric falls by at "
                    "most --max-guard-drop and the invalid-ID rate stays within --max-invalid-rate. With nothing "
                    "deployed yet, pass --first-deploy instead of --current: only the invalid-ID check applies. "
                    "Exit status: 0 promote, 1 keep current, 2 error (missing, malformed or mismatched evaluations).")
    p.add_argument("--candidate", type=Path, required=True, help="evaluation directory of the candidate model")
    p.add_argument("--current", type=Path, default=None, help="evaluation directory of the deployed model, evaluated "
                                                              "on the same data and users as the candidate")
    p.add_argument("--first-deploy", action="store_true",
                   help="nothing is deployed yet: promote on the invalid-ID check alone; --current, if given, must "
                        "then be missing or empty")
    p.add_argument("--metric", default="recall@10", help="gate metric: recall@K, ndcg@K or ecpm@K (default recall@10)")
    p.add_argument("--split", choices=["validation", "test"], default="validation",
                   help="split whose metrics the gate compares (default validation)")
    p.add_argument("--variant", choices=["seen_excluded", "seen_kept"], default="seen_excluded",
                   help="ranking without (the headline protocol) or with the user's already-seen ads "
                        "(default seen_excluded)")
    p.add_argument("--min-gain", type=float, default=0.0,
                   help="the lower confidence bound of the gain must exceed this (default 0)")
    p.add_argument("--relative-gain", action="store_true",
                   help="the gain is a fraction of the current value (0.02 = 2%%), not an absolute difference")
    p.add_argument("--confidence", type=float, default=0.95,
                   help="confidence of the paired bootstrap interval of the gain (default 0.95)")
    p.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples (default 2000)")
    p.add_argument("--allow-new-sids", action="store_true",
                   help="the candidate brings its own S-IDs: accept evaluations with different S-ID artifacts")
    p.add_argument("--guard-metric", default="ecpm@10",
                   help="metric that may not fall by more than --max-guard-drop (default ecpm@10)")
    p.add_argument("--max-guard-drop", type=float, default=0.05,
                   help="largest allowed fall of the guard metric as a fraction of the current value (default 0.05)")
    p.add_argument("--max-invalid-rate", type=float, default=0.01,
                   help="largest allowed invalid-ID rate of the candidate (default 0.01)")
    p.add_argument("--out", type=Path, default=None, help="also write the decision as JSON to this file")
    p.set_defaults(func=_gate)

    device_help = "auto (CUDA when present, bf16 there; else the CPU, float32) | cpu | cuda | cuda:N"
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
    p.add_argument("--device", default=None, help=device_help + " (default: the config's `device`, else auto)")
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
    p.add_argument("--device", default=None, help=device_help + " (default: the config's `device`, else auto)")
    p.set_defaults(func=_train_dpo)

    p = commands.add_parser("evaluate", help="Recall/NDCG/eCPM@K, invalid IDs, coverage for models and baselines")
    p.add_argument("--model", type=Path, nargs="*", default=[], help="model directories (SFT, DPO, ...); the first "
                                                                  "is the one `leadre gate` compares")
    p.add_argument("--data", type=Path, required=True, help="data directory")
    p.add_argument("--sids", type=Path, required=True, help="S-ID artifact")
    p.add_argument("--out", type=Path, required=True, help="output evaluation directory")
    p.add_argument("--split", choices=["validation", "test", "both"], default="validation")
    p.add_argument("--beam", type=int, default=50, help="beam width (at least the largest K, 50)")
    p.add_argument("--users", type=int, default=None,
                   help="evaluate a random sample of this many users (default: all evaluated users)")
    p.add_argument("--no-baselines", action="store_true", help="skip popularity and co-occurrence")
    p.add_argument("--renormalize", action="store_true",
                   help="score each S-ID code by its softmax over the codes the trie allows (default: full softmax)")
    p.add_argument("--device", default="auto", help=device_help + " (default auto)")
    p.set_defaults(func=_evaluate)

    p = commands.add_parser(
        "compile", help="export the decoder to ONNX (and TensorRT on a GPU), check parity, pick the backend",
        description="Export the trained decoder as ONNX prefill and step graphs with a KV cache, check them against "
                    "PyTorch on random users (max logit difference, same top-N ads), optionally add int8 weights "
                    "for the CPU and FP16 TensorRT engines for a GPU, time every backend that runs here and record "
                    "which one `auto` uses. Exit status 2 with a message where TensorRT or CUDA is unavailable.")
    p.add_argument("--model", type=Path, required=True, help="model directory (`train sft` or `train dpo`)")
    p.add_argument("--out", type=Path, required=True, help="output compiled artifact directory")
    p.add_argument("--backend", choices=["auto", "onnx", "tensorrt"], default="auto",
                   help="what to build: onnx (always built), tensorrt (needs `tensorrt` and a GPU), or auto: "
                        "TensorRT too where it can be built (default)")
    p.add_argument("--device", default="auto", help=device_help + " (default auto)")
    p.add_argument("--int8", action="store_true", help="also write int8 (dynamic quantisation) graphs for the CPU")
    p.add_argument("--sids", type=Path, default=None,
                   help="S-ID artifact of the model: the parity check searches its trie (default: random S-IDs)")
    p.add_argument("--users", type=int, default=32, help="random users of the parity check and timings (default 32)")
    p.add_argument("--prompts", type=Path, default=None,
                   help="prompts artifact: with --int8 and --sids, measure int8's Recall@10 cost on its validation split")
    p.set_defaults(func=_compile)

    p = commands.add_parser("bundle", help="the deployable unit: model, S-IDs, prompt settings, catalogue snapshot",
                            description="Copy the promoted model, its S-ID artifact, the ad and content catalogue, "
                                        "the fallback ranking and optionally a compiled backend into one self-describing directory that "
                                        "serving loads. Files are named by SHA-256 in the manifest, never by path.")
    p.add_argument("--model", type=Path, required=True, help="model directory (`train sft` or `train dpo`)")
    p.add_argument("--sids", type=Path, required=True, help="S-ID artifact the model was trained with (or a later "
                                                              "`sids assign` of it)")
    p.add_argument("--data", type=Path, required=True, help="data directory: the ad catalogue snapshot and status")
    p.add_argument("--compiled", type=Path, default=None, help="compiled backend from `leadre compile` (optional)")
    p.add_argument("--segment-fields", nargs="+", default=(), metavar="FIELD",
                   help="profile fields whose values make a segment of the recall service's fallback ranking "
                        "(segment popularity; default: the first profile field)")
    p.add_argument("--out", type=Path, required=True, help="output bundle directory")
    p.set_defaults(func=_bundle)

    p = commands.add_parser("serve", help="run the recall or near-line KServe predictor over a bundle and Feast",
                            description="Start a KServe model server (V1 and V2 REST on --port) for the latency-"
                                        "sensitive recall service or the near-line LLM service (DESIGN section 5).")
    p.add_argument("service", choices=["recall", "nearline"])
    p.add_argument("--bundle", default=None, help="recall bundle directory (default: env LEADRE_BUNDLE)")
    p.add_argument("--feature-repo", default=None, help="applied Feast repository (default: env LEADRE_FEATURE_REPO)")
    p.add_argument("--production", action="store_true", help="use the Redis online store (feature_store.production.yaml)")
    p.add_argument("--port", type=int, default=8080, help="HTTP port (default 8080, KServe's container port)")
    p.add_argument("--log-dir", type=Path, default=None, help="write the JSONL request log here (drift monitoring)")
    p.add_argument("--nearline-url", default=None, help="recall only: near-line service base URL that missing and "
                                                        "stale users are sent to for a refresh")
    p.add_argument("--data", type=Path, default=None, help="recall only: training data directory, to recount the "
                                                          "segment-popularity fallback for `segment_fields` other "
                                                          "than the bundle's (default: the bundle's own)")
    p.add_argument("--config", type=Path, default=None, help="YAML config with a `serving` section")
    p.add_argument("--device", default=None, help=device_help + " (default: auto for nearline; cpu for recall, which "
                                                                 "never runs the model)")
    p.add_argument("--backend", default="auto", help="nearline decoder backend: auto (default) or one of "
                                                     "leadre.backends.BACKENDS (torch, onnx, tensorrt, ...)")
    p.add_argument("--drift-reports", type=Path, default=None, help="`leadre monitor report` output (or a folder of "
                                                                     "them): the latest drift share goes to /metrics")
    p.set_defaults(func=_serve)

    features = commands.add_parser("features", help="the Feast feature store: register definitions, fill the online store")
    features_cmds = features.add_subparsers(dest="features_command", required=True, metavar="SUBCOMMAND")
    for name, help_text in (("apply", "write the offline sources from a data directory, register the definitions"),
                            ("materialize", "refresh the offline sources, copy their latest values to the online store")):
        p = features_cmds.add_parser(name, help=help_text)
        p.add_argument("--repo", type=Path, required=True, help="Feast repository: feature_repo/ or a copy of it")
        p.add_argument("--data", type=Path, required=True, help="data directory the offline sources are written from")
        p.add_argument("--production", action="store_true",
                       help="feature_store.production.yaml: Redis at $REDIS_CONNECTION_STRING, registry at "
                            "$FEAST_REGISTRY_PATH")
        p.set_defaults(func=_features)

    # the pipeline's nearline step as a command: the near-line refresh CronJob (manifests/) runs it on a schedule
    p = commands.add_parser("nearline", help="batch recall: every user's recall list from a bundle, pushed to Feast")
    p.add_argument("--bundle", type=Path, required=True, help="recall bundle directory")
    p.add_argument("--data", type=Path, required=True, help="data directory: the users and their latest events")
    p.add_argument("--feature-repo", type=Path, default=None, help="writable Feast repository to register, "
                                                                  "materialise and push the lists to (default: none)")
    p.add_argument("--production", action="store_true", help="use the repository's production (Redis) config")
    p.add_argument("--config", type=Path, default=None, help="YAML config; its `nearline` section sets NearlineSettings")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where the model runs")
    p.add_argument("--out", type=Path, required=True, help="output artifact: recall_lists.parquet and report.md")
    p.set_defaults(func=_nearline)

    monitor = commands.add_parser("monitor", help="drift of the served population against the training reference")
    monitor_cmds = monitor.add_subparsers(dest="monitor_command", required=True, metavar="SUBCOMMAND")
    p = monitor_cmds.add_parser(
        "report", help="Evidently drift report of a request-log window; exit 3 and a retrain signal on drift",
        description="Compare a window of the serving request log (--logs, written by `leadre serve --log-dir`) with "
                    "the training data (--reference: the data directory the deployed model was trained on): profile "
                    "fields, history lengths and the recalled-category mix. Writes report.html and summary.json, "
                    "and retrain_signal.json when the share of drifted columns exceeds the threshold. "
                    "Exit status: 0 no drift, 3 drift (retrain), 2 error (bad input, too few users in the window).")
    p.add_argument("--reference", type=Path, required=True, help="data directory the deployed model was trained on")
    p.add_argument("--logs", type=Path, required=True, help="request-log directory")
    p.add_argument("--out", type=Path, required=True, help="output report directory")
    p.add_argument("--threshold", type=float, default=None,
                   help="retrain when the share of drifted columns exceeds this (default 0.3)")
    p.add_argument("--since", default=None, help="window start, ISO time (inclusive; naive means UTC)")
    p.add_argument("--until", default=None, help="window end, ISO time (exclusive)")
    p.add_argument("--last", default=None, help="window of this length ending now, e.g. 24h or 7d (for schedules)")
    p.add_argument("--model", default=None, help="only answers of this predictor (recall or nearline; default both)")
    p.add_argument("--min-users", type=int, default=None, help="fewer distinct users in the window is an error "
                                                              "(default 200)")
    p.add_argument("--config", type=Path, default=None, help="YAML config; its `monitor` section sets DriftSettings")
    p.set_defaults(func=_monitor_report)

    pipeline = commands.add_parser("pipeline", help="the daily KFP pipeline: compile, run locally, submit, schedule")
    pipeline_cmds = pipeline.add_subparsers(dest="pipeline_command", required=True, metavar="SUBCOMMAND")

    def shape_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--dpo", action=argparse.BooleanOptionalAction, default=True,
                       help="include the DPO step (default: yes); DPO ships only if the gate says it beats SFT")
        p.add_argument("--gpu", action="store_true", help="sft, dpo, compile and nearline request a GPU and run in "
                                                          "--gpu-image")
        p.add_argument("--accelerator", default="nvidia.com/gpu", help="accelerator resource (default nvidia.com/gpu)")
        p.add_argument("--image", default="leadre:cpu", help="image of the components (default leadre:cpu)")
        p.add_argument("--gpu-image", default="leadre:gpu", help="image of the GPU steps (default leadre:gpu)")
        p.add_argument("--deploy-pvc", default="", help="PVC that holds the deploy root: mounted into evaluate and "
                                                        "deploy, and the InferenceServices' storage (pvc://CLAIM/...)")
        p.add_argument("--deploy-mount", default="/mnt/leadre", help="where --deploy-pvc is mounted (default /mnt/leadre)")
        p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                       help="environment of the nearline step, e.g. REDIS_CONNECTION_STRING=redis:6379 (repeatable)")

    def run_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data", choices=["synth", "movielens", "dir"], default="synth",
                       help="dataset: the synthetic marketplace, MovieLens files at --path, or a data directory at --path")
        p.add_argument("--path", type=Path, default=None, help="input of --data movielens|dir")
        p.add_argument("--users", type=int, default=2000, help="synthetic users (default 2000)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--preset", default="tiny", help="model preset: tiny | small | PATH to a local causal LM")
        p.add_argument("--config", type=Path, default=DEMO_CONFIG,
                       help=f"YAML config with prompts/model/sft/dpo/evaluate/gate/nearline sections "
                            f"(default {DEMO_CONFIG.name})")
        p.add_argument("--levels", type=int, default=0, help="S-ID levels (default: the config's)")
        p.add_argument("--codes", type=int, default=0, help="S-ID codes per level (default: the config's)")
        p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where the models run")
        p.add_argument("--feature-repo", type=Path, default=None,
                       help="Feast repository the nearline step materialises and pushes recall lists to (default: none)")
        p.add_argument("--feast-production", action="store_true", help="use the repository's production (Redis) config")
        p.add_argument("--compile-backend", choices=["auto", "onnx", "tensorrt"], default="auto")
        shape_options(p)

    p = pipeline_cmds.add_parser("compile", help="compile the pipeline to KFP IR YAML")
    p.add_argument("--out", type=Path, required=True, help="output YAML file")
    shape_options(p)
    p.set_defaults(func=_pipeline_compile)

    p = pipeline_cmds.add_parser("run", help="run the pipeline here with kfp.local (one line per step; -v: everything)")
    p.add_argument("--local", action="store_true", required=True, help="run with kfp.local's subprocess runner")
    p.add_argument("--out", type=Path, default=Path("pipeline-run"),
                   help="folder of the run: kfp/ (artifacts), deploy/, pipeline.log (default pipeline-run)")
    p.add_argument("--deploy-root", type=Path, default=None, help="where deploy switches current/ (default OUT/deploy)")
    p.add_argument("--cache", action="store_true", help="reuse the outputs of earlier runs under OUT for tasks with the "
                                                        "same inputs (evaluate, nearline and deploy always run)")
    run_options(p)
    p.set_defaults(func=_pipeline_run)

    for name, func, text in (("submit", _pipeline_submit, "one run on a Kubeflow Pipelines server"),
                             ("schedule", _pipeline_schedule, "a recurring run (e.g. daily) on a Kubeflow Pipelines server")):
        p = pipeline_cmds.add_parser(name, help=text)
        p.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://localhost:8080")
        p.add_argument("--kfp-namespace", default="kubeflow", help="KFP's namespace (multi-user installs: yours)")
        p.add_argument("--package", type=Path, default=None, help="compiled pipeline YAML (default: compile it now)")
        p.add_argument("--experiment", default="leadre", help="KFP experiment (default leadre)")
        p.add_argument("--deploy-root", default=None, help="deploy root inside the pods (default: --deploy-mount "
                                                           "with --deploy-pvc, else none)")
        p.add_argument("--inference-services", default="recall,nearline",
                       help="InferenceServices deploy patches (default recall,nearline; empty: none)")
        p.add_argument("--namespace", default="leadre", help="namespace of the InferenceServices (default leadre)")
        run_options(p)
        p.set_defaults(func=func)
    schedule_parser = p
    schedule_parser.add_argument("--cron", required=True, help="KFP cron with seconds, e.g. '0 0 3 * * *' (03:00 daily)")
    schedule_parser.add_argument("--job-name", default="leadre-daily", help="name of the recurring run")
    pipeline_cmds.choices["submit"].add_argument("--run-name", default="leadre-daily", help="name of the run")

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
