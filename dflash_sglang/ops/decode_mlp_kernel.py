# SPDX-License-Identifier: Apache-2.0
"""A GELU-gated MLP for a few tokens in two Triton kernels, dense or as routed experts (``decode_mlp_ref`` in
``ops/reference.py`` is the specification): Gemma 4's feed-forward blocks at decode.

At decode batch sizes a gated MLP is two weight reads with a little arithmetic between them, and what costs is
the kernels around the reads. SGLang's fused MoE runs eight for Gemma-4-26B-A4B's experts (softmax and top-k,
the block alignment and its sort, the gate/up GEMM, the activation, the down GEMM, the weighted sum) and the dense
MLP three (two cuBLAS GEMMs and the activation), each a few microseconds of launch and tail for one token. Here:

* ``_gate_up_kernel``: one program per (row, ``BLOCK_N`` intermediate columns). A row is a token (dense) or a
  (token, rank) pair of a routed token: the program reads the token's router logits and finds the expert of that
  rank itself (``TOP_K`` maxima over the logits; ties to the lower id). It takes the gate and up dot products of
  the token with the expert's rows, rounds them to the weights' dtype (as a GEMM's output is), and writes
  ``gelu(gate) * up`` (erf or tanh GELU) for that row.
* ``_down_kernel``: one program per (token, ``BLOCK_N`` output columns): the down projection of each of the token's
  rows; for routed tokens their sum weighted by the softmax of the chosen logits (softmax over all experts, top-k,
  renormalized: the same weights), in fp32, rounded once.

No alignment, no sort: each program reads one expert's rows (or the top-k experts' rows, in turn), so a token's
experts cost their weight bytes and nothing is padded to a tile of tokens; but tokens that share weights (every
token of a dense MLP, tokens routed to the same expert) read them once each, so the kernels serve one token
(``MAX_TOKENS``). The loops over the hidden and intermediate sizes (compile-time constants, one model's shapes)
and over the top-k are unrolled, so a program's loads are issued together rather than one memory round trip per
step: Triton pipelines only loads that feed ``tl.dot``.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import triton
import triton.language as tl

# Tokens the kernels serve; wider batches (a DFLASH verify pass) run the GEMMs / fused MoE. Each token's programs
# read its weights: at 8 tokens decoding the same text (8 tokens, the same 8 experts) a Gemma-4-26B-A4B step took
# 11.2 ms against 5.3 ms with SGLang's fused MoE, which reads a shared expert once (H100, d6a6ac9).
MAX_TOKENS = 1
MAX_STEPS = 16  # most unrolled steps of a program's loop over a weight row


@dataclasses.dataclass(frozen=True)
class Launch:
    """How both kernels are launched (``scripts/tune_moe.py --decode-mlp`` times the alternatives)."""
    block_k: int = 256  # weight columns a program loads per step: 512 bytes of each bf16 row
    num_warps: int = 4
    programs_per_sm: int = 4  # programs wanted per multiprocessor: the widest column block that gives them


DEFAULT_LAUNCH = Launch()


@triton.jit
def _pop_top(ids, logits, BLOCK_E: tl.constexpr):
    """The highest logit and its id (the lowest id among equals), and the logits without it."""
    top = tl.max(logits, axis=0)
    chosen = tl.min(tl.where(logits == top, ids, BLOCK_E), axis=0)
    return chosen, top, tl.where(ids == chosen, float("-inf"), logits)


@triton.jit
def _token_logits(Logits, token, stride_logits, num_experts, BLOCK_E: tl.constexpr):
    ids = tl.arange(0, BLOCK_E)
    logits = tl.load(Logits + token * stride_logits + ids, mask=ids < num_experts, other=float("-inf"))
    return ids, logits.to(tl.float32)


@triton.jit
def _gate_up_kernel(X, Logits, W13, Act, num_experts, stride_x, stride_logits, stride_we, stride_wn, stride_act,
                    HIDDEN: tl.constexpr, INTER: tl.constexpr, TOP_K: tl.constexpr, ROUTED: tl.constexpr,
                    TANH_GELU: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0)
    token = row // TOP_K
    expert = (row * 0).to(tl.int64)
    if ROUTED:
        rank = row % TOP_K
        ids, logits = _token_logits(Logits, token, stride_logits, num_experts, BLOCK_E)
        for r in tl.static_range(TOP_K):
            chosen, _, logits = _pop_top(ids, logits, BLOCK_E)
            expert = tl.where(r == rank, chosen, expert)
        expert = tl.minimum(expert, num_experts - 1).to(tl.int64)  # NaN logits choose no id: stay in bounds
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < INTER
    gate_rows = W13 + expert * stride_we + cols[:, None].to(tl.int64) * stride_wn
    up_rows = gate_rows + INTER * stride_wn
    gate = tl.zeros([BLOCK_N], dtype=tl.float32)
    up = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in tl.static_range(0, HIDDEN, BLOCK_K):  # unrolled: every step's loads can be in flight together
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < HIDDEN
        x = tl.load(X + token * stride_x + k, mask=k_ok, other=0.0).to(tl.float32)
        mask = col_ok[:, None] & k_ok[None, :]
        gate += tl.sum(tl.load(gate_rows + k[None, :], mask=mask, other=0.0).to(tl.float32) * x[None, :], axis=1)
        up += tl.sum(tl.load(up_rows + k[None, :], mask=mask, other=0.0).to(tl.float32) * x[None, :], axis=1)
    gate = gate.to(Act.dtype.element_ty).to(tl.float32)
    up = up.to(Act.dtype.element_ty).to(tl.float32)
    if TANH_GELU:
        inner = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
        act = 0.5 * gate * (2.0 - 2.0 / (tl.exp(2.0 * inner) + 1.0))  # 1 + tanh(inner)
    else:
        act = 0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476))
    tl.store(Act + row * stride_act + cols, (act * up).to(Act.dtype.element_ty), mask=col_ok)


@triton.jit
def _rows_dot(act_row, weight_rows, col_ok, INTER: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_N] dot products of one activation row with ``BLOCK_N`` weight rows, in fp32."""
    out = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in tl.static_range(0, INTER, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < INTER
        act = tl.load(act_row + k, mask=k_ok, other=0.0).to(tl.float32)
        weight = tl.load(weight_rows + k[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        out += tl.sum(weight.to(tl.float32) * act[None, :], axis=1)
    return out


@triton.jit
def _down_kernel(Act, Logits, W2, Out, num_experts, stride_act, stride_logits, stride_we, stride_wn, stride_out,
                 HIDDEN: tl.constexpr, INTER: tl.constexpr, TOP_K: tl.constexpr, ROUTED: tl.constexpr,
                 BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    token = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < HIDDEN
    row_offsets = cols[:, None].to(tl.int64) * stride_wn
    if ROUTED:
        ids, logits = _token_logits(Logits, token, stride_logits, num_experts, BLOCK_E)
        best = tl.max(logits, axis=0)
        out = tl.zeros([BLOCK_N], dtype=tl.float32)
        total = 0.0
        for rank in tl.static_range(TOP_K):
            chosen, logit, logits = _pop_top(ids, logits, BLOCK_E)
            expert = tl.minimum(chosen, num_experts - 1).to(tl.int64)
            weight = tl.exp(logit - best)
            total += weight
            out += weight * _rows_dot(Act + (token * TOP_K + rank) * stride_act, W2 + expert * stride_we + row_offsets,
                                      col_ok, INTER, BLOCK_N, BLOCK_K)
        out = out / total
    else:
        out = _rows_dot(Act + token * stride_act, W2 + row_offsets, col_ok, INTER, BLOCK_N, BLOCK_K)
    tl.store(Out + token * stride_out + cols, out.to(Out.dtype.element_ty), mask=col_ok)


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8


def _block_n(rows: int, columns: int, num_sms: int, launch: Launch) -> int:
    """Columns a program takes: the widest of 32..4 that still gives every multiprocessor
    ``launch.programs_per_sm`` programs, so the weight reads of a one-token batch are spread over the whole GPU."""
    block_n = 32
    while block_n > 4 and rows * triton.cdiv(columns, block_n) < launch.programs_per_sm * num_sms:
        block_n //= 2
    return block_n


def _block_k(columns: int, launch: Launch) -> int:
    """Weight columns per load: ``launch.block_k``, or more where the unrolled loop would take over ``MAX_STEPS``
    steps (a 31B's 21504-wide down projection)."""
    return max(launch.block_k, triton.next_power_of_2(triton.cdiv(columns, MAX_STEPS)))


def decode_mlp(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, router_logits: torch.Tensor | None,
               top_k: int, tanh_gelu: bool, launch: Launch = DEFAULT_LAUNCH) -> torch.Tensor:
    """[tokens, hidden] -> [tokens, hidden] in x's dtype (arguments checked by ``ops.decode_mlp``); ``w13``
    [experts, 2 * inter, hidden], ``w2`` [experts, hidden, inter] (one expert, no logits: a dense MLP)."""
    tokens, hidden = x.shape
    num_experts, inter = w13.shape[0], w2.shape[2]
    routed = router_logits is not None
    rows_per_token = top_k if routed else 1
    logits = router_logits if routed else x  # not read by a dense MLP's kernels
    act = torch.empty(tokens * rows_per_token, inter, dtype=x.dtype, device=x.device)
    out = torch.empty(tokens, hidden, dtype=x.dtype, device=x.device)
    block_e = triton.next_power_of_2(num_experts)
    block_n = _block_n(tokens * rows_per_token, inter, _multiprocessors(x.device), launch)
    _gate_up_kernel[(tokens * rows_per_token, triton.cdiv(inter, block_n))](
        x, logits, w13, act, num_experts, x.stride(0), logits.stride(0), w13.stride(0), w13.stride(1),
        act.stride(0), HIDDEN=hidden, INTER=inter, TOP_K=rows_per_token, ROUTED=routed, TANH_GELU=tanh_gelu,
        BLOCK_E=block_e, BLOCK_N=block_n, BLOCK_K=_block_k(hidden, launch), num_warps=launch.num_warps)
    block_n = _block_n(tokens, hidden, _multiprocessors(x.device), launch)
    _down_kernel[(tokens, triton.cdiv(hidden, block_n))](
        act, logits, w2, out, num_experts, act.stride(0), logits.stride(0), w2.stride(0), w2.stride(1),
        out.stride(0), HIDDEN=hidden, INTER=inter, TOP_K=rows_per_token, ROUTED=routed, BLOCK_E=block_e,
        BLOCK_N=block_n, BLOCK_K=_block_k(inter, launch), num_warps=launch.num_warps)
    return out
