#!/usr/bin/env bash
# One command for a GPU machine that has its own torch and Triton and no package registry:
#   bash bench/gpu_run.sh            (from the repository root; about 10 minutes on an H100/H200)
# Builds mmt_kernels._C in place for this GPU only, runs tests/gpu and the benchmarks, and writes
# bench/results/<device>.md (benchmark tables, then the GPU test summary). Installs nothing else.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STEP_TIMEOUT=${STEP_TIMEOUT:-240}
start=$(date +%s)
log() { echo "[gpu_run $(( $(date +%s) - start ))s] $*"; }

$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'" || { echo "gpu_run: needs a CUDA GPU"; exit 2; }
arch=$($PY -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}')")
device=$($PY -c "import torch; print(torch.cuda.get_device_name(0))")
slug=$(echo "$device" | sed 's/[^A-Za-z0-9_.-]\+/-/g; s/^-//; s/-$//')
log "device: $device (sm_${arch/./}); $($PY -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)')"

# Build in place against this torch, for this GPU only (a short build); no dependency resolution.
log "building mmt_kernels._C"
TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS=${MAX_JOBS:-8} $PY -m pip install -q --no-build-isolation --no-deps -e . \
  || { log "build failed"; exit 1; }
$PY -m mmt_kernels.info

mkdir -p bench/results
tests_out=$(mktemp)
log "tests/gpu"
timeout "$STEP_TIMEOUT" $PY -m pytest tests/gpu -q -p no:cacheprovider -rfEs > "$tests_out" 2>&1
tests_rc=$?
tail -n 25 "$tests_out"

if $PY -c "import pytest_benchmark" 2>/dev/null; then
  log "benchmarks"
  timeout "$STEP_TIMEOUT" $PY -m pytest bench -q -p no:cacheprovider --benchmark-only --benchmark-min-rounds=3 \
    --benchmark-max-time=0.5
  bench_rc=$?
else
  log "benchmarks skipped: pytest-benchmark is not installed (bring its wheel: pip install --no-deps <wheel>)"
  bench_rc=0
  [ -f "bench/results/$slug.md" ] || echo "# $device" > "bench/results/$slug.md"
fi

# The benchmark session wrote bench/results/<device>.md; add the GPU test summary to it.
results="bench/results/$slug.md"
{
  echo
  echo "## GPU tests ($(date -u +%Y-%m-%d))"
  echo
  echo '```'
  grep -E "passed|failed|error|FAILED|ERROR|SKIPPED" "$tests_out" | tail -n 40
  echo '```'
} >> "$results"
log "wrote $results (tests rc=$tests_rc, bench rc=$bench_rc)"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
