"""`leadre compile` (DESIGN §4, step 7): export the trained decoder to ONNX as a prefill graph and a one-token step
graph with its KV cache (dynamic rows = users × beams, dynamic lengths), check it against PyTorch, optionally add
int8 weights for the CPU and TensorRT engines for a GPU, time the backends and record which one `auto` should use.

The artifact:
- `prefill.onnx`, `step.onnx` (float32; `DecoderGraph`'s signature) and, with `--int8`, `*.int8.onnx` (dynamic
  int8 quantisation of the matrix weights, for ONNX Runtime on the CPU);
- with `--backend tensorrt` (or `auto` on a machine that has TensorRT and a GPU) `prefill.plan`, `step.plan`:
  FP16 engines with an optimisation profile covering up to `--max-rows` rows and `--max-length` tokens;
- `manifest.json`: step "compile", `model_version`, what was built and why, the parity of each backend with
  PyTorch (max abs logit difference; whether every user got the same top-N ads) and their timings.
"""

from __future__ import annotations

import copy
import logging
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from leadre.artifacts import read_manifest, write_artifact
from leadre.backends import (PREFILL, STEP, DecoderGraph, choose_backend, load_step_model, onnx_missing,
                             random_prompts, tensorrt_missing, torch_step_model)
from leadre.decode import StepModel, left_pad, search
from leadre.devices import describe, resolve_device
from leadre.sid import load_sid_table
from leadre.tokenizer import sid_token_ids
from leadre.trie import Trie, build_trie, trie_from_table

log = logging.getLogger(__name__)
CPU = torch.device("cpu")

STEP_NAME = "compile"
OPSET = 17
PREFILL_INPUTS = ("input_ids", "attention_mask", "position_ids")
STEP_INPUTS = ("input_ids", "prompt_mask", "position_ids", "prompt_keys", "prompt_values", "past_keys", "past_values")
OUTPUTS = ("logits", "keys", "values")
# Logits of the ONNX graph may differ from PyTorch's by float rounding only; beyond this the export is broken.
MAX_LOGIT_DIFF = 1e-3


def export_onnx(model: torch.nn.Module, out_dir: Path, opset: int = OPSET) -> dict[str, list[str]]:
    """Write `prefill.onnx` and `step.onnx` (`DecoderGraph`'s two entry points) of the model, in float32, into
    `out_dir`; returns file → graph inputs. Users, beams, prompt length and generated length are dynamic."""
    if model.device.type != "cpu" or model.dtype != torch.float32:
        model = copy.deepcopy(model).to("cpu", torch.float32)
    graph = DecoderGraph(model)
    layers, kv_heads, head_dim = graph.layers, graph.kv_heads, graph.head_dim
    users, beams, prompt, generated = 3, 2, 7, 2
    ids = torch.randint(1, model.config.vocab_size, (users, prompt))
    mask = torch.ones(users, prompt, dtype=torch.long)
    mask[0, :2] = 0  # a padded row, so the mask arithmetic is traced with data, not constants
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    prompt_cache = torch.randn(layers, users, kv_heads, prompt, head_dim)
    own_cache = torch.randn(layers, users * beams, kv_heads, generated, head_dim)
    step_positions = (mask.sum(-1) + generated).repeat_interleave(beams)[:, None]
    prompt_axes, own_axes = {1: "users", 3: "prompt"}, {1: "rows", 3: "generated"}
    specs = {
        PREFILL: ((ids, mask, positions), PREFILL_INPUTS,
                  {"input_ids": {0: "users", 1: "prompt"}, "attention_mask": {0: "users", 1: "prompt"},
                   "position_ids": {0: "users", 1: "prompt"}, "logits": {0: "users"},
                   "keys": prompt_axes, "values": prompt_axes}),
        STEP: ((ids[:, :1].repeat_interleave(beams, 0), mask, step_positions, prompt_cache, prompt_cache.clone(),
                own_cache, own_cache.clone()), STEP_INPUTS,
               {"input_ids": {0: "rows"}, "prompt_mask": {0: "users", 1: "prompt"}, "position_ids": {0: "rows"},
                "prompt_keys": prompt_axes, "prompt_values": prompt_axes, "past_keys": own_axes,
                "past_values": own_axes, "logits": {0: "rows"}, "keys": {1: "rows", 3: "generated_1"},
                "values": {1: "rows", 3: "generated_1"}}),
    }
    written = {}
    for name, (args, input_names, axes) in specs.items():
        path = out_dir / f"{name}.onnx"
        with torch.no_grad():
            # the TorchScript exporter: it needs no onnxscript, and the graph is plain enough for it
            torch.onnx.export(graph, args, str(path), input_names=list(input_names), output_names=list(OUTPUTS),
                              dynamic_axes=axes, opset_version=opset, do_constant_folding=True, dynamo=False)
        written[path.name] = list(input_names)
    return written


