#!/usr/bin/env bash
# Creates .venv with pinned dependencies and builds vitq_kernels._C in place.
# Idempotent: a second run only rebuilds what changed.  Used by `make demo` and `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# pinned: torch/torchvision/triton as measured in ../shared/NOTES.md; triton pinned so pip
# does not fetch 3.9 first
.venv/bin/pip install -q --disable-pip-version-check -r requirements.txt

# Assets that are not on PyPI as importable packages (offline real data and weights)
source scripts/assets.sh

# The extension: CUDA kernels when torch is a CUDA build and nvcc exists (compile-only
# without a GPU), else CPU kernels only.  MAX_JOBS keeps the 2-core CI machine responsive.
MAX_JOBS=${MAX_JOBS:-2} .venv/bin/python setup.py -q build_ext --inplace
