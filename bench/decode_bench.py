"""Decode benchmark on the same randomly initialised Qwen2 (the `small` preset) and the same users throughout:
(a) trie masking cost against a model step, (b) our constrained search against Hugging Face's `generate` with
`prefix_allowed_tokens_fn`, (c) every decoder backend (leadre.backends) at batch 1..64 users × beam 20: users/s,
p50/p99 latency per user, the trie's share of that backend's step (the trie on the backend's device; without and
with `--seen` ads excluded per user), top-N agreement with the first backend, and the physical floor (FLOPs per
user over the device's measured matmul rate).

    .venv/bin/python bench/decode_bench.py [--users 8 --beam 20 --top-n 10 --ads 10000]
        [--backends torch onnx [onnx-int8 torch-compile torch:cuda torch-cudagraphs:cuda torch:cuda:bfloat16]]
        [--batches 1 4 16 64] [--skip-hf]

A backend is `name[:device[:dtype]]` (device default cpu; dtype float32 unless given; the ONNX backends run on the
CPU execution provider). Prints tables and writes bench/results/decode.json. Weights are random: the point is cost
and agreement, not quality.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import Qwen2ForCausalLM

from leadre.backends import load_step_model
from leadre.decode import HFStepModel, StepModel, exclusion_keys, left_pad, search
from leadre.devices import resolve_device
from leadre.export import export_onnx, quantize_int8
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


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class TimedStepModel:
    """Records the wall time of every model call of a search (GPU work included: it synchronises)."""

    def __init__(self, model: StepModel):
        self.model = model
        self.device = model.device
        self.prefill_s: list[float] = []
        self.step_s: list[float] = []

    def prefill(self, input_ids, attention_mask):
        start = time.perf_counter()
        out = self.model.prefill(input_ids, attention_mask)
        sync()
        self.prefill_s.append(time.perf_counter() - start)
        return out

    def step(self, tokens, rows, state):
        start = time.perf_counter()
        out = self.model.step(tokens, rows, state)
        sync()
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
    """What the search spends on the trie at one level for users × beams, on the trie's device: child lookup,
    exclusion (as `search_batch` does it: a child stays allowed while the user has an active ad below it that is
    not excluded), masking. Timed as the search runs it on a GPU, queued with no wait for the host: ten calls back
    to back, then one synchronisation."""
    blocked = None if excluded is None else trie.exclusion_index(excluded)
    generator = torch.Generator().manual_seed(level)
    n_rows = users * beams
    n_nodes = len(trie.active_counts[level - 1]) if level else 1
    nodes = torch.randint(n_nodes, (n_rows,), generator=generator).to(trie.device)
    log_probs = torch.randn(n_rows, trie.level_sizes[level], generator=generator).to(trie.device)
    users = torch.arange(users, device=trie.device).repeat_interleave(beams)[:, None]

    def masked() -> torch.Tensor:
        allowed, children = trie.allowed(level, nodes)
        if blocked is not None:
            allowed &= trie.active_counts[level][children] > trie.excluded_below(level, children, users, blocked)
        return torch.where(allowed, log_probs, -torch.inf)

    def ten() -> None:
        for _ in range(10):
            masked()
        sync()

    return median_time(ten, repeats=10) / 10


def trie_ms(trie: Trie, batches: list[int], beams: list[int], seen: list[list[str]]) -> dict[str, dict[int, list[float]]]:
    """Per batch size, the trie's milliseconds at each level after the first (where the beams are full), without
    ("plain") and with ("seen") each user's `seen` ads excluded."""
    def levels(users: int, excluded: torch.Tensor | None) -> list[float]:
        return [1e3 * mask_seconds(trie, lv, users, beams[lv], excluded) for lv in range(1, trie.levels)]

    return {"plain": {b: levels(b, None) for b in batches},
            "seen": {b: levels(b, exclusion_keys(trie, seen[:b])) for b in batches}}


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


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matrix product on `device` in `dtype`: the roof the model's matmuls run under."""
    n = 4096 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync()
    repeats, start = 10, time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync()
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def flops_per_user(config, prompt_tokens: float, beam: int, levels: int) -> float:
    """Forward FLOPs of one user's search: the prefill over the prompt (output layer on its last token only) and
    `levels - 1` steps of `beam` tokens; 2 FLOPs per weight per token plus the attention products."""
    hidden, layers, inter = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    kv = config.num_key_value_heads * hidden // config.num_attention_heads
    block = layers * 2 * (hidden * (2 * hidden + 2 * kv) + 3 * hidden * inter)  # q, o, k, v; gated MLP
    head = 2 * hidden * config.vocab_size

    def attention(context: float) -> float:  # scores and weighted values for one token over `context` keys
        return layers * 4 * hidden * context

    prefill = prompt_tokens * block + attention(prompt_tokens / 2) * prompt_tokens + head
    steps = sum(beam * (block + attention(prompt_tokens + i) + head) for i in range(1, levels))
    return prefill + steps


