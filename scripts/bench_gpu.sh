#!/usr/bin/env bash
# Step-cost benchmark in one device call, from the repo root, with the kit carried (.gpu-kit):
#   bash scripts/bench_gpu.sh [bench_step.py arguments...]
# Installs (gpu_setup.sh) and runs scripts/bench_step.py; JSON and server logs go to $OUT (or ./gpu-out).
set -uo pipefail
source scripts/gpu_setup.sh
python3 scripts/bench_step.py --out "$out/step.json" --logs "$out/step-logs" "$@"
