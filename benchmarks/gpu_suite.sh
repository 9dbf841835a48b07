#!/usr/bin/env bash
# Everything the GPU issue needs, in one device call: tests, then benchmarks, logs to $OUT.
#   bash benchmarks/gpu_suite.sh [tests|bench|all]
set -uo pipefail
OUT=${OUT:-/tmp/nanovllm-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:${PYTHONPATH:-}
what=${1:-all}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
run() { echo "=== $*"; "$@"; echo "=== exit $?"; }
if [[ $what == tests || $what == all ]]; then
  run python3 -m pytest -q -x -m gpu tests/kernels tests/gpu -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
fi
if [[ $what == bench || $what == all ]]; then
  run python3 -m nanovllm.cli.main bench latency --model benchmarks/configs/qwen3-0.6b 2>&1 | tee "$OUT/latency.log" | grep -v "^INFO" | tail -5
  run python3 -m nanovllm.cli.main bench throughput --model benchmarks/configs/qwen3-0.6b 2>&1 | tee "$OUT/throughput.log" | tail -5
  run python3 benchmarks/kernels_bench.py 2>&1 | tee "$OUT/kernels.log" | tail -30
fi
cp benchmarks/results/*.csv "$OUT/" 2>/dev/null || true
