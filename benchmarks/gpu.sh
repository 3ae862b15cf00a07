#!/usr/bin/env bash
# Every GPU test and GPU benchmark of the project in one call, for a lent CUDA machine that
# already has torch, triton and pytest-benchmark. Writes one JSON report, $OUT/gpu_report.json
# (plus the raw junit XML and pytest-benchmark JSON beside it). Budget: under 8 minutes.
#   OUT=/some/folder bash benchmarks/gpu.sh
set -u
OUT=${OUT:?set OUT to the folder that receives the report}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET EMBEDCORE_BACKEND  # real Triton on the GPU
export PYTHONUNBUFFERED=1
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')" || exit 1

# The cpp backend's tests need the extension; building it is part of the run (16 cores: ~1 min).
timeout 180 python -m pip install -q --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 \
  || echo "extension build failed: see build.log (the cpp cases will fail, the triton ones still run)"

# Tests: every case that runs the triton backend (CUDA tensors when CUDA is present) or needs CUDA.
timeout 300 python -m pytest tests -q --continue-on-collection-errors -k "triton or cuda" -p no:cacheprovider \
  --junitxml="$OUT/gpu_tests.xml" 2>&1 | tail -n 30

# Benchmarks: the CUDA cases of every suite (ours vs the reference in the same run).
timeout 200 python -m pytest benchmarks -q -k "cuda" --benchmark-enable --benchmark-only -p no:cacheprovider \
  --benchmark-json="$OUT/gpu_bench.json" 2>&1 | tail -n 40

python benchmarks/gpu_report.py "$OUT"
