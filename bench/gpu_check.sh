#!/usr/bin/env bash
# The CUDA checks, for whoever has a GPU (under 8 minutes): sharded vs unsharded per-rank peaks on
# the GPUs, K ranks sharing one GPU when there are fewer GPUs than ranks (gloo), and a real OOM
# under a per-process memory fraction, plus the memory gate on CUDA. Writes OUT/results.json.
# Without CUDA it says so, writes a results.json that records the skip, and exits 0.
# Usage: bash bench/gpu_check.sh [OUT]   (default OUT: bench-results/gpu)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench-results/gpu}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export KERAS_BACKEND=torch

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: CUDA is not available on this machine; skipping the GPU checks."
  printf '{"meta": {"device": "cuda", "skipped": "CUDA not available"}, "rows": []}\n' > "$OUT/results.json"
  exit 0
fi

NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
echo "gpu_check: $NGPU GPU(s): $("$PY" -c "import torch; print(torch.cuda.get_device_name(0))")"
status=0
# 1+2+3: both modes at 1, 2, 4 ranks (NCCL with a GPU per rank, else gloo sharing GPUs); the budget
# is 3/4 of the largest size, so the unsharded largest build must OOM under the memory fraction.
timeout 360 "$PY" -m bench --device cuda --families mlp,transformer --sizes 256,1024 --ranks 1,2,4 \
  --budget auto --timeout 150 --out "$OUT" || status=1
# 4: the regression gate on CUDA.
timeout 90 "$PY" -m bench gate --device cuda | tee "$OUT/gate.txt" || status=1
exit $status
