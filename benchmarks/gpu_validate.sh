#!/usr/bin/env bash
# The GPU kit in one command on the GPU machine: install the carried wheels, then run benchmarks/gpu_validate.py.
#
#   benchmarks/gpu_validate.sh OUT_DIR [gpu_validate.py options, e.g. --stages llama8b_lora profile]
#
# The wheels come from scripts/fetch_gpu_wheels.sh (run here, before the call) into .whl/ (git-ignored), and the
# device call carries them (docs/gpu_kit.md gives the exact call). They are installed into a scratch folder with
# --no-index --no-deps (nothing can be fetched there) and put first on PYTHONPATH, over the image's transformers.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: benchmarks/gpu_validate.sh OUT_DIR [gpu_validate.py options]}
shift
SITE=${COCONUT_GPU_SITE:-/tmp/coconut_gpu_site}
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
    export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    echo "note: no .whl/*.whl here (scripts/fetch_gpu_wheels.sh); using the installed packages" >&2
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
exec "$PY" benchmarks/gpu_validate.py --out "$OUT" "$@"
