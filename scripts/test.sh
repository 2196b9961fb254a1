#!/usr/bin/env bash
# Sets everything up, then runs the test suite (CPU backend on emulated clusters; GPU tests
# skip without a GPU and say why).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m pytest -q -rs tests "$@"