def make_backend(spec: str, model: Qwen2ForCausalLM, onnx_dir: Path, threads: int) -> tuple[StepModel, torch.device, torch.dtype]:
    """`name[:device[:dtype]]` → its StepModel (PyTorch backends get their own copy of the weights)."""
    name, *rest = spec.split(":")
    device = resolve_device(rest[0] if rest else "cpu")
    dtype = getattr(torch, rest[1]) if len(rest) > 1 else torch.float32
    if name.startswith("torch"):
        weights = copy.deepcopy(model).to(device, dtype)
        return load_step_model(name, device, weights), device, dtype
    return load_step_model(name, device, None, onnx_dir, threads=threads), torch.device("cpu"), torch.float32


def bench_backend(step_model: StepModel, trie: Trie, prompts: list[list[int]], batch: int, top_n: int, beam: int,
                  min_seconds: float, max_repeats: int) -> dict:
    """One batch of `batch` users, searched repeatedly: per-user latency (= the batch's), users/s, step times."""
    users = prompts[:batch]

    def once(model: StepModel) -> list[list[tuple[str, float]]]:
        return search(model, trie, users, top_n=top_n, beam_width=beam, batch_size=batch, progress=False)

    for _ in range(3):  # compilation and CUDA-graph recording happen in the first calls
        once(step_model)
    times: list[float] = []
    while len(times) < 5 or (sum(times) < min_seconds and len(times) < max_repeats):
        sync()
        start = time.perf_counter()
        ranked = once(step_model)
        sync()
        times.append(time.perf_counter() - start)
    timed = TimedStepModel(step_model)
    once(timed)
    median = statistics.median(times)
    return {
        "batch": batch,
        "runs": len(times),
        "users_per_s": batch / median,
        "p50_ms_per_user": 1e3 * median,  # every user of a batch waits for the whole batch
        "p99_ms_per_user": 1e3 * float(np.percentile(times, 99)),
        "prefill_ms": 1e3 * timed.prefill_s[0],
        "step_ms_median": 1e3 * statistics.median(timed.step_s),
        "top": [[ad for ad, _ in r] for r in ranked],
    }


