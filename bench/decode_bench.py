"""Decode benchmark: (a) trie masking cost against a model step, (b) our constrained search against Hugging Face's
`generate` with `prefix_allowed_tokens_fn`, on the same randomly initialised Qwen2 (the `small` preset).

    .venv/bin/python bench/decode_bench.py [--users 8 --beam 20 --top-n 10 --ads 10000]

Prints a table and writes bench/results/decode.json. Weights are random: the point is cost and agreement, not quality.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from transformers import Qwen2ForCausalLM

from leadre.decode import HFStepModel, exclusion_keys, left_pad, search
from leadre.model import qwen2_config, resolve_config
from leadre.trie import Trie, build_trie

RESULTS = Path(__file__).resolve().parent / "results" / "decode.json"


def synthetic_sids(n_ads: int, codes_per_level: int, levels: int, seed: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """RQ-KMeans-like codes: a skewed first level, uniform deeper ones, plus a collision level that numbers ads
    sharing the same codes."""
    rng = np.random.default_rng(seed)
    first = rng.choice(codes_per_level, n_ads, p=rng.dirichlet(np.ones(codes_per_level)))
    codes = np.column_stack([first, rng.integers(0, codes_per_level, (n_ads, levels - 1))])
    _, group = np.unique(codes, axis=0, return_inverse=True)
    group = group.reshape(-1)
    collision = np.zeros(n_ads, dtype=np.int64)
    seen: dict[int, int] = {}
    for i, g in enumerate(group):
        collision[i] = seen.get(g, 0)
        seen[g] = collision[i] + 1
    level_sizes = (codes_per_level,) * levels + (max(int(collision.max()) + 1, 8),)
    return np.column_stack([codes, collision]), level_sizes


def make_model(level_sizes: tuple[int, ...], seed: int) -> tuple[Qwen2ForCausalLM, int]:
    """The `small` preset (~13M parameters), randomly initialised, and its number of ordinary tokens."""
    torch.manual_seed(seed)
    # wider initial weights than training uses: peaked scores, so agreement is not decided by float-level ties
    config = resolve_config("small", {"initializer_range": 0.1})
    model = Qwen2ForCausalLM(qwen2_config(config, config["bpe_vocab_size"] + sum(level_sizes), pad_token_id=0))
    return model.eval(), config["bpe_vocab_size"]


class TimedStepModel:
    """Records the wall time of every model call of a search."""

    def __init__(self, model: HFStepModel):
        self.model = model
        self.prefill_s: list[float] = []
        self.step_s: list[float] = []

    def prefill(self, input_ids, attention_mask):
        start = time.perf_counter()
        out = self.model.prefill(input_ids, attention_mask)
        self.prefill_s.append(time.perf_counter() - start)
        return out

    def step(self, tokens, rows, state):
        start = time.perf_counter()
        out = self.model.step(tokens, rows, state)
        self.step_s.append(time.perf_counter() - start)
        return out


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def mask_seconds(trie: Trie, level: int, users: int, beams: int, excluded: torch.Tensor | None) -> float:
    """What the search spends on the trie at one level for users × beams: child lookup, exclusion, masking."""
    generator = torch.Generator().manual_seed(level)
    n_rows = users * beams
    n_nodes = len(trie.keys[level - 1]) if level else 1
    nodes = torch.randint(n_nodes, (n_rows,), generator=generator)
    log_probs = torch.randn(n_rows, trie.level_sizes[level], generator=generator)
    users = torch.arange(users).repeat_interleave(beams)[:, None]

    def masked() -> torch.Tensor:
        allowed, children = trie.allowed(level, nodes)
        if excluded is not None:
            allowed &= ~torch.isin(users * len(trie) + children, excluded)
        return log_probs.masked_fill(~allowed, -torch.inf)

    return median_time(masked, repeats=30)


def hf_top_ads(model: Qwen2ForCausalLM, trie: Trie, prompts: list[list[int]], beam: int, top_n: int) -> list[list[str]]:
    input_ids, attention_mask = left_pad(prompts)
    width = input_ids.shape[1]
    allowed: dict[tuple[int, ...], list[int]] = {}

    def prefix_allowed_tokens_fn(_: int, ids: torch.Tensor) -> list[int]:
        # memoised per prefix, so HF pays for its per-beam Python call but not for our lookup
        prefix = tuple(ids[width:].tolist())
        if prefix not in allowed:
            allowed[prefix] = trie.allowed_tokens_after(prefix)
        return allowed[prefix]

    with torch.inference_mode():
        generated = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            num_beams=beam,
            num_return_sequences=beam,
            max_new_tokens=trie.levels,
            do_sample=False,
            length_penalty=1.0,
            early_stopping=False,
            prefix_allowed_tokens_fn=prefix_allowed_tokens_fn,
        )
    leaves = trie.node_of(trie.codes_of_tokens(generated[:, width:]))
    if (leaves < 0).any():
        raise RuntimeError("HF generate returned an S-ID outside the trie")
    ads = trie.ads_at(leaves).reshape(len(prompts), beam)
    return [row[:top_n].tolist() for row in ads]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ads", type=int, default=10_000)
    parser.add_argument("--codes", type=int, default=256, help="codes per level, before the collision level")
    parser.add_argument("--levels", type=int, default=3, help="code levels, before the collision level")
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--beam", type=int, default=20)
    parser.add_argument("--top-n", type=int, default=10)
    parser.add_argument("--prompt-tokens", type=int, nargs=2, default=(64, 128), help="prompt length range")
    parser.add_argument("--seen", type=int, default=50, help="ads excluded per user in the masking timing")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    codes, level_sizes = synthetic_sids(args.ads, args.codes, args.levels, args.seed)
    model, ordinary_tokens = make_model(level_sizes, args.seed)
    offsets = ordinary_tokens + np.cumsum((0, *level_sizes[:-1]))
    token_ids = [np.arange(k) + o for k, o in zip(level_sizes, offsets)]
    ad_ids = np.array([f"ad{i}" for i in range(args.ads)], dtype=object)
    trie = build_trie(codes, ad_ids, np.ones(args.ads, bool), level_sizes, token_ids)
    rng = np.random.default_rng(args.seed)
    prompts = [rng.integers(1, ordinary_tokens, rng.integers(*args.prompt_tokens)).tolist() for _ in range(args.users)]

    search(HFStepModel(model), trie, prompts[:1], top_n=args.top_n, beam_width=args.beam, progress=False)  # warm-up
    timed = TimedStepModel(HFStepModel(model))
    start = time.perf_counter()
    ours = search(timed, trie, prompts, top_n=args.top_n, beam_width=args.beam, batch_size=args.users, progress=False)
    ours_s = time.perf_counter() - start

    seen = [rng.choice(ad_ids, args.seen, replace=False).tolist() for _ in range(args.users)]
    excluded = exclusion_keys(trie, seen)
    beams = [1] + [args.beam] * (trie.levels - 1)
    # evaluation excludes seen ads, so the last level's timing includes the exclusion
    masks = [mask_seconds(trie, lv, args.users, beams[lv], excluded if lv == trie.levels - 1 else None)
             for lv in range(trie.levels)]
    step_s = statistics.median(timed.step_s)

    start = time.perf_counter()
    theirs = hf_top_ads(model, trie, prompts, args.beam, args.top_n)
    hf_s = time.perf_counter() - start
    ours_ads = [[ad for ad, _ in user] for user in ours]

    result = {
        "config": vars(args) | {"level_sizes": level_sizes, "parameters": sum(p.numel() for p in model.parameters())},
        "masking": {
            "mask_ms_per_level": [1e3 * m for m in masks],
            "model_step_ms_median": 1e3 * step_s,
            "prefill_ms": 1e3 * sum(timed.prefill_s),
            "mask_pct_of_step_per_level": [100 * m / step_s for m in masks],
            "mask_pct_of_search": 100 * sum(masks) / ours_s,
        },
        "vs_hf_generate": {
            "ours_s": ours_s,
            "hf_s": hf_s,
            "speedup": hf_s / ours_s,
            "same_top_n_set_users": sum(set(a) == set(b) for a, b in zip(ours_ads, theirs)),
            "same_top_n_order_users": sum(a == b for a, b in zip(ours_ads, theirs)),
            "users": args.users,
        },
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))

    print(f"model {result['config']['parameters'] / 1e6:.1f}M params, {args.ads} ads, levels {level_sizes}, "
          f"{args.users} users × beam {args.beam}, top {args.top_n}, {args.threads} thread(s)")
    print(f"{'level':>5} {'beams':>6} {'mask ms':>8} {'step ms':>8} {'mask % step':>11}")
    for lv, m in enumerate(masks):
        print(f"{lv:>5} {args.users * beams[lv]:>6} {1e3 * m:>8.2f} {1e3 * step_s:>8.1f} {100 * m / step_s:>10.2f}%")
    vs = result["vs_hf_generate"]
    print(f"masking, all levels: {result['masking']['mask_pct_of_search']:.2f}% of the search "
          f"({ours_s:.2f} s; prefill {sum(timed.prefill_s):.2f} s)")
    print(f"ours {vs['ours_s']:.2f} s   HF generate {vs['hf_s']:.2f} s   speedup {vs['speedup']:.1f}×")
    print(f"same top-{args.top_n} set: {vs['same_top_n_set_users']}/{args.users} users, "
          f"same order: {vs['same_top_n_order_users']}/{args.users}")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