def quantize_int8(out_dir: Path) -> list[str]:
    """Dynamic int8 quantisation (weights int8, activations quantised on the fly) of both graphs, for the CPU."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    written = []
    logging.disable(logging.WARNING)  # the quantiser logs a line per tensor (and advice) on the root logger
    try:
        for name in (PREFILL, STEP):
            target = out_dir / f"{name}.int8.onnx"
            quantize_dynamic(out_dir / f"{name}.onnx", target, weight_type=QuantType.QInt8, per_channel=True)
            written.append(target.name)
    finally:
        logging.disable(logging.NOTSET)
    return written


def build_tensorrt(out_dir: Path, layers: int, kv_heads: int, head_dim: int, max_users: int, max_rows: int,
                   max_length: int, max_generated: int = 8, fp16: bool = True) -> list[str]:
    """FP16 TensorRT engines of both graphs with one optimisation profile each: up to `max_users` prompts of up to
    `max_length` tokens, up to `max_rows` beams in all with up to `max_generated` generated tokens. Untested on the
    development machine (no `tensorrt` there); the first step's empty generated cache needs TensorRT's support for
    zero-length dimensions."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    opt_users, opt_rows, opt_len = min(16, max_users), min(320, max_rows), min(256, max_length)

    def cache(users: int, length: int) -> tuple[int, ...]:
        return (layers, users, kv_heads, length, head_dim)

    prompt_cache = (cache(1, 1), cache(opt_users, opt_len), cache(max_users, max_length))
    own_cache = (cache(1, 0), cache(opt_rows, 2), cache(max_rows, max_generated))
    shapes = {
        PREFILL: {n: ((1, 1), (opt_users, opt_len), (max_users, max_length)) for n in PREFILL_INPUTS},
        STEP: {"input_ids": ((1, 1), (opt_rows, 1), (max_rows, 1)),
               "position_ids": ((1, 1), (opt_rows, 1), (max_rows, 1)),
               "prompt_mask": ((1, 1), (opt_users, opt_len), (max_users, max_length)),
               "prompt_keys": prompt_cache, "prompt_values": prompt_cache,
               "past_keys": own_cache, "past_values": own_cache},
    }
    written = []
    for name in (PREFILL, STEP):
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(out_dir / f"{name}.onnx")):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"TensorRT could not parse {name}.onnx: {errors}")
        config = builder.create_builder_config()
        if fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        profile = builder.create_optimization_profile()
        for input_name, (low, opt, high) in shapes[name].items():
            profile.set_shape(input_name, low, opt, high)
        config.add_optimization_profile(profile)
        engine = builder.build_serialized_network(network, config)
        if engine is None:
            raise RuntimeError(f"TensorRT failed to build the {name} engine")
        (out_dir / f"{name}.plan").write_bytes(bytes(engine))
        written.append(f"{name}.plan")
    return written


def parity_trie(tokenizer: Any, level_sizes: Sequence[int], sids_dir: str | Path | None = None,
                ads: int = 2000, seed: int = 0) -> Trie:
    """The trie the parity check searches: the model's own S-IDs where given, else random distinct S-IDs."""
    token_ids = sid_token_ids(tokenizer, level_sizes)
    if sids_dir is not None:
        return trie_from_table(load_sid_table(sids_dir), token_ids)
    rng = np.random.default_rng(seed)
    codes = np.unique(np.column_stack([rng.integers(0, k, ads) for k in level_sizes]), axis=0)
    return build_trie(codes, np.array([f"ad{i}" for i in range(len(codes))], dtype=object),
                      np.ones(len(codes), bool), level_sizes, token_ids)


def logit_difference(reference: StepModel, other: StepModel, prompts: list[list[int]], trie: Trie,
                     pad_id: int) -> float:
    """Max abs difference of next-token logits after the prefill and after each step of a random beam path (each
    user's beams continue random beams of the same user, as the search's reordering does; tokens are S-ID tokens of
    the level), on the same prompts."""
    ids, mask = left_pad(prompts, pad_id)
    worst = 0.0
    ref_logits, ref_state = reference.prefill(ids, mask)
    logits, state = other.prefill(ids, mask)
    worst = max(worst, float((ref_logits.cpu() - logits.cpu()).abs().max()))
    generator = torch.Generator().manual_seed(0)
    users, beams = len(prompts), 4
    rows = torch.arange(users).repeat_interleave(beams)
    for level in range(trie.levels - 1):
        tokens = trie.token_ids[level][torch.randint(trie.level_sizes[level], (len(rows),), generator=generator)]
        ref_logits, ref_state = reference.step(tokens, rows, ref_state)
        logits, state = other.step(tokens, rows, state)
        worst = max(worst, float((ref_logits.cpu() - logits.cpu()).abs().max()))
        rows = (torch.arange(users)[:, None] * beams + torch.randint(beams, (users, beams), generator=generator)).view(-1)
    return worst


