#!/usr/bin/env bash
# The GPU suite as one prepared command for a short, borrowed GPU slot.
#
# The borrowed machine has Python 3.12 with torch, torchvision, numpy, pillow and httpx, but not
# this project's other packages, and no network. So the packages travel as wheels:
#
#   bash benchmarks/device_run.sh fetch            # here, once, with PyPI: wheels into .whl/
#   bash benchmarks/device_run.sh run [ARGS...]    # there: install .whl/, run gpu_suite.py ARGS
#
# `run` writes gpu_suite.json and gpu_suite.log to $OUT (default: ./gpu_out). Keep .whl/ out of git
# (`echo /.whl/ >> .git/info/exclude`) and carry it to the machine with the working tree.
# faiss-cpu travels (FAISS-GPU's CUDA libraries are too large): the server and the gallery then
# search with the exact torch matmul on the GPU, which is what they do without FAISS-GPU anyway.
set -euo pipefail

# The packages the suite needs beyond that machine's image; versions are this checkout's venv's
# where it has them, so pydantic and pydantic-core stay a matching pair.
WHEELS=(open_clip_torch ftfy wcwidth simplejpeg faiss-cpu fastapi starlette pydantic pydantic-core
        annotated-types typing-inspection typing-extensions uvicorn python-multipart
        fastapi-offline opentelemetry-api importlib-metadata)
WHEEL_DIR=${WHEEL_DIR:-.whl}
TARGET_PYTHON=${TARGET_PYTHON:-3.12}

pinned() {  # NAME -> NAME==VERSION from the local venv, or NAME alone
    local version
    version=$(.venv/bin/python -m pip show "$1" 2>/dev/null | sed -n 's/^Version: //p' || true)
    if [[ -n "$version" ]]; then echo "$1==$version"; else echo "$1"; fi
}

fetch() {
    mkdir -p "$WHEEL_DIR"
    local specs=()
    for name in "${WHEELS[@]}"; do specs+=("$(pinned "$name")"); done
    python3 -m pip download --quiet --no-deps --only-binary=:all: \
        --python-version "$TARGET_PYTHON" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$WHEEL_DIR" "${specs[@]}"
    du -sh "$WHEEL_DIR"
}

run() {
    local out=${OUT:-$PWD/gpu_out} site=/tmp/vvireid-site ns=/tmp/vvireid-ns
    mkdir -p "$out" "$ns/vvireid"
    python3 -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" "$WHEEL_DIR"/*.whl
    # The source folders import as vvireid.<package>, as an installed checkout does.
    for package in model indexer training server; do
        ln -sfn "$PWD/$package" "$ns/vvireid/$package"
    done
    export PYTHONPATH="$ns:$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$out/gpu.txt" || true
    python3 benchmarks/gpu_suite.py --out "$out/gpu_suite.json" "$@" 2>&1 | tee "$out/gpu_suite.log"
}

case "${1:-}" in
    fetch) fetch ;;
    run) shift; run "$@" ;;
    *) echo "usage: $0 fetch | run [gpu_suite.py arguments]" >&2; exit 2 ;;
esac
