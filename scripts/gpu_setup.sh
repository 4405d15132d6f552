#!/usr/bin/env bash
# Sourced by the GPU scripts (gpu_e2e.sh, bench_gpu.sh) at the repo root on the device machine, with the kit
# carried (.gpu-kit): installs the SGLang kit and this package (its SGLang hook included), checks that
# DFLASH is registered and that the CUDA extension builds. Sets $out (results folder: $OUT or ./gpu-out).
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
