#!/usr/bin/env bash
# The one-shot GPU check: throughput of resnetlab's step vs the idiomatic torchvision
# loop (resnet50 @224, resnet20 @32; fp32/bf16/fp16; eager/compiled; channels_last), peak memory,
# a 1-process DDP/NCCL run, and 20 steps under the CUDA sync debug mode. Under 8 min on one H200.
#   bash benchmarks/gpu_check.sh             # needs CUDA; exits 2 without it
#   bash benchmarks/gpu_check.sh --dry-run   # CPU, tiny shapes: every code path, no numbers
# Writes benchmarks/results/gpu-*.json and prints a table. Exit 0 ok, 1 a check failed, 2 no CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m benchmarks.gpu_check "$@"
