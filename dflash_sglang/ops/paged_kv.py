# SPDX-License-Identifier: Apache-2.0
"""The paged-KV listing of a batch in one Triton kernel (``paged_kv_indices_ref`` in ``ops/reference.py``).

Before each replay of a block pass's CUDA graph, SGLang's triton backend refreshes the graph's attention
inputs: ``kv_indptr`` (a cumulative sum of the prefix lengths) and ``kv_indices`` (each request's prefix
slots from ``req_to_token``), plus a query index, a tree mask and a mask index that DFLASH's mask-free block
passes never read -- about ten small kernels, twice a step. Here one program per request sums the lengths
before it (a batch is at most a few hundred requests) and copies its row of ``req_to_token``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_COPY = 1024  # slots copied per iteration


@triton.jit
def _paged_kv_indices(ReqToToken, ReqPoolIndices, SeqLens, KvIndptr, KvIndices, batch_size, stride_req_to_token,
                      BLOCK_BS: tl.constexpr, BLOCK_COPY: tl.constexpr):
    req = tl.program_id(0)
    others = tl.arange(0, BLOCK_BS)
    start = tl.sum(tl.load(SeqLens + others, mask=others < req, other=0).to(tl.int64), 0)
    length = tl.load(SeqLens + req).to(tl.int64)
    tl.store(KvIndptr + req, start.to(KvIndptr.dtype.element_ty))
    if req == batch_size - 1:
        tl.store(KvIndptr + batch_size, (start + length).to(KvIndptr.dtype.element_ty))
    row = ReqToToken + tl.load(ReqPoolIndices + req).to(tl.int64) * stride_req_to_token
    for offset in range(0, length, BLOCK_COPY):
        cols = offset + tl.arange(0, BLOCK_COPY)
        ok = cols < length
        slots = tl.load(row + cols, mask=ok)
        tl.store(KvIndices + start + cols, slots.to(KvIndices.dtype.element_ty), mask=ok)


def paged_kv_indices(req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor,
                     kv_indptr: torch.Tensor, kv_indices: torch.Tensor) -> None:
    """Fills ``kv_indptr`` [bs + 1] and the first ``sum(seq_lens)`` entries of ``kv_indices``: request i's
    prefix slots ``req_to_token[req_pool_indices[i], :seq_lens[i]]`` at ``kv_indptr[i] .. kv_indptr[i + 1]``."""
    batch_size = seq_lens.shape[0]
    if batch_size == 0:
        kv_indptr[:1] = 0
        return
    _paged_kv_indices[(batch_size,)](req_to_token, req_pool_indices, seq_lens, kv_indptr, kv_indices, batch_size,
                                     req_to_token.stride(0), BLOCK_BS=max(16, triton.next_power_of_2(batch_size)),
                                     BLOCK_COPY=BLOCK_COPY, num_warps=4)
