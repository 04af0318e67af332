"""Prompt-building throughput on one core: what the near-line service pays per user before decoding.

    python bench/prompts_bench.py --data DIR --sids DIR [--users 5000] [--out bench/results/prompts.json]

Builds the plain next-ad prompt of each user from their features alone (profile, positive ads, contents — what
the feature store holds), pinned to one CPU core. Target: >= 2,000 prompts/s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from leadre.prompts import PromptCatalogue, PromptConfig, build_prompt, count_pieces, user_timelines
from leadre.schema import positive_actions_of, read_data_dir
from leadre.sid import load_sid_table
from leadre.split import leave_one_out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--sids", type=Path, required=True)
    parser.add_argument("--users", type=int, default=5000, help="prompts to build (users are reused if fewer)")
    parser.add_argument("--max-prompt-tokens", type=int, default=512)
    parser.add_argument("--out", type=Path, default=Path("bench/results/prompts.json"))
    args = parser.parse_args()
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core, as the target says

    tables = read_data_dir(args.data)
    cat = PromptCatalogue.build(tables.ads, tables.contents, load_sid_table(args.sids))
    split = leave_one_out(tables.events, positive_actions_of(args.data))
    everything = len(split.events)
    histories = [t.history(everything) for t in user_timelines(tables, split)]
    histories = [histories[i % len(histories)] for i in range(args.users)]
    cfg = PromptConfig(max_prompt_tokens=args.max_prompt_tokens)

    build_prompt(histories[0], cat, cfg)  # warm-up
    started = time.perf_counter()
    prompts = [build_prompt(h, cat, cfg) for h in histories]
    seconds = time.perf_counter() - started
    lengths = np.array([count_pieces(p) for p in prompts])
    ads = np.array([len(h.ads) for h in histories])
    result = {
        "data": str(args.data), "prompts": len(prompts), "seconds": round(seconds, 3),
        "prompts_per_second": round(len(prompts) / seconds, 1), "ms_per_prompt": round(1000 * seconds / len(prompts), 3),
        "history_ads_mean": round(float(ads.mean()), 1), "prompt_pieces_mean": round(float(lengths.mean()), 1),
        "prompt_pieces_max": int(lengths.max()), "max_prompt_tokens": args.max_prompt_tokens, "cores": 1,
        "machine": f"{platform.machine()} {os.cpu_count()} cores", "python": platform.python_version(),
    }
    print(f"| data | prompts | prompts/s (1 core) | ms/prompt | mean history (ads) | mean pieces | target |\n"
          f"|---|---|---|---|---|---|---|\n"
          f"| {args.data.name} | {len(prompts):,} | {result['prompts_per_second']:,.0f} | {result['ms_per_prompt']:.3f} "
          f"| {result['history_ads_mean']} | {result['prompt_pieces_mean']} | >= 2,000 |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
