"""The `leadre` command: one subcommand per pipeline step (DESIGN §7). Each is a thin layer over a library call."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from leadre.artifacts import ArtifactError

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


def _demo(args: argparse.Namespace) -> None:
    from leadre.demo import run_demo

    run_demo(Path(args.out), users=args.users, seed=args.seed)


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

    p = commands.add_parser("demo", help="the README's main job: every step end to end on the synthetic marketplace")
    p.add_argument("--out", default="demo-run", help="working directory for all artifacts (default demo-run)")
    p.add_argument("--users", type=int, default=2000, help="synthetic users (default 2000)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, ArtifactError) as e:  # DataError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
