# Sourced by the GPU scripts (gpu_check.sh, gpu_trie_check.sh): the results folder, the log, and the Python
# packages the device image lacks, installed from the carried wheels in .whl (SKIP_WHEELS=1 on a machine that has
# them), and `step`. Expects PY and OUT; sets SUMMARY and started.
mkdir -p "$OUT"
SUMMARY=$OUT/summary.txt
: >"$SUMMARY"
exec > >(tee "$OUT/log.txt") 2>&1
started=$(date +%s)

if [ "${SKIP_WHEELS:-0}" != 1 ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || { echo "wheel install FAILED" | tee -a "$SUMMARY"; exit 1; }
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

# step NAME TIMEOUT COMMAND...: run, time and record one step; a failed step does not stop the later ones
step() {
  local name=$1 limit=$2
  shift 2
  local t0=$(date +%s)
  echo "=== $name ($(date -u +%H:%M:%S))"
  timeout "$limit" "$@"
  local rc=$?
  echo "$name: rc=$rc $(( $(date +%s) - t0 ))s" | tee -a "$SUMMARY"
  return $rc
}
