# SPDX-License-Identifier: Apache-2.0
"""residual_norm: the reference against Gemma 4's sandwich-norm formulas written out op by op (as transformers'
``Gemma4TextDecoderLayer`` runs them, each op rounding to the activation dtype), then the Triton kernel against
the reference: on the GPU where there is one, else on the CPU through Triton's interpreter (in a child pytest
with ``TRITON_INTERPRET=1``, which must be set before Triton is imported)."""

from __future__ import annotations


import pytest
import torch

from child_pytest import CUDA, triton_interpreter_rerun, triton_kernel_device

from dflash_sglang import ops
from dflash_sglang.ops.reference import residual_norm_ref

EPS = 1e-6


def _norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """One RMSNorm op: fp32 inside, its output rounded to x's dtype."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS) * weight.float()).to(x.dtype)


def _rows(tokens: int, hidden: int, dtype: torch.dtype, generator: torch.Generator, stride: int = 0) -> torch.Tensor:
    """Rows of varied scale; with ``stride`` > hidden, a strided view (a slice of wider rows)."""
    width = max(stride, hidden)
    x = torch.randn(tokens, width, generator=generator) * (0.1 + 8 * torch.rand(tokens, 1, generator=generator))
    return x.to(dtype)[:, :hidden]


def _weights(count: int, hidden: int, dtype: torch.dtype, generator: torch.Generator) -> list[torch.Tensor]:
    return [(0.5 + torch.rand(hidden, generator=generator)).to(dtype) for _ in range(count)]


def test_ref_is_the_moe_layer_chain_op_by_op():
    """The MoE layer's two steps: h' = h + post_attn(attn), its three norms; then
    h'' = (h' + post_ff(post_ff_1(mlp) + post_ff_2(experts))) * layer_scalar and the next input norm."""
    generator = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16
    h, attn, mlp, experts = (_rows(7, 96, dtype, generator) for _ in range(4))
    post_attn, pre_ff, pre_ff_2, router, post_1, post_2, post_ff, next_in = _weights(8, 96, dtype, generator)
    scalar = torch.tensor([0.75], dtype=dtype)

    new, outs = residual_norm_ref(h, [pre_ff, pre_ff_2, router], EPS, [attn], [post_attn])
    expected = h + _norm(attn, post_attn)  # bf16 + bf16: one rounding, as the op
    assert torch.equal(new, expected)
    for out, weight in zip(outs, [pre_ff, pre_ff_2, router]):
        assert torch.equal(out, _norm(expected, weight))

    new2, (normed,) = residual_norm_ref(new, [next_in], EPS, [mlp, experts], [post_1, post_2], post_ff, scalar)
    expected2 = (new + _norm(_norm(mlp, post_1) + _norm(experts, post_2), post_ff)) * scalar
    assert torch.equal(new2, expected2)
    assert torch.equal(normed, _norm(expected2, next_in))
    assert new2.data_ptr() != new.data_ptr()  # a fresh tensor: a captured residual is never overwritten


def test_ref_is_the_dense_layer_and_embedding_steps():
    generator = torch.Generator().manual_seed(1)
    h, mlp = _rows(5, 64, torch.float32, generator), _rows(5, 64, torch.float32, generator)
    post_ff, next_in = _weights(2, 64, torch.float32, generator)
    scalar = torch.tensor([1.5])
    new, (normed,) = residual_norm_ref(h, [next_in], EPS, [mlp], [post_ff], scalar=scalar)
    torch.testing.assert_close(new, (h + _norm(mlp, post_ff)) * 1.5)
    torch.testing.assert_close(normed, _norm(new, next_in))
    # the embedding: scaled, then the first layer's input norm; no branch, no scalar copies the residual
    scaled, (first,) = residual_norm_ref(h, [next_in], EPS, scalar=scalar)
    torch.testing.assert_close(scaled, h * 1.5)
    torch.testing.assert_close(first, _norm(h * 1.5, next_in))
    same, _ = residual_norm_ref(h, [], EPS)
    assert torch.equal(same, h) and same.data_ptr() != h.data_ptr()


@pytest.mark.parametrize("problem, message", [
    (dict(branches=[torch.zeros(3, 8)], branch_weights=[]), "one weight per branch"),
    (dict(branches=[torch.zeros(3, 4)], branch_weights=[torch.ones(8)]), "branches[0] must be [3, 8]"),
    (dict(combine_weight=torch.ones(8)), "give a branch"),
    (dict(scalar=1.5), "1-element tensor"),
    (dict(out_weights=[torch.ones(4)]), "out_weights must be contiguous [8]"),
])
def test_bad_arguments_name_the_problem(problem, message):
    args = dict(out_weights=[torch.ones(8)], eps=EPS)
    args.update(problem)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        ops.residual_norm(torch.zeros(3, 8), **args)


# ------------------------------------------------------------------------------------------------------
# The kernel against the reference.


test_kernel_in_triton_interpreter = triton_interpreter_rerun(__file__)


DTYPES = [torch.bfloat16, torch.float16, torch.float32] if CUDA else [torch.float16, torch.float32]
# (tokens, hidden, branches, combine, scalar, outs, branch row stride): Gemma 4's steps at its widths
# (26B-A4B 2816, 31B 5376) and odd widths; a strided branch as a slice of wider rows
CASES = [
    (3, 2816, 1, False, False, 3, 0),     # post-attention, MoE layer
    (5, 2816, 2, True, True, 1, 0),       # post-feed-forward, MoE layer
    (4, 5376, 1, False, True, 1, 0),      # post-feed-forward, dense layer
    (2, 5376, 0, False, True, 1, 0),      # the embedding
    (6, 200, 2, True, False, 2, 320),     # non-power-of-two width, strided branches
    (1, 64, 0, False, False, 0, 0),       # a copy
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens, hidden, num_branches, combine, with_scalar, num_outs, stride", CASES)
def test_kernel_matches_reference(dtype, tokens, hidden, num_branches, combine, with_scalar, num_outs, stride):
    device = triton_kernel_device()
    generator = torch.Generator().manual_seed(tokens * hidden)
    residual = _rows(tokens, hidden, dtype, generator).contiguous()
    branches = [_rows(tokens, hidden, dtype, generator, stride) for _ in range(num_branches)]
    branch_weights = _weights(num_branches, hidden, dtype, generator)
    out_weights = _weights(num_outs, hidden, dtype, generator)
    combine_weight = _weights(1, hidden, dtype, generator)[0] if combine else None
    scalar = torch.tensor([0.625], dtype=dtype) if with_scalar else None
    def on_device(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(device)

    from dflash_sglang.ops import residual_norm_kernel as kernel  # compiled, or run by the interpreter

    new, outs = kernel.residual_norm(on_device(residual), [on_device(w) for w in out_weights], EPS,
                                     branches=[on_device(b) for b in branches],
                                     branch_weights=[on_device(w) for w in branch_weights],
                                     combine_weight=on_device(combine_weight), scalar=on_device(scalar))
    ref_new, ref_outs = residual_norm_ref(residual, out_weights, EPS, branches, branch_weights, combine_weight,
                                          scalar)
    # each output is rounded once from fp32 values that differ only in summation order: one unit of the
    # output dtype, relative to its magnitude
    tol = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}[dtype]
    torch.testing.assert_close(new.cpu(), ref_new, rtol=tol, atol=tol)
    assert len(outs) == num_outs
    for out, ref in zip(outs, ref_outs):
        torch.testing.assert_close(out.cpu(), ref, rtol=tol, atol=tol)