def time_search(step_model: StepModel, trie: Trie, prompts: list[list[int]], top_n: int, beam: int,
                batch_size: int, pad_id: int, repeats: int = 3) -> tuple[float, list[list[str]]]:
    """(Best-of-`repeats` milliseconds per user of the whole search, each user's top-N ads); one warm-up run."""
    trie = trie.to(step_model.device)  # placed once, as LLMRecaller does, so no search copies it

    def once() -> list[list[tuple[str, float]]]:
        return search(step_model, trie, prompts, top_n, beam, batch_size=batch_size, pad_id=pad_id, progress=False)

    once()
    best = float("inf")
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        ranked = once()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 1e3 * best / len(prompts), [[ad for ad, _ in r] for r in ranked]


def int8_cost(reference: StepModel, int8: StepModel, tokenizer: Any, trie: Trie, prompts_dir: str | Path,
              users: int, beam: int) -> dict[str, Any]:
    """Recall@K and NDCG@K of the float32 model and of its int8 graphs on the same validation examples."""
    from leadre.prompts import read_prompts
    from leadre.recall import LLMRecaller
    from leadre.sft import validation_recall

    examples = read_prompts(prompts_dir, "validation")[:users]
    metrics = {name: validation_recall(LLMRecaller(step, tokenizer, trie), examples, beam)
               for name, step in (("float32", reference), ("int8", int8))}
    return {"users": len(examples), "beam": beam, **metrics,
            "recall@10_difference": metrics["int8"]["recall@10"] - metrics["float32"]["recall@10"]}


