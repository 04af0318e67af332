#!/usr/bin/env bash
# The trie-on-the-GPU check (issue 9: the trie's share of a step ≤ 1% on a GPU), under 2 minutes, from the
# repository root of a CUDA machine; carry .whl (the wheels bench/gpu_check.sh installs):
#
#   bash bench/gpu_trie_check.sh
#   DEVICE=cpu PYTHON=.venv/bin/python SKIP_WHEELS=1 OUT=/tmp/trie-check BATCHES=1 ADS=2000 \
#     bash bench/gpu_trie_check.sh                                                 # dry run on a CPU machine
#
# 1. the decode benchmark on the device: its trie-mask section (a) and every backend's trie share of a step (c),
#    the trie placed on the backend's device, without and with 50 seen ads per user excluded;
# 2. the search on the device against the host on the same model, trie and users (seen ads excluded), and one
#    search_batch with the model's own calls unwatched under torch.cuda.set_sync_debug_mode("error"): the search's
#    masks, top-k and gathers must never make the host wait.
# Results go to $OUT: summary.txt, log.txt, decode_trie.json.
set -uo pipefail

DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu-trie-check-out}
BATCHES=${BATCHES:-1 4 16 64}
ADS=${ADS:-10000}
source "$(dirname "$0")/gpu_setup.sh"

{ date -u; command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"; } | tee -a "$SUMMARY"

timeout 90 $PY bench/decode_bench.py --threads 8 --users 4 --skip-hf --min-seconds 0.5 --ads "$ADS" \
  --backends torch:$DEVICE torch:$DEVICE:bfloat16 --batches $BATCHES --out "$OUT/decode_trie.json"
echo "decode_bench: rc=$? $(( $(date +%s) - started ))s" | tee -a "$SUMMARY"
$PY - "$OUT/decode_trie.json" <<'EOF' 2>&1 | tee -a "$SUMMARY"
import json, sys
result = json.load(open(sys.argv[1]))
print("section (a), cpu: mask % of step per level", [round(x, 2) for x in result["masking"]["mask_pct_of_step_per_level"]])
for spec, rows in result["backends"]["backends"].items():
    for r in rows:
        print(f"{spec} batch {r['batch']}: step {r['step_ms_median']:.2f} ms, trie {r['trie_pct_of_step']:.2f}% of it "
              f"({r['trie_pct_of_step_seen']:.2f}% with seen ads), {r['users_per_s']:.0f} users/s, "
              f"same top-10 {r['same_top_n_users']}/{r['batch']}")
EOF

timeout 60 $PY - "$DEVICE" "$ADS" <<'EOF' 2>&1 | tee -a "$SUMMARY"
import copy, sys
import numpy as np
import torch
sys.path.insert(0, "bench")
from decode_bench import make_model, synthetic_sids
from leadre.decode import HFStepModel, exclusion_keys, left_pad, search, search_batch
from leadre.trie import build_trie

device = torch.device(sys.argv[1])
torch.set_num_threads(8)
codes, level_sizes = synthetic_sids(int(sys.argv[2]), 256, 3, seed=0)
model, ordinary = make_model(level_sizes, seed=0)
offsets = ordinary + np.cumsum((0, *level_sizes[:-1]))
ad_ids = np.array([f"ad{i}" for i in range(len(codes))], dtype=object)
token_ids = [np.arange(k) + o for k, o in zip(level_sizes, offsets)]
trie = build_trie(codes, ad_ids, np.ones(len(codes), bool), level_sizes, token_ids)
rng = np.random.default_rng(1)
prompts = [rng.integers(1, ordinary, rng.integers(64, 129)).tolist() for _ in range(16)]
seen = [set(rng.choice(ad_ids, 50, replace=False)) for _ in prompts]
host = search(HFStepModel(model), trie, prompts, 10, 20, exclude=seen, progress=False)
on_device = HFStepModel(copy.deepcopy(model).to(device))
placed = trie.to(device)
ours = search(on_device, placed, prompts, 10, 20, exclude=seen, progress=False)
same = sum([a for a, _ in x] == [a for a, _ in y] for x, y in zip(ours, host))
leaked = sum(bool({a for a, _ in r} & s) for r, s in zip(ours, seen))
print(f"search on {device} vs cpu, 50 seen ads excluded: same top-10 {same}/{len(prompts)}, seen ads returned {leaked}")

class Unwatched:  # the model's own synchronisations are not the search's
    def __init__(self, model): self.model, self.device = model, model.device
    def _call(self, name, *args):
        torch.cuda.set_sync_debug_mode("default")
        try: return getattr(self.model, name)(*args)
        finally: torch.cuda.set_sync_debug_mode("error")
    def prefill(self, *args): return self._call("prefill", *args)
    def step(self, *args): return self._call("step", *args)

if device.type == "cuda":
    ids, mask = (t.to(device) for t in left_pad(prompts))
    excluded = exclusion_keys(placed, seen)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        search_batch(Unwatched(on_device), placed, ids, mask, 10, 20, excluded)
        print("search_batch on cuda: no host synchronisation outside the model's calls")
    except RuntimeError as e:
        print("search_batch on cuda SYNCHRONISED:", str(e).splitlines()[0])
    finally:
        torch.cuda.set_sync_debug_mode("default")
EOF
echo "search_check: rc=${PIPESTATUS[0]}" | tee -a "$SUMMARY"
echo "total: $(( $(date +%s) - started ))s" | tee -a "$SUMMARY"
