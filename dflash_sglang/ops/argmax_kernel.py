# SPDX-License-Identifier: Apache-2.0
"""Greedy token choice in Triton: the argmax of each row of logits (``argmax_ref`` in ``ops/reference.py``).

A DFLASH step takes two: the drafts (15 rows per request over a 151,936-token vocabulary) and the target's
choices (16 rows). ``torch.argmax`` reduces a row in one thread block, so a handful of rows occupy a handful
of SMs (11 us for 16 rows on an H100, twice a step). Here each row is cut into chunks over enough programs
to fill the GPU, each writing its chunk's (max, first index), and a second kernel picks each row's winner:
the first index of the maximum, as ``torch.argmax`` (NaN aside: a NaN logit is never chosen here).

The output may be a strided view, so the drafts go straight into the block the target verifies.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dflash_sglang.ops import _device

BLOCK_V = 2048  # logits per load in a chunk program
MAX_CHUNKS = 64


@triton.jit
def _chunk_max(Logits, Values, Indices, vocab, chunk_len, num_cols, stride_row, stride_col,
               BLOCK_V: tl.constexpr):
    row = tl.program_id(0)  # row = leading index * num_cols + column
    chunk = tl.program_id(1)
    base = Logits + (row // num_cols).to(tl.int64) * stride_row + (row % num_cols).to(tl.int64) * stride_col
    lo = chunk * chunk_len
    hi = tl.minimum(lo + chunk_len, vocab)
    best = float("-inf")
    best_index = lo
    for v0 in range(lo, hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(base + cols, mask=cols < hi, other=float("-inf")).to(tl.float32)
        value, index = tl.max(x, 0, return_indices=True, return_indices_tie_break_left=True)
        better = value > best  # strictly: an earlier piece keeps a tie
        best_index = tl.where(better, v0 + index, best_index)
        best = tl.where(better, value, best)
    num_chunks = tl.num_programs(1)
    tl.store(Values + row * num_chunks + chunk, best)
    tl.store(Indices + row * num_chunks + chunk, best_index)


@triton.jit
def _pick(Values, Indices, Out, num_chunks, num_cols, stride_out_row, stride_out_col, BLOCK_C: tl.constexpr):
    row = tl.program_id(0)
    chunks = tl.arange(0, BLOCK_C)
    ok = chunks < num_chunks
    values = tl.load(Values + row * num_chunks + chunks, mask=ok, other=float("-inf"))
    _, winner = tl.max(values, 0, return_indices=True, return_indices_tie_break_left=True)  # earliest chunk
    index = tl.load(Indices + row * num_chunks + winner)
    out = Out + (row // num_cols).to(tl.int64) * stride_out_row + (row % num_cols).to(tl.int64) * stride_out_col
    tl.store(out, index.to(tl.int64))


def chunk_count(rows: int, vocab: int, num_sms: int) -> int:
    """Chunks per row: about four programs per SM over all rows, each at least one load wide."""
    return max(1, min(MAX_CHUNKS, -(-4 * num_sms // rows), -(-vocab // BLOCK_V)))


def argmax(logits: torch.Tensor, out: torch.Tensor | None = None, chunks: int | None = None) -> torch.Tensor:
    """Each row's argmax: ``logits`` [R, V] or [G, C, V] (unit stride in V; other strides free) -> int64 of
    the leading shape, into ``out`` when given (any strides). ``chunks`` per row: by default
    :func:`chunk_count` for this device."""
    if logits.dim() == 2:
        logits3, out_shape = logits[:, None], logits.shape[:1]
    elif logits.dim() == 3:
        logits3, out_shape = logits, logits.shape[:2]
    else:
        raise ValueError(f"argmax: logits must be [R, V] or [G, C, V], got shape {tuple(logits.shape)}")
    if logits.stride(-1) != 1:
        raise ValueError("argmax: logits need unit stride in the vocabulary dim")
    if out is None:
        out = torch.empty(out_shape, dtype=torch.int64, device=logits.device)
    if tuple(out.shape) != tuple(out_shape) or out.dtype != torch.int64:
        raise ValueError(f"argmax: out must be int64 of shape {tuple(out_shape)}, got {out.dtype} "
                         f"{tuple(out.shape)}")
    groups, cols, vocab = logits3.shape
    rows = groups * cols
    if rows == 0:
        return out
    out3 = out[:, None] if logits.dim() == 2 else out
    chunks = chunks or chunk_count(rows, vocab, _device.num_sms(logits.device))
    chunk_len = -(-vocab // chunks)
    values = torch.empty(rows, chunks, dtype=torch.float32, device=logits.device)
    indices = torch.empty(rows, chunks, dtype=torch.int32, device=logits.device)
    _chunk_max[(rows, chunks)](logits3, values, indices, vocab, chunk_len, cols, logits3.stride(0),
                               logits3.stride(1), BLOCK_V=BLOCK_V, num_warps=4)
    _pick[(rows,)](values, indices, out3, chunks, cols, out3.stride(0), out3.stride(1),
                   BLOCK_C=max(16, triton.next_power_of_2(chunks)), num_warps=1)
    return out
