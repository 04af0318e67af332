#!/usr/bin/env bash
# MovieLens-1M quality on one GPU (issue 13's GPU budget; DPO on CUDA for issue 9), from the repository root of a
# CUDA machine; carry .whl and .gpu (the `leadre data movielens` output of ../shared/data/movielens-1m in
# .gpu/ml1m, the MiniLM embedding cache of its titles in .gpu/cache):
#
#   bash bench/gpu_quality.sh
#   DEVICE=cpu PYTHON=.venv/bin/python SKIP_WHEELS=1 OUT=/tmp/gpu-quality MINUTES=0.2 EVAL_USERS=100 \
#     bash bench/gpu_quality.sh                                                     # dry run on a CPU machine
#
# bench/quality.py with the `small` preset and leadre/configs/movielens-1m-gpu.yaml: S-IDs, prompts, SFT for
# $MINUTES on the device, DPO on the device, then the evaluation of both models and the baselines on every user
# (or $EVAL_USERS sampled) of the validation and test splits, decoded on the device. Should anything after SFT fail,
# the SFT model is still evaluated. Results go to $OUT: summary.txt, log.txt, quality-ml1m-gpu.{json,md} and the
# models' training records.
# Prepared here once: leadre data movielens --path ../shared/data/movielens-1m --out .gpu/ml1m, and the titles'
# embeddings copied from ~/.cache/leadre/embeddings/all-MiniLM-L6-v2 into .gpu/cache/all-MiniLM-L6-v2.
set -uo pipefail

DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu-quality-out}
WORK=${WORK:-/tmp/gpu-quality-work}
MINUTES=${MINUTES:-3.5}
EVAL_USERS=${EVAL_USERS:-}
rm -rf "$WORK"
mkdir -p "$WORK/cache"
source "$(dirname "$0")/gpu_setup.sh"
cp -r .gpu/cache "$WORK/cache/embeddings"
export LEADRE_CACHE=$WORK/cache

step quality 600 $PY bench/quality.py --data .gpu/ml1m --name ml1m-gpu --config leadre/configs/movielens-1m-gpu.yaml \
  --preset small --minutes "$MINUTES" --variants full --device "$DEVICE" --work "$WORK" \
  ${EVAL_USERS:+--eval-users "$EVAL_USERS"} && cp bench/results/quality-ml1m-gpu.json bench/results/quality-ml1m-gpu.md "$OUT/"
run=$WORK/ml1m-gpu
for model in sft-full dpo-full; do
  [ -f "$run/$model/leadre_model.json" ] && cp "$run/$model/leadre_model.json" "$OUT/$model.json"
done
if [ ! -f "$OUT/quality-ml1m-gpu.json" ] && [ -f "$run/sft-full/leadre_model.json" ]; then
  step evaluate_sft 240 $PY -m leadre.cli evaluate --model "$run/sft-full" --data .gpu/ml1m --sids "$run/sids" \
    --out "$WORK/evaluation-sft" --split both --device "$DEVICE" ${EVAL_USERS:+--users "$EVAL_USERS"} \
    && cp "$WORK/evaluation-sft/metrics.json" "$OUT/evaluation-sft.json"
fi
echo "total: $(( $(date +%s) - started ))s" | tee -a "$SUMMARY"