def bench_backends(args: argparse.Namespace, model: Qwen2ForCausalLM, trie: Trie, prompts: list[list[int]]) -> dict:
    """Section (c): every backend at every batch size on the same users; agreement with the first backend."""
    mean_prompt = float(np.mean([len(p) for p in prompts[: max(args.batches)]]))
    flops = flops_per_user(model.config, mean_prompt, args.beam, trie.levels)
    beams = [1] + [args.beam] * (trie.levels - 1)
    rng = np.random.default_rng(args.seed)
    seen = [rng.choice(trie.ad_ids, args.seen, replace=False).tolist() for _ in range(max(args.batches))]
    # the trie's work depends on the rows and the device, not on the backend: measured once per device and batch
    # size, without and with each user's seen ads excluded
    mask_ms: dict[str, dict[str, dict[int, list[float]]]] = {}
    rates: dict[str, float] = {}
    table: dict[str, list[dict]] = {}
    reference: dict[int, list[list[str]]] = {}
    with tempfile.TemporaryDirectory() as onnx_dir:
        if any(spec.startswith("onnx") for spec in args.backends):
            export_onnx(model, Path(onnx_dir))
            if any(spec.startswith("onnx-int8") for spec in args.backends):
                quantize_int8(Path(onnx_dir))
        for spec in args.backends:
            try:
                step_model, device, dtype = make_backend(spec, model, Path(onnx_dir), args.threads)
            except ValueError as e:  # unavailable here (no GPU, no package): say so and go on
                print(f"{spec}: skipped ({e})")
                continue
            key = f"{device.type}/{dtype}".replace("torch.", "")
            if key not in rates:
                rates[key] = matmul_rate(device, dtype)
            placed = trie.to(device)  # once, as LLMRecaller does: the timed searches do not copy it
            if device.type not in mask_ms:
                mask_ms[device.type] = trie_ms(placed, args.batches, beams, seen)
            rows = []
            for batch in args.batches:
                started = time.perf_counter()
                row = bench_backend(step_model, placed, prompts, batch, args.top_n, args.beam, args.min_seconds,
                                    args.max_repeats)
                top = row.pop("top")
                reference.setdefault(batch, top)
                row["same_top_n_users"] = sum(a == b for a, b in zip(top, reference[batch]))
                row["trie_pct_of_step"] = 100 * max(mask_ms[device.type]["plain"][batch]) / row["step_ms_median"]
                row["trie_pct_of_step_seen"] = 100 * max(mask_ms[device.type]["seen"][batch]) / row["step_ms_median"]
                row["floor_users_per_s"] = rates[key] / flops
                row["pct_of_floor"] = 100 * row["users_per_s"] / row["floor_users_per_s"]
                rows.append(row)
                print(f"{spec:<28} batch {batch:>3}: {row['users_per_s']:>8.1f} users/s, p50 {row['p50_ms_per_user']:.1f} "
                      f"ms, same top-{args.top_n} {row['same_top_n_users']}/{batch} ({time.perf_counter() - started:.1f}s)",
                      flush=True)
            table[spec] = rows
            del step_model
    return {"flops_per_user": flops, "mean_prompt_tokens": mean_prompt, "matmul_flops_per_s": rates,
            "trie_ms_per_level": mask_ms, "reference": args.backends[0], "backends": table}