def compile_model(model_dir: str | Path, out: str | Path, backend: str = "auto", device: str = "auto",
                  int8: bool = False, sids_dir: str | Path | None = None, users: int = 32, top_n: int = 10,
                  beam: int = 20, batch_size: int = 16, max_users: int = 64, max_rows: int = 64 * 20,
                  max_length: int = 1024, seed: int = 0, prompts_dir: str | Path | None = None,
                  quality_users: int = 300) -> dict[str, Any]:
    """`leadre compile`: export, check parity, build what `backend` asks for, time each backend on `device` and
    record `auto`'s choice. With `int8` and `prompts_dir` (and `sids_dir`), also the cost of int8: Recall@K of
    PyTorch and of the int8 graphs on up to `quality_users` validation examples. ValueError (a clear message)
    where the backend or device asked for is unavailable."""
    from leadre.bundle import model_version
    from leadre.model import load_model

    if backend not in ("auto", "onnx", "tensorrt"):
        raise ValueError(f"unknown compile backend {backend!r}: expected auto, onnx or tensorrt")
    if prompts_dir is not None and (not int8 or sids_dir is None):
        raise ValueError("measuring the int8 cost on validation prompts needs --int8 and the model's --sids")
    target = resolve_device(device)
    missing = onnx_missing()
    if missing:
        raise ValueError(f"cannot compile: {missing}")
    trt_missing = tensorrt_missing() if target.type == "cuda" else "the device is the CPU"
    if backend == "tensorrt" and trt_missing:
        raise ValueError(f"--backend tensorrt is unavailable here: {trt_missing}. Use --backend onnx (or auto), "
                         "or compile on a CUDA machine with `pip install 'leadre[gpu]'`")
    build_trt = backend == "tensorrt" or (backend == "auto" and trt_missing is None)

    model_dir = Path(model_dir)
    model, tokenizer, metadata = load_model(model_dir)  # the `torch` backend as it runs (sdpa attention)
    version = model_version(model_dir, metadata.get("stage", "model"))
    trie = parity_trie(tokenizer, metadata["level_sizes"], sids_dir, seed=seed)
    # ordinary tokens only: the S-ID tokens follow them in the vocabulary
    prompts = random_prompts(int(min(t.min() for t in trie.token_ids)), users, (24, 96), seed)
    pad_id = tokenizer.pad_token_id or 0
    graph = DecoderGraph(model)
    parameters = {"backend": backend, "device": str(target), "int8": int8, "users": users, "top_n": top_n,
                  "beam": beam, "batch_size": batch_size, "max_users": max_users, "max_rows": max_rows,
                  "max_length": max_length, "seed": seed}
    inputs = {"model": model_dir} | ({"sids": sids_dir} if sids_dir else {})
    with write_artifact(out, STEP_NAME, inputs, parameters) as (tmp, manifest):
        started = time.perf_counter()
        files = export_onnx(model, tmp)
        built = {"onnx": f"prefill/step graphs exported in {time.perf_counter() - started:.1f}s (opset {OPSET})"}
        if int8:
            files |= {f: [] for f in quantize_int8(tmp)}
            built["onnx-int8"] = "dynamic int8 quantisation of the matrix weights (CPU)"
        if build_trt:
            started = time.perf_counter()
            files |= {f: [] for f in build_tensorrt(tmp, graph.layers, graph.kv_heads, graph.head_dim, max_users,
                                                    max_rows, max_length)}
            built["tensorrt"] = f"FP16 engines, users ≤ {max_users}, rows ≤ {max_rows}, prompt ≤ {max_length} " \
                                f"tokens, built in {time.perf_counter() - started:.1f}s"
        else:
            built["tensorrt"] = f"not built: {trt_missing}"

        # parity and timings: every backend that runs here against PyTorch eager, on the same users
        reference_cpu = torch_step_model(model, "torch")
        measured: dict[str, dict[str, Any]] = {}
        devices = [CPU] + ([target] if target.type == "cuda" else [])
        for where in devices:
            weights = model.to(where)
            reference = torch_step_model(weights, "torch")
            ref_ms, ref_ads = time_search(reference, trie, prompts, top_n, beam, batch_size, pad_id)
            candidates = ["torch"] + (["onnx"] + (["onnx-int8"] if int8 else []) if where.type == "cpu" else []) \
                + (["tensorrt"] if build_trt and where.type == "cuda" else [])
            for name in candidates:
                step_model = reference if name == "torch" else load_step_model(name, where, weights, tmp)
                ms, ads = (ref_ms, ref_ads) if name == "torch" else time_search(step_model, trie, prompts, top_n,
                                                                                  beam, batch_size, pad_id)
                same = sum(a == b for a, b in zip(ads, ref_ads))
                entry = {"device_type": where.type, "device": describe(where), "ms_per_user": round(ms, 3),
                         "same_top_n_users": same, "users": len(prompts), "same_top_n": same == len(prompts)}
                if name != "torch":
                    entry["max_abs_logit_diff"] = logit_difference(reference_cpu if where.type == "cpu" else reference,
                                                                   step_model, prompts[:8], trie, pad_id)
                measured[f"{name}@{where.type}" if where.type == "cuda" and len(devices) > 1 else name] = entry
                log.info("compile: %s on %s: %.2f ms/user, same top-%d for %d/%d users%s", name, where, ms, top_n,
                         same, len(prompts), f", max |Δlogit| {entry['max_abs_logit_diff']:.2e}"
                         if "max_abs_logit_diff" in entry else "")
        model.to("cpu")
        onnx_parity = measured["onnx"]
        if onnx_parity["max_abs_logit_diff"] > MAX_LOGIT_DIFF:
            raise RuntimeError(f"ONNX export differs from PyTorch by {onnx_parity['max_abs_logit_diff']:.2e} in the "
                               f"logits (> {MAX_LOGIT_DIFF}): the export is broken")
        chosen, reason = choose_backend(target, tmp, measured)
        log.info("compile: auto backend on %s: %s (%s)", target, chosen, reason)
        if prompts_dir is not None:
            manifest["int8_cost"] = int8_cost(reference_cpu, load_step_model("onnx-int8", CPU, None, tmp), tokenizer,
                                              trie, prompts_dir, quality_users, beam)
            log.info("compile: int8 cost on validation: %s", manifest["int8_cost"])
        manifest.update({
            "model_version": version,
            "backend": chosen,
            "backend_reason": reason,
            "device": describe(target),
            "built": built,
            "files": sorted(files),
            "graph": {"layers": graph.layers, "kv_heads": graph.kv_heads, "head_dim": graph.head_dim,
                      "vocab_size": model.config.vocab_size, "opset": OPSET,
                      "inputs": {f: names for f, names in files.items() if names}},
            "parity": {"reference": "torch (eager, float32)", "trie": str(sids_dir) if sids_dir else "random S-IDs",
                       "top_n": top_n, "beam": beam, "backends": measured},
            "host": {"machine": platform.machine(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        })
        manifest["counts"] = {"users": len(prompts), "ads": len(trie), "backends_checked": len(measured)}
    return manifest


def read_compiled(path: str | Path) -> dict[str, Any]:
    """The manifest of a `leadre compile` artifact."""
    return read_manifest(path, STEP_NAME)
