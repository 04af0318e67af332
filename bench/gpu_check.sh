#!/usr/bin/env bash
# The GPU check (issue 9): one prepared run on a CUDA machine, a few minutes long, from the repository root.
#
#   bash bench/gpu_check.sh                      # on the GPU machine; carry .whl and .gpu (see below)
#   DEVICE=cpu PYTHON=.venv/bin/python SKIP_WHEELS=1 OUT=/tmp/gpu-check bash bench/gpu_check.sh   # dry run here
#
# It installs the wheels its image lacks (.whl), generates the synthetic marketplace, builds S-IDs from the
# embedding cache carried in .gpu/cache (the MiniLM wheel, 88 MB, is too large to carry; the carried .gpu/demo-data
# and .gpu/demo-sids stand in if the cache misses), trains a short SFT on CUDA, compares the search on CUDA with the
# CPU (same top-10), runs `leadre evaluate` on CUDA, the decode benchmark per backend, compiles (ONNX parity, int8
# cost, TensorRT's clear refusal where it is missing), loads a bundle with the compiled artifact on CUDA, and last
# the torch.compile / CUDA-graph variants. Results go to $OUT (8 files at most): summary.txt, log.txt and JSON.
#
# Prepared here once, from the repository root (.gpu/ and .whl/ are in .git/info/exclude):
#   leadre data synth --users 2000 --seed 0 --out .gpu/demo-data
#   leadre sids build --data .gpu/demo-data --out .gpu/demo-sids --cache .gpu/cache --config leadre/configs/demo.yaml
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 transformers==5.24.0 tokenizers==0.23.3 \
#     peft==0.21.2 fsspec==2026.9.0 regex==2026.11.19
set -uo pipefail

DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu-check-out}
WORK=${WORK:-/tmp/gpu-check-work}
SFT_MINUTES=${SFT_MINUTES:-1.0}
THREADS=${THREADS:-8}
SEARCH_USERS=${SEARCH_USERS:-300}
BATCHES=${BATCHES:-1 4 16 64}
BENCH_ADS=${BENCH_ADS:-10000}
BENCH_BACKENDS=${BENCH_BACKENDS:-torch:$DEVICE torch:$DEVICE:bfloat16}
rm -rf "$WORK"
mkdir -p "$WORK"
source "$(dirname "$0")/gpu_setup.sh"
export LEADRE_CACHE=$WORK/cache
L="$PY -m leadre.cli"

