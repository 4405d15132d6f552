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
"""

from __future__ import annotations

import torch

from sglang.srt.mem_cache.common import alloc_paged_token_slots_extend, alloc_token_slots, get_last_loc


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
    req_to_token[upload(row_of, device.type, device), upload(column, device.type, device)] = slots.to(req_to_token.dtype)
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
