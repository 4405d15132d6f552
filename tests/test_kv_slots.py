# SPDX-License-Identifier: Apache-2.0
"""DFLASH's block-slot bookkeeping (``serving/kv_slots.py``) over SGLang's real paged allocator on the CPU (the
hook's ``patch_paged_allocator``): many steps of both loops for a few requests with random acceptance, then
the request's release as SGLang does it. Every position keeps its page (``slot // P`` shared by a page's
positions, ``slot % P == position % P``), no page is owned twice, and every page comes back."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from dflash_sglang.serving.plugin import install_import_hook

install_import_hook()
from sglang.srt import server_args as sglang_server_args  # noqa: E402
from sglang.srt.mem_cache.allocator import PagedTokenToKVPoolAllocator, TokenToKVPoolAllocator  # noqa: E402

from dflash_sglang.serving.kv_slots import assign_row_slots, first_freeable_offsets  # noqa: E402

BLOCK = 8
WIDTH = 600  # req_to_token row width


@pytest.fixture()
def pool(monkeypatch):
    # get_last_loc picks its implementation from the global server args (torch on the torch_native backend).
    monkeypatch.setattr(sglang_server_args, "_global_server_args", SimpleNamespace(attention_backend="torch_native"))

    def make(page_size: int):
        size = 64 * 64
        allocator = (TokenToKVPoolAllocator(size, torch.float32, "cpu", None, need_sort=False) if page_size == 1
                     else PagedTokenToKVPoolAllocator(size, page_size, torch.float32, "cpu", None, need_sort=False))
        tree_cache = SimpleNamespace(token_to_kv_pool_allocator=allocator, is_chunk_cache=lambda: True)
        return allocator, tree_cache, torch.zeros(4, WIDTH, dtype=torch.int32)

    return make


def _prefill(tree_cache, req_to_token, lens: list[int]) -> None:
    assign_row_slots(tree_cache, req_to_token, list(range(len(lens))), [0] * len(lens), lens)


def _check_layout(req_to_token, lens: list[int], page_size: int) -> None:
    owner = {}
    for row, length in enumerate(lens):
        slots = req_to_token[row, :length].to(torch.int64)
        positions = torch.arange(length)
        assert torch.equal(slots % page_size, positions % page_size), row
        for page in range(0, length, page_size):
            pages = set((slots[page:page + page_size] // page_size).tolist())
            assert len(pages) == 1, (row, page, pages)
            assert owner.setdefault(pages.pop(), row) == row, "a page owned by two requests"


def _release(allocator, req_to_token, row: int, committed: int, allocated: int, page_size: int) -> None:
    """As SGLang's ``cache_finished_req`` (no radix insert) + ``release_kv_cache`` do it."""
    allocator.free(req_to_token[row, :committed].to(torch.int64))
    start = -(-committed // page_size) * page_size
    if start < allocated:
        allocator.free(req_to_token[row, start:allocated].to(torch.int64))


@pytest.mark.parametrize("page_size", [1, 16, 64])
def test_host_committed_loop_frees_only_whole_pages_past_the_kept_tokens(pool, page_size):
    allocator, tree_cache, req_to_token = pool(page_size)
    free_at_start = allocator.available_size()
    rng = random.Random(page_size)
    lens = [5, 16, 33]
    _prefill(tree_cache, req_to_token, lens)
    for _ in range(40):
        rows = list(range(len(lens)))
        block_slots = assign_row_slots(tree_cache, req_to_token, rows, lens, [n + BLOCK for n in lens]).view(-1, BLOCK)
        kept = torch.tensor([rng.randint(1, BLOCK) for _ in rows])
        freeable = first_freeable_offsets(torch.tensor(lens), kept, page_size)
        rejected = torch.arange(BLOCK)[None, :] >= freeable[:, None]
        allocator.free(block_slots[rejected])
        lens = [n + k for n, k in zip(lens, kept.tolist())]
        _check_layout(req_to_token, lens, page_size)
    for row, length in enumerate(lens):
        _release(allocator, req_to_token, row, length, length, page_size)
    assert allocator.available_size() == free_at_start


@pytest.mark.parametrize("page_size", [1, 16, 64])
def test_overlap_loop_over_allocation_is_page_aligned_and_released(pool, page_size):
    allocator, tree_cache, req_to_token = pool(page_size)
    free_at_start = allocator.available_size()
    rng = random.Random(page_size)
    committed = [7, 64, 20]
    allocated = list(committed)
    _prefill(tree_cache, req_to_token, committed)
    for _ in range(40):
        wanted = [min(c + 2 * BLOCK, WIDTH) for c in committed]
        rows = [r for r in range(3) if wanted[r] > allocated[r]]
        if rows:
            assign_row_slots(tree_cache, req_to_token, rows, [allocated[r] for r in rows], [wanted[r] for r in rows])
        allocated = [max(a, w) for a, w in zip(allocated, wanted)]
        committed = [c + rng.randint(1, BLOCK) for c in committed]
        _check_layout(req_to_token, allocated, page_size)
    for row in range(3):
        _release(allocator, req_to_token, row, committed[row], allocated[row], page_size)
    assert allocator.available_size() == free_at_start