def print_backends(result: dict, top_n: int) -> None:
    print(f"\nbackends (same users; FLOPs/user {result['flops_per_user'] / 1e9:.3f} G; matmul rates "
          + ", ".join(f"{k} {v / 1e12:.2f} TFLOP/s" for k, v in result["matmul_flops_per_s"].items()) + ")")
    print(f"| backend | batch | users/s | p50 ms/user | p99 ms/user | step ms | trie % of step | with seen ads "
          f"| floor users/s | % of floor | same top-{top_n} as {result['reference']} |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for spec, rows in result["backends"].items():
        for r in rows:
            print(f"| {spec} | {r['batch']} | {r['users_per_s']:.1f} | {r['p50_ms_per_user']:.1f} | {r['p99_ms_per_user']:.1f} "
                  f"| {r['step_ms_median']:.2f} | {r['trie_pct_of_step']:.2f}% | {r['trie_pct_of_step_seen']:.2f}% "
                  f"| {r['floor_users_per_s']:.0f} "
                  f"| {r['pct_of_floor']:.2f}% | {r['same_top_n_users']}/{r['batch']} |")
    by_batch = {spec: {r["batch"]: r["users_per_s"] for r in rows} for spec, rows in result["backends"].items()}
    base = next((s for s in by_batch if s.split(":")[0] == "torch" and s.split(":")[1:2] in ([], ["cpu"])), None)
    for spec, rates in by_batch.items():
        if base and spec != base and 16 in rates and 16 in by_batch[base]:
            print(f"{spec} vs {base} at batch 16: {rates[16] / by_batch[base][16]:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ads", type=int, default=10_000)
    parser.add_argument("--codes", type=int, default=256, help="codes per level, before the collision level")
    parser.add_argument("--levels", type=int, default=3, help="code levels, before the collision level")
    parser.add_argument("--users", type=int, default=8, help="users of sections (a) and (b)")
    parser.add_argument("--beam", type=int, default=20)
    parser.add_argument("--top-n", type=int, default=10)
    parser.add_argument("--prompt-tokens", type=int, nargs=2, default=(64, 128), help="prompt length range")
    parser.add_argument("--seen", type=int, default=50, help="ads excluded per user in the masking timing")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backends", nargs="*", default=["torch", "onnx"],
                        help="section (c): backends as name[:device[:dtype]]; the first is the agreement reference")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64], help="users per batch in (c)")
    parser.add_argument("--min-seconds", type=float, default=2.0, help="(c): time each batch size at least this long")
    parser.add_argument("--max-repeats", type=int, default=50, help="(c): at most this many timed runs per batch size")
    parser.add_argument("--skip-hf", action="store_true", help="skip (b), the comparison with HF generate")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"JSON results (default {RESULTS})")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    codes, level_sizes = synthetic_sids(args.ads, args.codes, args.levels, args.seed)
    model, ordinary_tokens = make_model(level_sizes, args.seed)
    offsets = ordinary_tokens + np.cumsum((0, *level_sizes[:-1]))
    token_ids = [np.arange(k) + o for k, o in zip(level_sizes, offsets)]
    ad_ids = np.array([f"ad{i}" for i in range(args.ads)], dtype=object)
    trie = build_trie(codes, ad_ids, np.ones(args.ads, bool), level_sizes, token_ids)
    rng = np.random.default_rng(args.seed)
    n_prompts = max(args.users, *args.batches)
    prompts = [rng.integers(1, ordinary_tokens, rng.integers(args.prompt_tokens[0], args.prompt_tokens[1] + 1)).tolist()
               for _ in range(n_prompts)]
    users = prompts[: args.users]

    search(HFStepModel(model), trie, users[:1], top_n=args.top_n, beam_width=args.beam, progress=False)  # warm-up
    timed = TimedStepModel(HFStepModel(model))
    start = time.perf_counter()
    ours = search(timed, trie, users, top_n=args.top_n, beam_width=args.beam, batch_size=args.users, progress=False)
    ours_s = time.perf_counter() - start

    seen = [rng.choice(ad_ids, args.seen, replace=False).tolist() for _ in range(args.users)]
    excluded = exclusion_keys(trie, seen)
    beams = [1] + [args.beam] * (trie.levels - 1)
    # evaluation excludes seen ads at every level, so every level's timing includes the exclusion
    masks = [mask_seconds(trie, lv, args.users, beams[lv], excluded) for lv in range(trie.levels)]
    step_s = statistics.median(timed.step_s)

    result = {
        "config": vars(args) | {"out": str(args.out), "level_sizes": level_sizes,
                                "parameters": sum(p.numel() for p in model.parameters()),
                                "torch": torch.__version__, "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "masking": {
            "mask_ms_per_level": [1e3 * m for m in masks],
            "model_step_ms_median": 1e3 * step_s,
            "prefill_ms": 1e3 * sum(timed.prefill_s),
            "mask_pct_of_step_per_level": [100 * m / step_s for m in masks],
            "mask_pct_of_search": 100 * sum(masks) / ours_s,
        },
    }
    print(f"model {result['config']['parameters'] / 1e6:.1f}M params, {args.ads} ads, levels {level_sizes}, "
          f"{args.users} users × beam {args.beam}, top {args.top_n}, {args.threads} thread(s)")
    print(f"{'level':>5} {'beams':>6} {'mask ms':>8} {'step ms':>8} {'mask % step':>11}")
    for lv, m in enumerate(masks):
        print(f"{lv:>5} {args.users * beams[lv]:>6} {1e3 * m:>8.2f} {1e3 * step_s:>8.1f} {100 * m / step_s:>10.2f}%")
    print(f"masking, all levels: {result['masking']['mask_pct_of_search']:.2f}% of the search "
          f"({ours_s:.2f} s; prefill {sum(timed.prefill_s):.2f} s)")

    if not args.skip_hf:
        start = time.perf_counter()
        theirs = hf_top_ads(model, trie, users, args.beam, args.top_n)
        hf_s = time.perf_counter() - start
        ours_ads = [[ad for ad, _ in user] for user in ours]
        vs = result["vs_hf_generate"] = {
            "ours_s": ours_s,
            "hf_s": hf_s,
            "speedup": hf_s / ours_s,
            "same_top_n_set_users": sum(set(a) == set(b) for a, b in zip(ours_ads, theirs)),
            "same_top_n_order_users": sum(a == b for a, b in zip(ours_ads, theirs)),
            "users": args.users,
        }
        print(f"ours {vs['ours_s']:.2f} s   HF generate {vs['hf_s']:.2f} s   speedup {vs['speedup']:.1f}×")
        print(f"same top-{args.top_n} set: {vs['same_top_n_set_users']}/{args.users} users, "
              f"same order: {vs['same_top_n_order_users']}/{args.users}")

    if args.backends:
        result["backends"] = bench_backends(args, model, trie, prompts)
        print_backends(result["backends"], args.top_n)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
