#!/usr/bin/env bash
# GPU check (issue 8): PEER layer + a short model step on CUDA against the CPU reference (tolerances),
# then timings of the standard and N = 1024² configs. A table on stdout; JSON in $OUT/gpu_check.json
# when $OUT is set (else benchmarks/results/gpu_check.json). Exit 0: all checks passed, 1: a check
# failed, 2: the environment cannot run it. Budget: well under 10 minutes on one GPU (GPU_CHECK_TIMEOUT,
# default 540 s, bounds the Python part; partial JSON is written after each stage).
#
#   bash benchmarks/gpu_check.sh            # full
#   bash benchmarks/gpu_check.sh --quick    # smoke run (small timings)
#   PYTHON=/path/to/python bash benchmarks/gpu_check.sh
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
# the checkout itself, installed or not (the layer, optimizer and model need no streams/cli)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# the CPU reference is impl="naive": no C++ kernel build on the GPU machine
export LPEER_NATIVE=0
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"

fail() { echo "gpu_check: $*" >&2; exit 2; }

command -v "$PY" >/dev/null 2>&1 || fail "no '$PY' on PATH (set PYTHON=...)"
"$PY" - <<'PYEOF' || exit 2
import importlib.util, sys
missing = [m for m in ("torch", "numpy", "safetensors") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_check: missing Python packages: {', '.join(missing)}")
import torch
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: torch {torch.__version__} sees no CUDA device")
print(f"gpu_check: torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}")
PYEOF
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi

json="${OUT:+$OUT/gpu_check.json}"
json="${json:-benchmarks/results/gpu_check.json}"
status=0
timeout "${GPU_CHECK_TIMEOUT:-540}" "$PY" benchmarks/gpu_check.py --out "$json" "$@" || status=$?
case "$status" in
    0) ;;
    1) echo "gpu_check: some GPU results differ from the CPU reference (table above, $json)" >&2 ;;
    124) echo "gpu_check: timed out after ${GPU_CHECK_TIMEOUT:-540} s; partial results in $json" >&2 ;;
    *) echo "gpu_check: failed with status $status" >&2 ;;
esac
exit "$status"
