# SPDX-License-Identifier: Apache-2.0
"""The Triton kernels compiled for an H100/H200 (sm_90) on any machine, GPU or not: Triton's own pipeline, AST to
cubin (its bundled ptxas), at the compile-time settings the serving paths launch them with.

Triton's CPU interpreter runs the kernels' Python, so what only the compiler refuses (a plain global read inside
a kernel, a constexpr misused, a shape the layouts cannot take) passes every interpreter test and fails on the GPU
at the first launch: here it fails on the CPU. Arguments not named in a case's types are 32-bit integers.
"""

from __future__ import annotations

import inspect

import pytest

triton = pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from dflash_sglang.ops import block_attention, decode_mlp_kernel  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
HOPPER_SMS = 132  # an H100 SXM's (an H200's too)
HOPPER_SHARED_MEMORY = 227 * 1024  # shared memory a program may opt into on sm_90


def compile_for_hopper(kernel, constexprs: dict, types: dict, num_warps: int = 4, num_stages: int = 3):
    """``kernel`` compiled for sm_90 with these compile-time values; parameter types from ``types`` (else i32)."""
    names = list(inspect.signature(kernel.fn).parameters)
    unknown = sorted(set(constexprs) - set(names))
    assert not unknown, f"{kernel.fn.__name__} has no parameters {unknown}"
    signature = {name: "constexpr" if name in constexprs else types.get(name, "i32") for name in names}
    source = ASTSource(kernel, signature=signature,
                       constexprs={(names.index(name),): value for name, value in constexprs.items()})
    return triton.compile(source, target=HOPPER, options={"num_warps": num_warps, "num_stages": num_stages})


BLOCK_TYPES = {**{name: "*bf16" for name in ("Q", "K_block", "V_block", "K_cache", "V_cache", "O")},
               "kv_indptr": "*i32", "kv_indices": "*i64", "kv_slot_map": "*i64", "O_part": "*fp32",
               "Lse_part": "*fp32", "Split_counters": "*i32", "qk_scale": "fp32"}
# (name, _partial's compile-time values): Gemma-4-26B-A4B's sliding decode (the last split merges), its global
# decode (GQA 8, 512-wide heads), and a 16-token verify block (a separate merge).
PARTIAL_CASES = [
    ("sliding-decode", dict(BLOCK_SIZE=1, GROUP=2, HEAD_DIM=256, CAUSAL=True, HAS_WINDOW=True, HAS_SLOT_MAP=True,
                            LISTED_BLOCK=True, ROW_CHUNKS=1, BLOCK_M=16, BLOCK_D=256, BLOCK_N=64, BLOCK_KB=16,
                            DIRECT=False, MERGE_IN_LAST=True, FOLD_ROWS=2, FOLD_SPLITS=block_attention.MAX_SPLITS)),
    ("global-decode", dict(BLOCK_SIZE=1, GROUP=8, HEAD_DIM=512, CAUSAL=True, HAS_WINDOW=False, HAS_SLOT_MAP=False,
                           LISTED_BLOCK=True, ROW_CHUNKS=1, BLOCK_M=16, BLOCK_D=512, BLOCK_N=32, BLOCK_KB=16,
                           DIRECT=False, MERGE_IN_LAST=True, FOLD_ROWS=8, FOLD_SPLITS=block_attention.MAX_SPLITS)),
    ("verify-block", dict(BLOCK_SIZE=16, GROUP=2, HEAD_DIM=256, CAUSAL=True, HAS_WINDOW=True, HAS_SLOT_MAP=True,
                          LISTED_BLOCK=False, ROW_CHUNKS=1, BLOCK_M=32, BLOCK_D=256, BLOCK_N=64, BLOCK_KB=16,
                          DIRECT=False, MERGE_IN_LAST=False, FOLD_ROWS=32, FOLD_SPLITS=block_attention.MAX_SPLITS)),
]


@pytest.mark.parametrize(("name", "constexprs"), PARTIAL_CASES, ids=[case[0] for case in PARTIAL_CASES])
def test_block_attention_partial_compiles_for_hopper(name, constexprs):
    block_m, block_d = constexprs["BLOCK_M"], constexprs["BLOCK_D"]
    compiled = compile_for_hopper(block_attention._partial, constexprs, BLOCK_TYPES,
                                  num_warps=block_attention.partial_warps(block_m, block_d),
                                  num_stages=block_attention.pipeline_stages(block_d, 2, HOPPER_SHARED_MEMORY))
    assert "cubin" in compiled.asm and compiled.metadata.shared <= HOPPER_SHARED_MEMORY


def test_block_attention_merge_compiles_for_hopper():
    constexprs = dict(BLOCK_SIZE=16, GROUP=2, HEAD_DIM=256, HAS_WINDOW=True, LISTED_BLOCK=False, ROW_CHUNKS=1,
                      BLOCK_M=32, BLOCK_D=256, BLOCK_N=64, MERGE_ROWS=8)
    types = {"O_part": "*fp32", "Lse_part": "*fp32", "O": "*bf16", "kv_indptr": "*i32"}
    assert "cubin" in compile_for_hopper(block_attention._merge, constexprs, types).asm


MLP_TYPES = {"X": "*bf16", "Logits": "*fp32", "W13": "*bf16", "W2": "*bf16", "Act": "*bf16", "Out": "*bf16"}
# Gemma-4-26B-A4B's routed experts (128 x 704, top 8) and its dense MLP (2112), one token, the default launch.
MLP_SHAPES = [("experts", dict(HIDDEN=2816, INTER=704, TOP_K=8, ROUTED=True, BLOCK_E=128)),
              ("dense", dict(HIDDEN=2816, INTER=2112, TOP_K=1, ROUTED=False, BLOCK_E=128))]


@pytest.mark.parametrize(("name", "shape"), MLP_SHAPES, ids=[case[0] for case in MLP_SHAPES])
def test_decode_mlp_kernels_compile_for_hopper(name, shape):
    launch, kernel = decode_mlp_kernel.DEFAULT_LAUNCH, decode_mlp_kernel
    hidden, inter, rows = shape["HIDDEN"], shape["INTER"], shape["TOP_K"]  # one token: TOP_K rows
    gate_up = dict(shape, TANH_GELU=not shape["ROUTED"], BLOCK_N=kernel._block_n(rows, inter, HOPPER_SMS, launch),
                   BLOCK_K=kernel._block_k(hidden, launch))
    down = dict(shape, BLOCK_N=kernel._block_n(1, hidden, HOPPER_SMS, launch), BLOCK_K=kernel._block_k(inter, launch))
    for kernel, constexprs in ((decode_mlp_kernel._gate_up_kernel, gate_up), (decode_mlp_kernel._down_kernel, down)):
        assert "cubin" in compile_for_hopper(kernel, constexprs, MLP_TYPES, num_warps=launch.num_warps).asm