{
  date -u; uname -m; nproc
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY - <<'EOF'
import importlib, sys
print("python", sys.version.split()[0])
for name in ("torch", "transformers", "tokenizers", "trl", "datasets", "peft", "accelerate", "onnx", "onnxruntime",
             "pyarrow", "fsspec", "huggingface_hub", "numpy", "pandas", "scipy", "tensorrt"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"))
    except Exception as e:  # report and go on: the steps below say what they need
        print(name, "MISSING", type(e).__name__, str(e)[:120])
import torch
print("cuda available", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
import onnxruntime
print("ort providers", onnxruntime.get_available_providers())
EOF
} 2>&1 | tee -a "$SUMMARY"

# data and S-IDs: the demo marketplace; its ad texts' embeddings come from the carried cache (no MiniLM here)
mkdir -p "$WORK/cache" && cp -r .gpu/cache "$WORK/cache/embeddings"
if ! { step data 60 $L data synth --users 2000 --seed 0 --out "$WORK/data" &&
       step sids 120 $L sids build --data "$WORK/data" --out "$WORK/sids" --config leadre/configs/demo.yaml; }; then
  echo "fresh data/S-IDs failed: using the carried .gpu/demo-data and .gpu/demo-sids" | tee -a "$SUMMARY"
  rm -rf "$WORK/data" "$WORK/sids" && cp -r .gpu/demo-data "$WORK/data" && cp -r .gpu/demo-sids "$WORK/sids"
fi
step prompts 120 $L prompts build --data "$WORK/data" --sids "$WORK/sids" --out "$WORK/prompts" \
  --config leadre/configs/demo.yaml

# a short SFT on the device: the demo config under a wall-clock budget
$PY - "$WORK/sft.yaml" "$SFT_MINUTES" <<'EOF'
import sys, yaml
config = yaml.safe_load(open("leadre/configs/demo.yaml"))
config["sft"].update(max_minutes=float(sys.argv[2]), eval_users=200)
yaml.safe_dump(config, open(sys.argv[1], "w"))
EOF
step sft 420 $L train sft --prompts "$WORK/prompts" --sids "$WORK/sids" --out "$WORK/sft" --config "$WORK/sft.yaml" \
  --device "$DEVICE" --threads "$THREADS" && cp "$WORK/sft/leadre_model.json" "$OUT/sft_model.json"

# the search on the device against the CPU: the same 300 validation users, float32 and bf16
step search 240 $PY - "$WORK" "$DEVICE" "$OUT/search_devices.json" "$SEARCH_USERS" <<'EOF'
import json, sys, time
import torch
from leadre.model import load_model
from leadre.prompts import read_prompts
from leadre.recall import LLMRecaller
from leadre.sid import load_sid_table

work, device, out, users = sys.argv[1:]
torch.set_num_threads(8)
sids = load_sid_table(f"{work}/sids")
examples = read_prompts(f"{work}/prompts", "validation")[: int(users)]
prompts = [e["prompt"] for e in examples]
runs = [("cpu/float32", "cpu", torch.float32), (f"{device}/float32", device, torch.float32)]
if device == "cuda" and torch.cuda.is_bf16_supported():
    runs.append(("cuda/bfloat16", "cuda", torch.bfloat16))
tops, results = {}, {}
for name, where, dtype in runs:
    model, tokenizer, _ = load_model(f"{work}/sft")
    recaller = LLMRecaller.from_model(model.to(where, dtype), tokenizer, sids)
    recaller.recall(prompts[:16], top_n=10, beam_width=20)  # warm-up
    if where == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    ranked = recaller.recall(prompts, top_n=10, beam_width=20)
    seconds = time.perf_counter() - start
    tops[name] = [[ad for ad, _ in r] for r in ranked]
    hits = [e["target"] in top for e, top in zip(examples, tops[name])]
    results[name] = {"users": len(prompts), "seconds": round(seconds, 3), "users_per_s": round(len(prompts) / seconds, 1),
                     "recall@10": sum(hits) / len(hits)}
reference = tops["cpu/float32"]
for name in results:
    results[name]["same_top10_order_as_cpu"] = sum(a == b for a, b in zip(tops[name], reference))
    results[name]["same_top10_set_as_cpu"] = sum(set(a) == set(b) for a, b in zip(tops[name], reference))
print(json.dumps(results, indent=1))
json.dump(results, open(out, "w"), indent=1)
EOF

# `leadre evaluate` on the device: the CLI path of the same search (200 validation users, no baselines)
step evaluate 180 $L evaluate --model "$WORK/sft" --data "$WORK/data" --sids "$WORK/sids" --out "$WORK/evaluation" \
  --users 200 --no-baselines --device "$DEVICE"

# the decode benchmark per backend (random `small` model, 10,000 ads, beam 20); the reference is float32 on the device;
# then ONNX Runtime against PyTorch eager on this machine's CPU (fewer batch sizes: the CPU is the slow part)
step decode_bench 180 $PY bench/decode_bench.py --threads "$THREADS" --users 4 --skip-hf --min-seconds 0.5 --ads "$BENCH_ADS" \
  --backends $BENCH_BACKENDS --batches $BATCHES --out "$OUT/decode.json"
step decode_bench_cpu 150 $PY bench/decode_bench.py --threads "$THREADS" --users 4 --skip-hf --min-seconds 0.5 --ads "$BENCH_ADS" \
  --backends torch onnx --batches 1 16 --out "$OUT/decode_cpu.json"

# compile: ONNX export and parity on the trained model, timings on the CPU and the device, auto's choice
step compile 240 $L compile --model "$WORK/sft" --out "$WORK/compiled" --device "$DEVICE" --int8 --sids "$WORK/sids" \
  --prompts "$WORK/prompts" && cp "$WORK/compiled/manifest.json" "$OUT/compile_manifest.json"
# TensorRT is not in this image: the command must refuse with a message and exit status 2, not a traceback
step compile_tensorrt_refusal 120 bash -c "$L compile --model '$WORK/sft' --out '$WORK/compiled-trt' --device '$DEVICE' \
  --backend tensorrt; test \$? -eq 2"

# a bundle carrying the compiled artifact, loaded on the device with each backend
step bundle 120 $L bundle --model "$WORK/sft" --sids "$WORK/sids" --data "$WORK/data" --compiled "$WORK/compiled" \
  --out "$WORK/bundle"
step bundle_load 120 $PY - "$WORK/bundle" "$DEVICE" <<'EOF'
import sys
from leadre.bundle import RecallBundle
from leadre.prompts import UserHistory

tops = {}
for backend in ("auto", "torch", "onnx"):
    bundle = RecallBundle.load(sys.argv[1], device=sys.argv[2], backend=backend)
    users = [UserHistory(f"u{i}", {}, list(bundle.ads.index[i : i + 5]), []) for i in range(0, 40, 5)]
    tops[backend] = [[ad for ad, _ in r] for r in bundle.recall(users, k=10)]
    print(f"{backend} -> {bundle.recaller.backend} ({bundle.recaller.backend_reason}); first user {tops[backend][0][:5]}")
print("same top-10, onnx vs torch:", sum(a == b for a, b in zip(tops["onnx"], tops["torch"])), "/", len(tops["torch"]))
EOF

# compiled PyTorch variants last: their compilation takes the longest, and a timeout here loses nothing else
if [ "$DEVICE" = cuda ]; then
  step decode_bench_compiled 120 $PY bench/decode_bench.py --threads "$THREADS" --users 4 --skip-hf --ads "$BENCH_ADS" \
    --min-seconds 0.5 --backends torch:cuda torch-compile:cuda torch-cudagraphs:cuda --batches 1 16 64 \
    --out "$OUT/decode_compiled.json"
fi
echo "total: $(( $(date +%s) - started ))s" | tee -a "$SUMMARY"
