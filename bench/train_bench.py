"""Training throughput of the built-in presets: tokens/s of one forward + backward + AdamW step.

    python bench/train_bench.py [--presets tiny small] [--batch 16] [--length 256] [--threads 2]

Random tokens over the preset's vocabulary (its BPE size plus 4 levels × 256 S-ID tokens), sdpa attention, fp32,
as `leadre train sft` runs on a CPU. Prints a table, writes bench/results/train.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from leadre.model import count_parameters, qwen2_config, resolve_config

SID_TOKENS = 4 * 256


def measure(preset: str, batch: int, length: int, steps: int) -> dict:
    config = resolve_config(preset)
    model = AutoModelForCausalLM.from_config(qwen2_config(config, config["bpe_vocab_size"] + SID_TOKENS + 2),
                                             attn_implementation="sdpa")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, model.config.vocab_size, (batch, length))
    times = []
    for _ in range(steps + 1):  # the first step warms up allocators and kernels
        started = time.perf_counter()
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - started)
    best = min(times[1:])
    return {"preset": preset, "parameters": count_parameters(model), "batch": batch, "length": length,
            "seconds_per_step_best": round(best, 3), "seconds_per_step_median": round(statistics.median(times[1:]), 3),
            "tokens_per_second": round(batch * length / best)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench/results/train.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = [measure(p, args.batch, args.length, args.steps) for p in args.presets]
    print("| preset | parameters | batch × length | s/step (best) | tokens/s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['preset']} | {r['parameters']:,} | {r['batch']} × {r['length']} | {r['seconds_per_step_best']} "
              f"| {r['tokens_per_second']:,} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"threads": args.threads, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                                    "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
