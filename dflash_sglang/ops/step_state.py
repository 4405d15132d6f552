# SPDX-License-Identifier: Apache-2.0
"""The overlap loop's per-step bookkeeping in Triton, one kernel at each end of a step
(``block_inputs_ref`` and ``advance_state_ref`` in ``ops/reference.py``).

Under SGLang's overlap scheduler a step starts from state that only the device holds (the last token, the
sequence lengths, the token budgets). Read and advanced with PyTorch ops that is some twenty tiny kernels a
step, each a launch and a gap on the GPU between the two CUDA graphs; here it is two:

* :func:`block_inputs`: a step's block input ``[t0, mask, ...]``, positions, KV slots (from
  ``req_to_token``), prefix lengths and budgets, one program per request;
* :func:`advance_state`: after the verdict, the next ``verified_id``, ``seq_lens`` and ``accept_lens``, and
  the budget table lowered by the tokens emitted.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _block_inputs(VerifiedId, SeqLens, ReqPoolIndices, ReqToToken, BudgetTable, BlockInput, Positions, BlockSlots,
                  PrefixLens, Budgets, mask_token_id, width, stride_req_to_token,
                  BLOCK_SIZE: tl.constexpr, BLOCK_B: tl.constexpr):
    req = tl.program_id(0)
    cols = tl.arange(0, BLOCK_B)
    col_ok = cols < BLOCK_SIZE
    prefix = tl.load(SeqLens + req).to(tl.int64)
    row = tl.load(ReqPoolIndices + req).to(tl.int64)
    positions = prefix + cols
    inside = col_ok & (positions < width)  # past the row: SGLang's padding slot 0
    slots = tl.load(ReqToToken + row * stride_req_to_token + positions, mask=inside, other=0).to(tl.int64)
    t0 = tl.load(VerifiedId + req).to(tl.int64)
    out = req * BLOCK_SIZE + cols
    tl.store(BlockInput + out, tl.where(cols == 0, t0, mask_token_id), mask=col_ok)
    tl.store(Positions + out, positions, mask=col_ok)
    tl.store(BlockSlots + out, slots, mask=col_ok)
    tl.store(PrefixLens + req, prefix)
    tl.store(Budgets + req, tl.load(BudgetTable + row))


@triton.jit
def _advance_state(VerifiedId, PrefixLens, Budgets, NumEmitted, Emitted, ReqPoolIndices, BudgetTable, NextId,
                   NewSeqLens, AcceptLens, stride_emitted):
    req = tl.program_id(0)
    n = tl.load(NumEmitted + req).to(tl.int64)
    last = tl.load(Emitted + req * stride_emitted + tl.maximum(n - 1, 0))
    tl.store(NextId + req, tl.where(n > 0, last, tl.load(VerifiedId + req)))
    tl.store(NewSeqLens + req, (tl.load(PrefixLens + req) + n).to(NewSeqLens.dtype.element_ty))
    tl.store(AcceptLens + req, tl.maximum(n, 1).to(tl.int32))
    tl.store(BudgetTable + tl.load(ReqPoolIndices + req).to(tl.int64), tl.load(Budgets + req) - n)


def block_inputs(verified_id: torch.Tensor, seq_lens: torch.Tensor, req_pool_indices: torch.Tensor,
                 req_to_token: torch.Tensor, budget_table: torch.Tensor, mask_token_id: int, block_size: int):
    """See ``block_inputs_ref``: (block_input, positions, block_slots [bs, B] int64, prefix_lens, budgets [bs])."""
    bs, device = seq_lens.shape[0], seq_lens.device
    block_input, positions, block_slots = torch.empty(3, bs, block_size, dtype=torch.int64, device=device)
    prefix_lens, budgets = torch.empty(2, bs, dtype=torch.int64, device=device)
    if bs:
        _block_inputs[(bs,)](verified_id, seq_lens, req_pool_indices, req_to_token, budget_table, block_input,
                             positions, block_slots, prefix_lens, budgets, mask_token_id, req_to_token.shape[1],
                             req_to_token.stride(0), BLOCK_SIZE=block_size,
                             BLOCK_B=triton.next_power_of_2(block_size), num_warps=1)
    return block_input, positions, block_slots, prefix_lens, budgets


def advance_state(verified_id: torch.Tensor, prefix_lens: torch.Tensor, budgets: torch.Tensor,
                  num_emitted: torch.Tensor, emitted: torch.Tensor, req_pool_indices: torch.Tensor,
                  budget_table: torch.Tensor, seq_lens_dtype: torch.dtype):
    """See ``advance_state_ref``: (next verified_id, new seq_lens, accept_lens); lowers ``budget_table``."""
    bs, device = prefix_lens.shape[0], prefix_lens.device
    next_id = torch.empty(bs, dtype=torch.int64, device=device)
    new_seq_lens = torch.empty(bs, dtype=seq_lens_dtype, device=device)
    accept_lens = torch.empty(bs, dtype=torch.int32, device=device)
    if bs:
        _advance_state[(bs,)](verified_id, prefix_lens, budgets, num_emitted, emitted, req_pool_indices,
                              budget_table, next_id, new_seq_lens, accept_lens, emitted.stride(0), num_warps=1)
    return next_id, new_seq_lens, accept_lens
