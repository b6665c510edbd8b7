#!/usr/bin/env bash
# Getting `diffrt bench gpu` onto the lent GPU machine, whose image has torch, triton, transformers, onnx and
# pytest but no diffusers (see the README's GPU section).
#   here:   bash bench/gpu_machine.sh fetch     -> .whl/ (git-ignored): the diffusers wheel for Python 3.12
#   there:  source bench/gpu_machine.sh setup   -> diffusers installed under /tmp/site, diffrt importable
#           from this checkout (a tree of links in /tmp/src mirrors pyproject's package-dir mapping)
# The MiniLM text encoder's wheel (84 MB) is over what one call carries (64 MiB), so the embedded models'
# part of the suite is skipped there, saying so.
[[ "${BASH_SOURCE[0]}" == "$0" ]] && set -euo pipefail  # not when sourced: the caller's shell keeps its options
DIFFUSERS_VERSION="${DIFFUSERS_VERSION:-0.42.1}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

fetch() {
    cd "$ROOT"
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    rm -rf .whl && mkdir -p .whl
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "diffusers==${DIFFUSERS_VERSION}"
    ls -l .whl
}

setup() {
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$ROOT"/.whl/*.whl
    rm -rf /tmp/src && mkdir -p /tmp/src/diffrt
    for entry in "$ROOT"/runtime/*; do ln -s "$entry" /tmp/src/diffrt/; done
    for sub in kernels export bench; do ln -s "$ROOT/$sub" "/tmp/src/diffrt/$sub"; done
    export PYTHONPATH="/tmp/src:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
    python3 -c "import diffrt, diffusers; print('diffrt', diffrt.__version__, diffrt.__file__, 'diffusers', diffusers.__version__)"
}

case "${1:-}" in
    fetch) fetch ;;
    setup) setup ;;
    *) echo "usage: bash bench/gpu_machine.sh fetch (here) | source bench/gpu_machine.sh setup (there)" >&2 ;;
esac
