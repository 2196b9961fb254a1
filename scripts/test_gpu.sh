#!/usr/bin/env bash
# Builds the package (with dispatch._cuda where nvcc is found) and runs only the CUDA-backend tests,
# each on the GPU and on the SIMT runtime (dispatch._simt, the same kernels on the CPU).
# Meant for the lent GPU machine (torch+cu13, pybind11, cupy, NCCL preinstalled, no registry):
#   bash scripts/test_gpu.sh            # extra pytest args pass through, e.g. -x -k graph
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
# The loopback runs L virtual ranks whose kernels wait on each other (dispatch/testing.py):
# load every kernel up front and give every stream its own hardware queue.
export CUDA_MODULE_LOADING=${CUDA_MODULE_LOADING:-EAGER}
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-32}
"$PYTHON" -m pip install --no-build-isolation -e . -q
"$PYTHON" -c "import dispatch._cuda" || { echo "dispatch._cuda did not build (see the pip warnings above)"; exit 1; }
# Every test on both devices (DISPATCH_TEST_DEVICES=cuda restricts the run to the GPU).
"$PYTHON" -m pytest -q -rs tests/test_cuda_*.py "$@"
