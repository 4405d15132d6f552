# SPDX-License-Identifier: Apache-2.0
"""``x @ weight.T`` for a few rows and a narrow weight, in one Triton kernel (``narrow_linear_ref`` in
``ops/reference.py`` is the specification): a mixture-of-experts router at decode.

Gemma-4-26B-A4B's router is a [tokens, 2816] x [2816, 128] product, 0.7 MB of weight, in each of 30 layers. At
decode batch sizes cuBLAS runs it split-K, a GEMM over four thread blocks and a reduce kernel (6-7 us a layer on
an H100, for what reading 0.7 MB takes 0.25 us), the memory latency of a few blocks each streaming a quarter of
the weight. Here one program per ``ROWS`` weight rows (64 programs for 128 experts) loads its rows in one go, then
takes each input row's dot product with them in fp32: every program is one round trip to memory wide, the input
rows come from L2. The result is rounded to the input's dtype, as the linear layer's output is.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ROWS = 2  # weight rows per program
MAX_TOKENS = 4  # input rows this kernel serves (each a dependent load of the loop); wider batches run the GEMM


@triton.jit
def _narrow_linear_kernel(X, W, Out, tokens, in_features, out_features, stride_x, stride_w, stride_out,
                          ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_K)
    row_ok = rows < out_features
    col_ok = cols < in_features
    weight = tl.load(W + rows[:, None] * stride_w + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                     other=0.0).to(tl.float32)
    for token in range(tokens):
        x = tl.load(X + token * stride_x + cols, mask=col_ok, other=0.0).to(tl.float32)
        out = tl.sum(weight * x[None, :], axis=1)
        tl.store(Out + token * stride_out + rows, out.to(Out.dtype.element_ty), mask=row_ok)


def narrow_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[tokens, in] x [out, in] -> [tokens, out] in x's dtype (arguments checked by ``ops.narrow_linear``)."""
    tokens, in_features = x.shape
    out_features = weight.shape[0]
    out = torch.empty(tokens, out_features, dtype=x.dtype, device=x.device)
    block_k = triton.next_power_of_2(in_features)
    _narrow_linear_kernel[(triton.cdiv(out_features, ROWS),)](
        x, weight, out, tokens, in_features, out_features, x.stride(0), weight.stride(0), out.stride(0),
        ROWS=ROWS, BLOCK_K=block_k, num_warps=max(4, min(16, ROWS * block_k // 1024)))  # 8 fp32 weights a thread
    return out
