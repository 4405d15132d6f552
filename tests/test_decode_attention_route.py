# SPDX-License-Identifier: Apache-2.0
"""A plain decode step of a sliding-window layer through the patched ``TritonAttnBackend.forward_decode``
(``patches/cuda_graphs.py``, ``DFLASH_DECODE_ATTENTION=auto``) over SGLang's real hybrid pool and allocator: the
new token's K/V land at its sliding-pool slot, and its output is attention over exactly the last ``window`` keys
before it and itself (SGLang's window count), read through the full-to-sliding slot map, computed here from the
pool's contents. The block kernel runs in Triton's interpreter on the CPU (a child pytest with
``TRITON_INTERPRET=1`` and SGLang's CPU engine), compiled on a GPU. The backend is the patched class with the few
fields the decode path reads (its real ``__init__`` needs a CUDA model runner)."""

from __future__ import annotations

import os
import types

import pytest
import torch
from child_pytest import run_child_pytest

from dflash_sglang.deploy.cpu_stub import cpu_server_env

CHILD = "DFLASH_TEST_DECODE_ROUTE_CHILD"
RUNS_HERE = torch.cuda.is_available() or bool(os.environ.get(CHILD))


@pytest.mark.skipif(RUNS_HERE, reason="the test runs directly here")
def test_in_a_child_process():
    env = {**cpu_server_env(), CHILD: "1", "TRITON_INTERPRET": "1"}
    run_child_pytest(__file__, "not test_in_a_child_process", env, timeout=600)


@pytest.mark.skipif(not RUNS_HERE, reason="runs in the child process of test_in_a_child_process")
@pytest.mark.parametrize("context", [20, 75], ids=["inside-window", "past-window"])
def test_sliding_decode_sees_the_window_and_itself(monkeypatch, context):
    from sglang.srt import server_args as sglang_server_args
    from sglang.srt.layers.attention.triton_backend import TritonAttnBackend
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.mem_cache.swa_memory_pool import SWAKVPool, SWATokenToKVPoolAllocator
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    device = "cuda" if torch.cuda.is_available() else "cpu"
    monkeypatch.setenv("DFLASH_DECODE_ATTENTION", "auto")
    monkeypatch.setattr(sglang_server_args, "_global_server_args",
                        types.SimpleNamespace(attention_backend="torch_native"))
    window, heads, kv_heads, head_dim, dtype = 31, 4, 2, 64, torch.float16  # a 32-token window, as gpu_e2e's
    pool = SWAKVPool(size=256, size_swa=128, page_size=1, dtype=dtype, head_num=kv_heads, head_dim=head_dim,
                     swa_attention_layer_ids=[0], full_attention_layer_ids=[1], enable_kvcache_transpose=False,
                     device=device, swa_head_num=kv_heads, swa_head_dim=head_dim, swa_v_head_dim=head_dim,
                     v_head_dim=head_dim)
    allocator = SWATokenToKVPoolAllocator(256, 128, page_size=1, dtype=dtype, device=device, kvcache=pool,
                                          need_sort=False)
    slots = allocator.alloc(context + 1)  # the prefix, then the token decoded
    mapping = allocator.full_to_swa_index_mapping
    mapping[slots] = mapping[slots].flip(0)  # the allocators hand out equal slots here: make every one differ

    layer = RadixAttention(heads, head_dim, head_dim ** -0.5, kv_heads, layer_id=0, sliding_window_size=window)
    generator = torch.Generator().manual_seed(context)
    keys, values = (torch.randn(context + 1, kv_heads, head_dim, generator=generator).to(dtype).to(device)
                    for _ in range(2))
    pool.set_kv_buffer(layer, slots[:context], keys[:context], values[:context])
    q = torch.randn(1, heads * head_dim, generator=generator).to(dtype).to(device)

    backend = object.__new__(TritonAttnBackend)
    backend.enable_deterministic, backend.use_mla = False, False
    backend.token_to_kv_pool_allocator = allocator
    backend.forward_metadata = types.SimpleNamespace(
        kv_indptr=torch.tensor([0, context + 1], dtype=torch.int32, device=device), kv_indices=slots)
    batch = types.SimpleNamespace(forward_mode=ForwardMode.DECODE, token_to_kv_pool=pool, out_cache_loc=slots[-1:])
    out = backend.forward_decode(q, keys[-1:], values[-1:], layer, batch)  # k, v as RadixAttention passes them

    assert torch.equal(pool.get_key_buffer(0)[mapping[slots[-1]]], keys[-1])  # written at its sliding slot
    assert backend._dflash_decode_reads_window_listing is False  # so the metadata may skip the window listing
    seen = slice(max(0, context - window), context + 1)  # `window` keys before the query, and itself
    rows = mapping[slots[seen]]
    k = pool.get_key_buffer(0)[rows].float().repeat_interleave(heads // kv_heads, dim=1)
    v = pool.get_value_buffer(0)[rows].float().repeat_interleave(heads // kv_heads, dim=1)
    scores = torch.einsum("hd,shd->hs", q.view(heads, head_dim).float(), k) * head_dim ** -0.5
    expected = torch.einsum("hs,shd->hd", scores.softmax(-1), v).reshape(1, -1)
    assert out.shape == (1, heads * head_dim)
    torch.testing.assert_close(out.float(), expected, rtol=2e-3, atol=2e-3)
