#!/usr/bin/env bash
# Fetch the wheels the GPU machine lacks into .whl/ (git-ignored), at the versions pinned below.
#
# The GPU image (Python 3.12, torch 2.11+cu130, transformers 5.17, peft) has no deepspeed, pydantic or hjson, and
# nothing can be downloaded there; benchmarks/gpu_validate.sh installs these with pip --no-index --target.
# transformers is carried too: coconut_scale's KV-cache class relies on 5.2x internals.
#
#   scripts/fetch_gpu_wheels.sh            # from the repository root, in a venv that has torch (deepspeed's build)
#
# Fails when the total is over the 64 MiB a device call may carry.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.whl
LIMIT_MIB=64
mkdir -p "$DEST"
rm -f "$DEST"/*.whl

# deepspeed ships as an sdist; its wheel is py3-none-any when built without ops (the build imports torch).
DS_BUILD_OPS=0 python -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" deepspeed==0.19.8
# The one compiled wheel: for the GPU machine's interpreter, not this one.
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$DEST" pydantic-core==2.50.5
python -m pip download -q --no-deps --only-binary=:all: -d "$DEST" \
    pydantic==2.14.4 hjson==3.1.0 annotated-types==0.8.0 typing-inspection==0.4.5 transformers==5.24.0

ls -l "$DEST"/*.whl
total=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
echo "total: $((total / 1024 / 1024)) MiB ($total bytes) in $(ls "$DEST"/*.whl | wc -l) wheels"
if (( total > LIMIT_MIB * 1024 * 1024 )); then
    echo "error: $DEST holds more than the ${LIMIT_MIB} MiB a device call may carry" >&2
    exit 1
fi
