# SPDX-License-Identifier: Apache-2.0
"""Compiler flags of the CUDA extension, in one place for ``setup.py`` and the JIT build (no imports)."""

# An nvcc flag naming an arch makes torch ignore TORCH_CUDA_ARCH_LIST, so the arch is chosen here alone:
# sm_90 unless the user asks for others through TORCH_CUDA_ARCH_LIST.
DEFAULT_ARCH_LIST = "9.0"
NVCC_FLAGS = ["-O3", "-std=c++17", "--expt-relaxed-constexpr"]
CXX_FLAGS = ["-O3", "-std=c++17"]
DEBUG_NVCC_FLAGS = ["-O0", "-g", "-lineinfo", "-std=c++17", "--expt-relaxed-constexpr"]
DEBUG_CXX_FLAGS = ["-O0", "-g", "-std=c++17"]
