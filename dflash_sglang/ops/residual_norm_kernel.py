# SPDX-License-Identifier: Apache-2.0
"""A chain of RMSNorms around one residual add, in one Triton kernel (``residual_norm_ref`` in
``ops/reference.py`` is the specification).

Gemma 4 wraps every sublayer in "sandwich" norms: a decoder layer's step from the attention output to the
next layer's input is, op by op, a norm of the branch, a residual add and the next norms of the sum
(``post_attention_layernorm``, add, ``pre_feedforward_layernorm`` and, in MoE layers, ``pre_feedforward_layernorm_2``
and the router's norm); from the feed-forward outputs it is two branch norms, their sum, a norm of it, the add,
the ``layer_scalar`` multiply and the next layer's ``input_layernorm``. Each op is a kernel launch that reads
and writes a [T, H] activation; at decode (T = batch) they are latency, not bandwidth: ~10 launches a layer.
Here one program per row holds the row in registers and does the whole chain, rounding to the activation
dtype wherever the op-by-op sequence rounds, so the result equals it up to the order of fp32 sums.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_BRANCHES = 2
MAX_OUTS = 3


@triton.jit
def _rms(x, weight, hidden, eps):
    """fp32 RMSNorm of a row held in registers (masked lanes hold 0), times its weight (loaded, fp32)."""
    inv = tl.rsqrt(tl.sum(x * x, axis=0) / hidden + eps)
    return x * inv * weight


@triton.jit
def _load_row(ptr, cols, mask):
    return tl.load(ptr + cols, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _residual_norm_kernel(Residual, Branch0, Branch1, BranchWeight0, BranchWeight1, CombineWeight, Scalar, New,
                          OutWeight0, OutWeight1, OutWeight2, Out0, Out1, Out2, hidden, eps,
                          stride_residual, stride_branch0, stride_branch1,
                          NUM_BRANCHES: tl.constexpr, HAS_COMBINE: tl.constexpr, HAS_SCALAR: tl.constexpr,
                          NUM_OUTS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    dtype = New.dtype.element_ty
    # Every load first: the chain's reductions are serial, and a load issued after one would add its memory
    # latency to the chain (at decode the whole kernel is a few of those latencies).
    new = _load_row(Residual + row * stride_residual, cols, mask)
    if NUM_BRANCHES > 0:
        branch0 = _load_row(Branch0 + row * stride_branch0, cols, mask)
        branch_weight0 = _load_row(BranchWeight0, cols, mask)
    if NUM_BRANCHES > 1:
        branch1 = _load_row(Branch1 + row * stride_branch1, cols, mask)
        branch_weight1 = _load_row(BranchWeight1, cols, mask)
    if HAS_COMBINE:
        combine_weight = _load_row(CombineWeight, cols, mask)
    if HAS_SCALAR:
        scalar = tl.load(Scalar).to(tl.float32)
    if NUM_OUTS > 0:
        out_weight0 = _load_row(OutWeight0, cols, mask)
    if NUM_OUTS > 1:
        out_weight1 = _load_row(OutWeight1, cols, mask)
    if NUM_OUTS > 2:
        out_weight2 = _load_row(OutWeight2, cols, mask)
    if NUM_BRANCHES > 0:
        mix = _rms(branch0, branch_weight0, hidden, eps).to(dtype).to(tl.float32)
        if NUM_BRANCHES > 1:
            second = _rms(branch1, branch_weight1, hidden, eps).to(dtype).to(tl.float32)
            mix = (mix + second).to(dtype).to(tl.float32)
        if HAS_COMBINE:
            mix = _rms(mix, combine_weight, hidden, eps).to(dtype).to(tl.float32)
        new = (new + mix).to(dtype).to(tl.float32)
    if HAS_SCALAR:
        new = (new * scalar).to(dtype).to(tl.float32)
    tl.store(New + row * hidden + cols, new.to(dtype), mask=mask)
    if NUM_OUTS > 0:
        tl.store(Out0 + row * hidden + cols, _rms(new, out_weight0, hidden, eps).to(dtype), mask=mask)
    if NUM_OUTS > 1:
        tl.store(Out1 + row * hidden + cols, _rms(new, out_weight1, hidden, eps).to(dtype), mask=mask)
    if NUM_OUTS > 2:
        tl.store(Out2 + row * hidden + cols, _rms(new, out_weight2, hidden, eps).to(dtype), mask=mask)


def residual_norm(residual: torch.Tensor, out_weights: list[torch.Tensor], eps: float,
                  branches: list[torch.Tensor], branch_weights: list[torch.Tensor],
                  combine_weight: torch.Tensor | None,
                  scalar: torch.Tensor | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The kernel launch (arguments checked by ``ops.residual_norm``): new [T, H] and one [T, H] per out weight,
    all fresh contiguous tensors."""
    tokens, hidden = residual.shape
    new = torch.empty((tokens, hidden), dtype=residual.dtype, device=residual.device)
    outs = [torch.empty_like(new) for _ in out_weights]
    if tokens == 0:
        return new, outs
    block = triton.next_power_of_2(hidden)
    padded_branches = list(branches) + [residual] * (MAX_BRANCHES - len(branches))
    padded_branch_weights = list(branch_weights) + [residual] * (MAX_BRANCHES - len(branch_weights))
    padded_weights = list(out_weights) + [residual] * (MAX_OUTS - len(out_weights))
    padded_outs = outs + [new] * (MAX_OUTS - len(outs))
    _residual_norm_kernel[(tokens,)](
        residual, *padded_branches, *padded_branch_weights,
        combine_weight if combine_weight is not None else residual, scalar if scalar is not None else residual,
        new, *padded_weights, *padded_outs, hidden, eps,
        residual.stride(0), padded_branches[0].stride(0), padded_branches[1].stride(0),
        NUM_BRANCHES=len(branches), HAS_COMBINE=combine_weight is not None, HAS_SCALAR=scalar is not None,
        NUM_OUTS=len(out_weights), BLOCK=block, num_warps=min(16, max(1, block // 512)))
    return new, outs
