#!/usr/bin/env bash
# The whole GPU check in one device call, from the repo root, with the kit carried (.gpu-kit):
#   bash scripts/gpu_e2e.sh [triton flashinfer ...]       (draft attention backends; default: triton)
# Installs the SGLang kit, installs this package (its SGLang hook included), builds the CUDA extension,
# runs the GPU op tests against the reference, then serves the tiny checkpoints with and without DFLASH
# and compares greedy outputs (scripts/gpu_e2e.py). Results go to $OUT (or ./gpu-out).
set -uo pipefail
out="${OUT:-gpu-out}"; mkdir -p "$out"
export PYTHONUNBUFFERED=1 DFLASH_BUILD_DIR="${DFLASH_BUILD_DIR:-/tmp/dflash-build}"
# The image's default compiler links libstdc++ statically, which breaks torch's exception messages.
export CC=/usr/bin/gcc CXX=/usr/bin/g++
source .gpu-kit/install.sh >/dev/null 2>&1
if ! python3 -m pip install --no-deps --no-build-isolation -e . > "$out/pip.log" 2>&1; then
  # No setuptools in the image's venv (and no network for an isolated build): install what `pip install -e .`
  # would -- the repo on sys.path and the start-up hook -- by hand.
  site=$(python3 -c "import site; print(site.getsitepackages()[0])")
  echo "$PWD" > "$site/dflash_sglang_0repo.pth"  # sorts before the hook .pth, which imports the package
  cp dflash_sglang_hook.pth "$site/"
  echo "pip install -e . failed (see pip.log); installed the hook and repo path into $site" | tee -a "$out/pip.log"
fi
(cd /tmp && python3 -c "from sglang.srt.speculative.spec_info import SpeculativeAlgorithm as S; assert 'DFLASH' in S.__members__; print('DFLASH registered')") || exit 1
DFLASH_KERNELS=on python3 -c "from dflash_sglang.ops import kernels_available; print('kernels:', kernels_available())" 2>&1 | tail -1
DFLASH_KERNELS=on timeout 240 python3 -m pytest -q tests/test_op_inject_kv.py tests/test_op_verify_block.py > "$out/gpu_tests.log" 2>&1
tail -1 "$out/gpu_tests.log"
timeout 420 python3 scripts/gpu_e2e.py --out "$out/gpu_e2e.json" --logs "$out/logs" --draft-backends "${@:-triton}" 2>&1 | tail -6
