# SPDX-License-Identifier: Apache-2.0
"""KV slots for DFLASH's block positions, with SGLang's token allocator (``--page-size 1``) or its paged one.

A request's ``req_to_token`` row maps positions to KV slots. With ``page_size`` P > 1 SGLang's
``PagedTokenToKVPoolAllocator`` owns whole pages: position p of a request lives in the request's page for
``p // P``, at offset ``p % P``, and the allocator only ever hands out new pages. So:

* growing a row from position ``start`` to ``end`` first fills the rest of the page holding ``start - 1``
  (``last_loc + 1 ..``), then takes new pages (``alloc_paged_token_slots_extend``, as EAGLE's verify does);
* freeing a slot frees its whole page (``free`` takes ``unique(slots // P)``), so after a verdict only the
  pages that lie entirely past the last kept position may be freed (EAGLE's ``align_evict_mask_to_page_size``).
  The rejected slots of the page holding the last kept token stay with the request: the next step's
  allocation continues that page at the same slots, and SGLang's ``cache_finished_req`` frees the partial
  page when the request ends.

The drafter's KV pool is indexed by the same slots (same size, ``size + page_size`` rows), so it needs nothing
extra; the attention backends DFLASH runs (triton, torch_native) list KV per token from ``req_to_token``.

Hybrid sliding-window pools (Gemma 4; ``models/gemma4_kv_pool.py``): SGLang's ``SWATokenToKVPoolAllocator`` gives
every slot above a second slot in the sliding layers' smaller pool, and allocation and ``free`` cover both. A
request's sliding slots below its window are freed by SGLang's ``ScheduleBatch.maybe_evict_swa`` in plain
decoding, which DFLASH's workers bypass: :func:`evict_swa_slots` does it for them.
"""

from __future__ import annotations

import torch

from sglang.srt.mem_cache.common import alloc_paged_token_slots_extend, alloc_token_slots, get_last_loc

# Sliding-window slots are freed in runs of at least this many tokens a request (a run per step would be a
# tiny free per request per step); a request then holds at most window + slack + stride + 2 blocks of them.
SWA_EVICT_STRIDE = 64


def assign_row_slots(tree_cache, req_to_token: torch.Tensor, rows: list[int], starts: list[int],
                     ends: list[int]) -> torch.Tensor:
    """Allocates KV slots for positions ``starts[i] .. ends[i] - 1`` of ``req_to_token`` row ``rows[i]`` (every
    earlier position of the row already has its slot), writes them into the rows and returns them, row by row
    then position by position ([sum(ends - starts)] int64, on the pool's device)."""
    allocator = tree_cache.token_to_kv_pool_allocator
    device = req_to_token.device
    starts_cpu = torch.tensor(starts, dtype=torch.int64)
    ends_cpu = torch.tensor(ends, dtype=torch.int64)
    counts_cpu = ends_cpu - starts_cpu
    total = int(counts_cpu.sum())
    rows_cpu = torch.tensor(rows, dtype=torch.int64)
    if allocator.page_size == 1:
        slots = alloc_token_slots(tree_cache, total)
    else:
        starts_dev, ends_dev = upload(starts_cpu, device.type, device), upload(ends_cpu, device.type, device)
        last_loc = get_last_loc(req_to_token, upload(rows_cpu, device.type, device), starts_dev)
        slots = alloc_paged_token_slots_extend(tree_cache, starts_dev, starts_cpu, ends_dev, ends_cpu, last_loc,
                                               total)
    # Run r covers row rows[r], columns starts[r] .. ends[r]-1: flat index i maps to column
    # i - (where run r begins in the flat list) + starts[r].
    shift = starts_cpu - (torch.cumsum(counts_cpu, 0) - counts_cpu)
    row_of = rows_cpu.repeat_interleave(counts_cpu)
    column = torch.arange(total, dtype=torch.int64) + shift.repeat_interleave(counts_cpu)
    cells = upload(row_of, device.type, device), upload(column, device.type, device)
    req_to_token[cells] = slots.to(req_to_token.dtype)
    return slots.to(torch.int64)


def first_freeable_offsets(prefix_lens: torch.Tensor, kept: torch.Tensor, page_size: int) -> torch.Tensor:
    """Per request, the first block offset whose slot may be freed after a verdict that keeps ``kept`` [bs]
    tokens of a block at ``prefix_lens`` [bs] (host int64 tensors): ``kept`` itself with single-token pages,
    else the start of the first page past the last kept position (module docstring)."""
    if page_size == 1:
        return kept
    kept_end = prefix_lens + kept
    return (kept_end + page_size - 1) // page_size * page_size - prefix_lens


def upload(host: torch.Tensor, device_type: str, device) -> torch.Tensor:
    """A host tensor on ``device`` without waiting for the GPU (pinned, non-blocking copy)."""
    if device_type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def evict_swa_slots(batch, slack: int, skip_first_decode: bool) -> None:
    """Frees each request's sliding-window slots below ``kv_committed_len - window - slack`` (a hybrid-SWA pool;
    otherwise nothing), as SGLang's ``ScheduleBatch._evict_swa`` does for plain decoding, in runs of at least
    ``SWA_EVICT_STRIDE`` tokens (a whole page with ``--page-size`` > 1).

    ``slack`` keeps the window whole for what may still read it: under the overlap scheduler the step in flight
    reads keys from its own prefix length (the host's ``kv_committed_len``) minus the window; a stop string can
    pull ``kv_committed_len`` back by up to a block, and a finished request must still end in a whole window for
    the radix cache to match it. ``skip_first_decode``: leave requests whose prefill may still be running
    (overlap: ``decode_batch_idx == 0``). The slots from ``cache_protected_len`` on belong to the request (those
    before it, to the radix cache); ``req.swa_evicted_seqlen`` records how far the request's are freed.
    With single-token pages no host wait: every slot in the freed range still has its sliding slot."""
    tree_cache = batch.tree_cache
    if not tree_cache.supports_swa():
        return
    window, page_size = tree_cache.sliding_window_size, tree_cache.page_size
    stride = max(page_size, SWA_EVICT_STRIDE)
    req_to_token = batch.req_to_token_pool.req_to_token
    freed = []
    for req in batch.reqs:
        if skip_first_decode and req.decode_batch_idx == 0:
            continue
        start = max(req.swa_evicted_seqlen, req.cache_protected_len)
        end = (req.kv_committed_len - window - slack) // page_size * page_size
        if end - start >= stride:
            freed.append(req_to_token[req.req_pool_idx, start:end])
            start = end
        req.swa_evicted_seqlen = start
    if not freed:
        return
    allocator = batch.token_to_kv_pool_allocator
    slots = torch.cat(freed).to(torch.int64)
    if page_size > 1:
        allocator.free_swa(slots)  # whole pages (upstream's path; its page dedup reads the GPU)
        return
    mapping = allocator.full_to_swa_index_mapping
    allocator.swa_attn_allocator.free(mapping[slots])
    mapping[slots] = 0
