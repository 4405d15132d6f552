# SPDX-License-Identifier: Apache-2.0
"""Finds the CUDA extension ``dflash_sglang._C``: the wheel-built module, else a cached JIT build.

Loaded lazily and once. ``pip install -e .`` builds the extension where torch and nvcc are importable at
build time (``--no-build-isolation``); otherwise the first use on a GPU compiles ``csrc/`` with
``torch.utils.cpp_extension.load`` into a cached build folder (``DFLASH_BUILD_DIR`` or
``~/.cache/dflash_sglang``), when nvcc is on the machine.
"""

from __future__ import annotations

import functools
import glob
import importlib
import logging
import os

import torch

from dflash_sglang.core.config import kernel_build_dir
from dflash_sglang.ops.build_flags import CXX_FLAGS, DEFAULT_ARCH_LIST, NVCC_FLAGS

logger = logging.getLogger(__name__)
CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc")
MIN_CAPABILITY = (9, 0)


class ExtensionUnavailable(ImportError):
    """The CUDA extension cannot be used here; the message says why and what to do."""


@functools.cache
def load_ext() -> None:
    """Registers ``torch.ops.dflash.*``; raises :class:`ExtensionUnavailable` naming the fix."""
    if not torch.cuda.is_available():
        raise ExtensionUnavailable("the dflash CUDA kernels need a CUDA GPU; none is visible to torch")
    capability = torch.cuda.get_device_capability()
    if capability < MIN_CAPABILITY:
        raise ExtensionUnavailable(
            f"dflash_sglang._C is built for sm_90 (Hopper) and newer; this GPU is sm_{capability[0]}{capability[1]}. "
            "Set DFLASH_KERNELS=off to use the PyTorch path")
    try:
        importlib.import_module("dflash_sglang._C")
        return
    except ImportError as error:
        built_error = error
    sources = sorted(glob.glob(os.path.join(CSRC, "*.cpp")) + glob.glob(os.path.join(CSRC, "*.cu")))
    if not sources:
        raise ExtensionUnavailable(
            f"dflash_sglang._C is not built ({built_error}) and no csrc/ sources are next to the package to JIT "
            "build it: run `pip install --no-build-isolation -e .` on an sm_90 host with nvcc, or set "
            "DFLASH_KERNELS=off")
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        raise ExtensionUnavailable(
            "dflash_sglang._C is not built and nvcc (CUDA_HOME) is not found for a JIT build: install the CUDA "
            "toolkit matching torch, run `pip install --no-build-isolation -e .`, or set DFLASH_KERNELS=off")
    build_dir = kernel_build_dir()
    os.makedirs(build_dir, exist_ok=True)
    logger.info("JIT-building dflash_sglang._C from %s into %s (first use only)", CSRC, build_dir)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    cpp_extension.load(name="dflash_sglang_C", sources=sources, build_directory=build_dir,
                       extra_cuda_cflags=NVCC_FLAGS, extra_cflags=CXX_FLAGS, is_python_module=False,
                       verbose=False)
