#!/usr/bin/env bash
# GPU throughput of the backbone pass (see bench/gpu.py): model only, end to end with CPU and
# with GPU (nvJPEG) decoding. Needs only torch, timm (+ torchvision), numpy; no network.
#   bench/gpu.sh            # EfficientNet-B4 at 380 px, bf16, channels_last; < 5 minutes
#   bench/gpu.sh --smoke    # a tiny run that also works on a CPU-only machine
# PYTHON=/path/to/python picks the interpreter (default: .venv/bin/python if present).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
exec timeout 290 "$PYTHON" bench/gpu.py "$@"
