#!/usr/bin/env bash
# The one-shot GPU check (benchmarks/gpu_check.py has the details): fit() under the CUDA sync
# debug mode with default settings, 1-process DDP/NCCL with SyncBatchNorm2d compiled around DDP,
# fit() compiled through freeze/unfreeze, time to 94% on Fashion-MNIST and the JPEG folder
# pipeline against torchvision's way, then step throughput of resnet50/resnet20 in fp32/bf16/fp16.
# Inside 8 minutes on one H100 including compilation: the script reserves each part's time before
# starting it, and `timeout` ends the whole run at GPU_CHECK_TIMEOUT seconds (default 470; the
# JSON is rewritten after every part, so a cut-short run keeps what it measured).
#   bash benchmarks/gpu_check.sh --results-dir DIR   # needs CUDA; exits 2 without it
#   bash benchmarks/gpu_check.sh --no-compile        # leave out every compiled setting
#   bash benchmarks/gpu_check.sh --dry-run           # CPU, tiny shapes: every code path, no numbers
# Writes DIR/gpu-*.json (default benchmarks/results/). Exit 0 ok, 1 a check failed, 2 no CUDA,
# 124 the timeout ended it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
exec timeout --kill-after=15 "${GPU_CHECK_TIMEOUT:-470}" "$PY" -m benchmarks.gpu_check "$@"
