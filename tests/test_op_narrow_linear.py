# SPDX-License-Identifier: Apache-2.0
"""narrow_linear (a mixture-of-experts router's projection at decode): the reference against PyTorch's linear in
fp32, then the Triton kernel against the reference, on the GPU where there is one, else on the CPU through
Triton's interpreter (in a child pytest with ``TRITON_INTERPRET=1``, set before Triton is imported)."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from child_pytest import CUDA, triton_interpreter_rerun, triton_kernel_device

from dflash_sglang import ops
from dflash_sglang.ops.reference import narrow_linear_ref

# (tokens, in_features, out_features): Gemma-4-26B-A4B's router (2816 -> 128) at decode batches 1 and 8, an odd
# expert count and width
SHAPES = [(1, 2816, 128), (8, 2816, 128), (3, 200, 9)]


def _inputs(tokens: int, in_features: int, out_features: int, dtype: torch.dtype, device: str):
    generator = torch.Generator().manual_seed(tokens * out_features)
    x = torch.randn(tokens, in_features, generator=generator).to(dtype).to(device)
    weight = (torch.randn(out_features, in_features, generator=generator) * in_features ** -0.5).to(dtype).to(device)
    return x, weight


def test_reference_is_the_fp32_product_rounded_once():
    x, weight = _inputs(3, 200, 9, torch.bfloat16, "cpu")
    expected = F.linear(x.double(), weight.double()).to(torch.bfloat16)
    assert narrow_linear_ref(x, weight).dtype == torch.bfloat16
    torch.testing.assert_close(narrow_linear_ref(x, weight), expected, rtol=0, atol=0)


test_kernel_in_triton_interpreter = triton_interpreter_rerun(__file__)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16] if CUDA else [torch.float16], ids=str)
def test_kernel_matches_reference(shape, dtype):
    from dflash_sglang.ops.narrow_linear_kernel import narrow_linear

    x, weight = _inputs(*shape, dtype, triton_kernel_device())
    out = narrow_linear(x, weight)
    assert out.shape == (shape[0], shape[2]) and out.dtype == dtype
    # fp32 sums in another order than the reference's: at most one rounding step of the output apart
    torch.testing.assert_close(out.cpu(), narrow_linear_ref(x.cpu(), weight.cpu()), rtol=1e-2, atol=1e-2)


def test_kernel_reads_strided_rows():
    from dflash_sglang.ops.narrow_linear_kernel import narrow_linear

    wide, weight = _inputs(4, 400, 16, torch.float16, triton_kernel_device())
    x = wide[:, :200]  # rows of a wider tensor: stride 400
    weight = weight[:, :200].contiguous()
    torch.testing.assert_close(narrow_linear(x, weight).cpu(), narrow_linear_ref(x.cpu(), weight.cpu()),
                               rtol=1e-2, atol=1e-2)


@pytest.mark.skipif(not CUDA, reason="the kernel serves CUDA tensors")
def test_serves_decode_batches_only():
    from dflash_sglang.ops.narrow_linear_kernel import MAX_TOKENS

    x, weight = _inputs(MAX_TOKENS + 1, 256, 16, torch.bfloat16, "cuda")
    assert ops.narrow_linear_serves(x[:MAX_TOKENS], weight) and ops.narrow_linear_serves(x[:1, :128], weight[:, :128])
    assert not ops.narrow_linear_serves(x, weight)  # a verify pass's rows: the linear layer's GEMM
    assert not ops.narrow_linear_serves(x[:1, ::2], weight[:, ::2])


def test_arguments_are_checked_by_name():
    x, weight = _inputs(2, 64, 8, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"weight must be \[out, 64\]"):
        ops.narrow_linear(x, weight[:, :32])
    with pytest.raises(ValueError, match="weight must be one of"):
        ops.narrow_linear(x, weight.half())
    assert not ops.narrow_linear_serves(x, weight)  # CPU tensors take the reference
    torch.testing.assert_close(ops.narrow_linear(x, weight), narrow_linear_ref(x, weight))
