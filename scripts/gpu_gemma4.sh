#!/usr/bin/env bash
# Gemma 4 on the GPU in one device call, from the repo root, with the kit carried (.gpu-kit):
#   GEMMA4_E2E="gemma4-dense gemma4-moe" COMMIT=abc1234 bash scripts/gpu_gemma4.sh [bench_step.py arguments...]
# Installs (gpu_setup.sh), then runs these steps, in the order GEMMA4_STEPS names them (default
# "ops tune bench e2e golden"; a step without its setting is skipped):
#   ops    GEMMA4_OPS=1: the GPU tests of the Gemma 4 Triton ops (norms, router, decode MLP) and the block
#          kernel's slot-map and decode-listing cases (~5 min: each case compiles its kernel); or a list of
#          SUITE[:EXPR] (suites norms, narrow, block, mlp; EXPR: pytest -k), e.g. "mlp:2816 block:listing";
#   tune   GEMMA4_TUNE_MOE="tune_moe.py arguments": tunes the fused-MoE kernel (within TUNE_TIMEOUT, default 300 s;
#          the config lands in the package, so later servers use it; moe_configs.tgz brings it back);
#   bench  given arguments: scripts/bench_step.py with them (within BENCH_TIMEOUT, default 400 s; its JSON is
#          written after each server);
#   e2e    for each GEMMA4_E2E target and each of E2E_LOOPS (default "overlap"; "v1" is SGLang's loop without
#          overlap): the tiny checkpoint served with and without DFLASH (float16, CUDA graphs; scripts/gpu_e2e.py
#          within E2E_TIMEOUT, default 300 s, plus E2E_ARGS); a target written "target:NAME=VALUE" runs with
#          that environment setting (e.g. gemma4-moe:DFLASH_DECODE_ATTENTION=block);
#   golden GEMMA4_GOLDEN=1: the GPU forward of the golden fixtures against transformers (tests/test_gemma4_gpu.py),
#          once per DFLASH_DECODE_ATTENTION mode in GEMMA4_GOLDEN_MODES (default "auto"; "sglang": SGLang's decode
#          kernel over the widened window listing).
# Results in $OUT (at most 8 files come back): the JSON reports, and logs.tgz with every server log and trace
# summary. Servers stop with their launcher (SIGTERM from a timeout included).
set -uo pipefail
source scripts/gpu_setup.sh
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv,noheader
logs=/tmp/gemma4-logs; mkdir -p "$logs"
trap 'tar czf "$out/logs.tgz" -C "$logs" . 2>/dev/null' EXIT

step_ops() {
  # GEMMA4_OPS: "1" (every suite) or a list of SUITE[:EXPR] (EXPR: pytest -k within the suite)
  local entry suite expr files
  local -A suites=([norms]="tests/test_op_residual_norm.py tests/test_op_qkv_norm_rope.py"
                   [narrow]=tests/test_op_narrow_linear.py [block]=tests/test_op_block_attention.py
                   [mlp]=tests/test_op_decode_mlp.py)
  local -A default_expr=([block]="slot_map or listing")
  local specs=${GEMMA4_OPS:-0}
  [ "$specs" = 0 ] && return 0
  [ "$specs" = 1 ] && specs="norms narrow block mlp"
  for entry in $specs; do
    suite=${entry%%:*}; expr=${default_expr[$suite]:-}; [ "$entry" != "$suite" ] && expr=${entry#*:}
    files=${suites[$suite]:-}
    [ -n "$files" ] || { echo "GEMMA4_OPS: no suite '$suite' (norms, narrow, block, mlp)"; continue; }
    echo "-- ops $suite ${expr:+(-k $expr)}"
    timeout 240 python3 -m pytest -q $files ${expr:+-k "$expr"} 2>&1 | tee "$logs/ops-$suite-gpu.log" \
      | grep -E "passed|failed|Error"
  done
}

step_tune() {
  [ -n "${GEMMA4_TUNE_MOE:-}" ] || return 0
  timeout "${TUNE_TIMEOUT:-300}" python3 scripts/tune_moe.py $GEMMA4_TUNE_MOE --report "$out/tune_moe.json" \
    ${COMMIT:+--commit "$COMMIT"} 2>&1 | tail -20
  tar czf "$out/moe_configs.tgz" -C dflash_sglang/serving moe_configs  # SGLang's file names do not come back
}

step_bench() {
  [ $# -gt 0 ] || return 0
  timeout "${BENCH_TIMEOUT:-400}" python3 scripts/bench_step.py --out "$out/step.json" --logs "$logs/step" \
    --trace-dir "$logs/traces" ${COMMIT:+--commit "$COMMIT"} "$@" 2>&1 | grep -v "^ " | tail -30
}

step_e2e() {
  local entry target setting name loop loop_args
  for entry in ${GEMMA4_E2E:-}; do
    target=${entry%%:*}; setting=; [ "$entry" != "$target" ] && setting=${entry#*:}
    name=$target${setting:+-${setting#*=}}
    for loop in ${E2E_LOOPS:-overlap}; do
      loop_args=(); [ "$loop" = v1 ] && loop_args=(--disable-overlap-schedule)
      env ${setting:+"$setting"} timeout "${E2E_TIMEOUT:-300}" python3 scripts/gpu_e2e.py --target "$target" \
        --dtype float16 --cuda-graph "${loop_args[@]}" --out "$out/gpu_e2e-$name-$loop.json" \
        --logs "$logs/e2e-$name-$loop" ${COMMIT:+--commit "$COMMIT"} ${E2E_ARGS:-} 2>&1 | tail -4
    done
  done
}

step_golden() {
  [ "${GEMMA4_GOLDEN:-0}" = 1 ] || return 0
  local mode
  for mode in ${GEMMA4_GOLDEN_MODES:-auto}; do
    echo "-- golden, DFLASH_DECODE_ATTENTION=$mode"
    DFLASH_DECODE_ATTENTION=$mode timeout 240 python3 -m pytest -q -s tests/test_gemma4_gpu.py 2>&1 \
      | tee "$logs/golden-gpu-$mode.log" | grep -E "served|passed|failed|Error" | tail -8
  done
}

for step in ${GEMMA4_STEPS:-ops tune bench e2e golden}; do
  echo "== $step ($(date +%T))"
  "step_$step" "$@"
done
