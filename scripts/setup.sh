#!/usr/bin/env bash
# Creates .venv with the pinned CPU torch and builds dispatch in place. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
# torch==2.13.0 is the CPU build on this machine's disk; a bare `torch` would pull a CUDA build.
python -m pip install -q "torch==2.13.0" "pybind11>=2.10" numpy pytest tqdm matplotlib setuptools wheel
python -m pip install -q --no-build-isolation -e .
