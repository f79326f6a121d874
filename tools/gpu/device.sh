#!/usr/bin/env bash
# The GPU kit's stages on the GPU machine (no network); bench/GPU_RUNBOOK.md says which call runs which.
#
#   bash tools/gpu/device.sh STAGE [STAGE ...]
#   stages: collect check assemble export optimize tests bench   (tools/gpu/device.py says what each does)
#
# Runs from any folder (it moves to the repository root). Sets up, for every stage: PYTHONPATH with the
# kit's .gpu/site first (onnxruntime-gpu, diffusers and sdrt land there), LD_LIBRARY_PATH with the CUDA
# pip packages' library folders (onnxruntime's CUDA provider links to libcublas.so.13 and friends),
# unbuffered output with timestamps, and a copy of everything printed in $OUT/device.log.
# Stops at the first stage that fails, with its exit code.
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON=${PYTHON:-python3}
export KIT=${KIT:-$PWD/.gpu}
export OUT=${OUT:-$KIT/out}
export PYTHONPATH="$KIT/site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PIP_DISABLE_PIP_VERSION_CHECK=1
mkdir -p "$KIT" "$OUT"

if [ "$#" -eq 0 ]; then
  sed -n '2,10p' "$0"
  exit 2
fi

libs=$("$PYTHON" -m tools.gpu.device ld-path 2>/dev/null || true)
if [ -n "$libs" ]; then
  export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi

for stage in "$@"; do
  start=$SECONDS
  echo "[$(date +%H:%M:%S)] ===== $stage" | tee -a "$OUT/device.log"
  status=0
  "$PYTHON" -m tools.gpu.device "$stage" 2>&1 | tee -a "$OUT/device.log" || status=$?
  echo "[$(date +%H:%M:%S)] ===== $stage: exit $status after $((SECONDS - start)) s" | tee -a "$OUT/device.log"
  if [ "$status" -ne 0 ]; then
    exit "$status"
  fi
done
