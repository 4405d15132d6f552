# SPDX-License-Identifier: Apache-2.0
"""decode_mlp (Gemma 4's gated MLP and routed experts at decode): the reference against a closed-form routing case
and an fp64 computation, then the Triton kernels against the reference, on the GPU where there is one, else on
the CPU through Triton's interpreter (in a child pytest with ``TRITON_INTERPRET=1``, set before Triton is
imported)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from child_pytest import CUDA, triton_interpreter_rerun, triton_kernel_device

from dflash_sglang import ops
from dflash_sglang.ops.reference import decode_mlp_ref

# (tokens, experts, hidden, inter, top_k); experts 1 with top_k 1 and no logits: a dense MLP. Odd sizes test the
# masks, a 4500-wide down projection the widened loads (over MAX_STEPS steps of BLOCK_K); on the GPU also
# Gemma-4-26B-A4B's experts (128 x 2816 x 704, top 8) and its dense MLP (2816 x 2112).
SHAPES = [(3, 16, 256, 96, 4), (2, 1, 200, 72, 1), (5, 9, 130, 40, 3), (1, 1, 64, 4500, 1)] + (
    [(1, 128, 2816, 704, 8), (8, 128, 2816, 704, 8), (1, 1, 2816, 2112, 1)] if CUDA else [])
# outputs are O(1): two rounding steps of the dtype
TOLERANCE = {torch.float16: {"rtol": 2e-3, "atol": 2e-3}, torch.bfloat16: {"rtol": 1.6e-2, "atol": 1.6e-2}}


def _inputs(tokens: int, experts: int, hidden: int, inter: int, dtype: torch.dtype, device: str):
    generator = torch.Generator().manual_seed(tokens * hidden + experts)
    x = torch.randn(tokens, hidden, generator=generator).to(dtype).to(device)
    w13 = (torch.randn(experts, 2 * inter, hidden, generator=generator) * hidden ** -0.5).to(dtype).to(device)
    w2 = (torch.randn(experts, hidden, inter, generator=generator) * inter ** -0.5).to(dtype).to(device)
    logits = torch.randn(tokens, experts, generator=generator).to(dtype).to(device) if experts > 1 else None
    return x, w13, w2, logits


def test_reference_routes_to_the_top_k_with_renormalized_softmax_weights():
    # every expert's gate and up are 1 for x = ones, and expert e's down projection writes only output column e:
    # the output is each chosen expert's weight times gelu(1), in its own column
    experts, hidden, inter, top_k = 6, 8, 4, 3
    x = torch.ones(2, hidden, dtype=torch.float32)
    w13 = torch.full((experts, 2 * inter, hidden), 1.0 / hidden)
    w2 = torch.zeros(experts, hidden, inter)
    for expert in range(experts):
        w2[expert, expert] = 1.0 / inter
    logits = torch.tensor([[0.0, 2.0, -1.0, 1.0, 3.0, -2.0], [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    out = decode_mlp_ref(x, w13, w2, logits, top_k, tanh_gelu=False)
    gelu_one = 0.5 * (1 + math.erf(2 ** -0.5))
    for token, chosen in enumerate([(4, 1, 3), (0, 1, 2)]):
        chosen_logits = logits[token, list(chosen)]
        expected = torch.zeros(hidden)
        expected[list(chosen)] = torch.softmax(chosen_logits, dim=0) * gelu_one
        torch.testing.assert_close(out[token], expected)


@pytest.mark.parametrize("tanh_gelu", [True, False])
def test_reference_is_the_gated_mlp_in_fp64_up_to_its_roundings(tanh_gelu):
    tokens, experts, hidden, inter, top_k = 3, 5, 64, 24, 2
    x, w13, w2, logits = _inputs(tokens, experts, hidden, inter, torch.float32, "cpu")
    out = decode_mlp_ref(x, w13, w2, logits, top_k, tanh_gelu)
    probs = torch.softmax(logits.double(), dim=-1)
    weights, ids = probs.topk(top_k, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    expected = torch.zeros(tokens, hidden, dtype=torch.float64)
    for token in range(tokens):
        for weight, expert in zip(weights[token], ids[token]):
            gate, up = F.linear(x[token].double(), w13[expert].double()).chunk(2)
            act = F.gelu(gate, approximate="tanh" if tanh_gelu else "none") * up
            expected[token] += weight * F.linear(act, w2[expert].double())
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    dense = decode_mlp_ref(x, w13[:1], w2[:1], None, 1, tanh_gelu)
    gate, up = F.linear(x.double(), w13[0].double()).chunk(2, dim=-1)
    act = F.gelu(gate, approximate="tanh" if tanh_gelu else "none") * up
    torch.testing.assert_close(dense.double(), F.linear(act, w2[0].double()), rtol=1e-5, atol=1e-5)


test_kernel_in_triton_interpreter = triton_interpreter_rerun(__file__)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16] if CUDA else [torch.float16], ids=str)
@pytest.mark.parametrize("tanh_gelu", [True, False], ids=["tanh", "erf"])
def test_kernel_matches_reference(shape, dtype, tanh_gelu):
    from dflash_sglang.ops.decode_mlp_kernel import decode_mlp

    tokens, experts, hidden, inter, top_k = shape
    x, w13, w2, logits = _inputs(tokens, experts, hidden, inter, dtype, triton_kernel_device())
    out = decode_mlp(x, w13, w2, logits, top_k, tanh_gelu)
    assert out.shape == (tokens, hidden) and out.dtype == dtype
    expected = decode_mlp_ref(x.cpu(), w13.cpu(), w2.cpu(), None if logits is None else logits.cpu(), top_k,
                              tanh_gelu)
    # fp32 sums in another order than the reference's, rounded at the same points: a rounding step apart
    torch.testing.assert_close(out.cpu(), expected, **TOLERANCE[dtype])


def test_kernel_keeps_nan_logits_in_bounds():
    from dflash_sglang.ops.decode_mlp_kernel import decode_mlp

    x, w13, w2, logits = _inputs(3, 16, 256, 96, torch.float16, triton_kernel_device())
    logits[1] = float("nan")  # a padded or broken row chooses no expert: its output is garbage, not a crash
    out = decode_mlp(x, w13, w2, logits, 4, False).cpu()
    expected = decode_mlp_ref(x.cpu(), w13.cpu(), w2.cpu(), logits.cpu(), 4, False)
    torch.testing.assert_close(out[[0, 2]], expected[[0, 2]], **TOLERANCE[torch.float16])


@pytest.mark.skipif(not CUDA, reason="the kernels serve CUDA tensors")
def test_serves_decode_batches_only():
    from dflash_sglang.ops.decode_mlp_kernel import MAX_TOKENS

    x, w13, w2, _ = _inputs(MAX_TOKENS + 1, 4, 128, 32, torch.bfloat16, "cuda")
    assert ops.decode_mlp_serves(x[:MAX_TOKENS], w13, w2) and ops.decode_mlp_serves(x[:1], w13, w2)
    assert not ops.decode_mlp_serves(x, w13, w2)  # a verify pass's rows: the GEMMs / fused MoE
    assert not ops.decode_mlp_serves(x[:1, ::2], w13[..., ::2], w2)


def test_arguments_are_checked_by_name():
    x, w13, w2, logits = _inputs(2, 4, 64, 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"w2 must be \[4, 64, 16\]"):
        ops.decode_mlp(x, w13, w2[:, :, :8], logits, 2)
    with pytest.raises(ValueError, match=r"router_logits must be \[2, 4\]"):
        ops.decode_mlp(x, w13, w2, logits[:, :3], 2)
    with pytest.raises(ValueError, match="top_k must be in 1..4"):
        ops.decode_mlp(x, w13, w2, logits, 5)
    with pytest.raises(ValueError, match="a dense MLP is one expert"):
        ops.decode_mlp(x, w13, w2)
    with pytest.raises(ValueError, match="w13 must be one of"):
        ops.decode_mlp(x, w13.half(), w2, logits, 2)
    assert not ops.decode_mlp_serves(x, w13, w2)  # CPU tensors take the reference
    torch.testing.assert_close(ops.decode_mlp(x, w13, w2, logits, 2), decode_mlp_ref(x, w13, w2, logits, 2, True))
