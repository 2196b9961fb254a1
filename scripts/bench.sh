#!/usr/bin/env bash
# Sets everything up, then benchmarks dispatch/combine on an emulated 2-node x 4-rank CPU
# cluster against torch.distributed.all_to_all_single (extra arguments go to the benchmark).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m bench.all_to_all --nodes 2 --ranks-per-node 4 --tokens 4096 --hidden 2048 --topk 8 --experts 64 \
  --dtype bf16 "$@"
