#!/usr/bin/env bash
# The GPU correctness check in one device call, from the repo root, with the kit carried (.gpu-kit):
#   bash scripts/gpu_e2e.sh [COMMIT]
# Installs (gpu_setup.sh), runs the GPU op tests against the reference, then serves the tiny checkpoints
# with and without DFLASH, CUDA graphs on, and compares greedy outputs (scripts/gpu_e2e.py): in float16
# with triton and flashinfer drafter attention (the exact check; SGLang's CUDA RMSNorm has no float32),
# and, with GPU_E2E_BF16=1, in bfloat16 with triton (reported with the logit margin wherever outputs part:
# bf16 near-ties round differently in decode and extend kernels). Results go to $OUT (or ./gpu-out).
set -uo pipefail
source scripts/gpu_setup.sh
commit="${1:-}"
DFLASH_KERNELS=on timeout 150 python3 -m pytest -q tests/test_op_inject_kv.py tests/test_op_verify_block.py tests/test_op_block_attention.py tests/test_op_step_ops.py > "$out/gpu_tests.log" 2>&1
tail -1 "$out/gpu_tests.log"
status=0
timeout 420 python3 scripts/gpu_e2e.py --out "$out/gpu_e2e-fp16.json" --logs "$out/logs-fp16" --dtype float16 \
  --cuda-graph --draft-backends triton flashinfer ${commit:+--commit "$commit"} 2>&1 | tail -7 || status=1
[ "${GPU_E2E_BF16:-0}" = 1 ] && timeout 200 python3 scripts/gpu_e2e.py --out "$out/gpu_e2e-bf16.json" --logs "$out/logs-bf16" --dtype bfloat16 \
  --cuda-graph --draft-backends triton ${commit:+--commit "$commit"} 2>&1 | tail -5
exit $status
