# SPDX-License-Identifier: Apache-2.0
"""A plain decode step of a sliding-window layer through the patched ``TritonAttnBackend`` (``patches/cuda_graphs.py``)
over SGLang's real hybrid pool and allocator, its metadata built by upstream's ``init_forward_metadata``: the new
token's K/V land at its sliding-pool slot, and its output is attention over exactly the last ``window`` keys
before it and itself (SGLang's window count), read through the full-to-sliding slot map, computed here from the
pool's contents -- on the block kernel (``DFLASH_DECODE_ATTENTION=auto``) and on upstream's decode kernel over its
window listing, one key longer than upstream builds it (``sglang``; sgl-project/sglang#32087). The kernels run in
Triton's interpreter on the CPU (a child pytest with ``TRITON_INTERPRET=1`` and SGLang's CPU engine), compiled on
a GPU. The backend is the patched class with the fields these paths read (its real ``__init__`` needs a CUDA model
runner)."""

from __future__ import annotations

import os
import types

import pytest
import torch
from child_pytest import sglang_cpu_rerun

CHILD = "DFLASH_TEST_DECODE_ROUTE_CHILD"
RUNS_HERE = torch.cuda.is_available() or bool(os.environ.get(CHILD))


test_in_a_child_process = sglang_cpu_rerun(__file__, CHILD, RUNS_HERE, {"TRITON_INTERPRET": "1"})


@pytest.mark.skipif(not RUNS_HERE, reason="runs in the child process of test_in_a_child_process")
@pytest.mark.parametrize("mode", ["auto", "sglang"])
@pytest.mark.parametrize("context", [20, 75], ids=["inside-window", "past-window"])
def test_sliding_decode_sees_the_window_and_itself(monkeypatch, context, mode):
    from sglang.srt import server_args as sglang_server_args
    from sglang.srt.layers.attention.triton_backend import TritonAttnBackend
    from sglang.srt.layers.attention.triton_ops.decode_attention import decode_attention_fwd
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.mem_cache.swa_memory_pool import SWAKVPool, SWATokenToKVPoolAllocator
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    device = "cuda" if torch.cuda.is_available() else "cpu"
    monkeypatch.setenv("DFLASH_DECODE_ATTENTION", mode)
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
    backend.decode_attention_fwd = decode_attention_fwd
    backend.enable_deterministic, backend.use_mla, backend.static_kv_splits = False, False, True
    backend.sliding_window_size, backend.token_to_kv_pool_allocator, backend.device = window, allocator, device
    backend.num_head, backend.num_kv_head, backend.v_head_dim, backend.max_kv_splits = heads, kv_heads, head_dim, 4
    backend.kv_indptr, backend.window_kv_indptr = (torch.zeros(2, dtype=torch.int32, device=device) for _ in range(2))
    backend.req_to_token = torch.zeros(1, 256, dtype=torch.int32, device=device)
    backend.req_to_token[0, :context + 1] = slots.to(torch.int32)
    batch = types.SimpleNamespace(forward_mode=ForwardMode.DECODE, token_to_kv_pool=pool, out_cache_loc=slots[-1:],
                                  batch_size=1, seq_lens=torch.tensor([context + 1], device=device),
                                  seq_lens_sum=context + 1, req_pool_indices=torch.tensor([0], device=device),
                                  spec_info=None)
    backend.init_forward_metadata(batch)
    out = backend.forward_decode(q, keys[-1:], values[-1:], layer, batch)  # k, v as RadixAttention passes them

    assert torch.equal(pool.get_key_buffer(0)[mapping[slots[-1]]], keys[-1])  # written at its sliding slot
    # the block kernel reads the full listing through its window, so the metadata may skip the window listing
    assert backend._dflash_decode_reads_window_listing is (mode == "sglang")
    seen = slice(max(0, context - window), context + 1)  # `window` keys before the query, and itself
    rows = mapping[slots[seen]]
    k = pool.get_key_buffer(0)[rows].float().repeat_interleave(heads // kv_heads, dim=1)
    v = pool.get_value_buffer(0)[rows].float().repeat_interleave(heads // kv_heads, dim=1)
    scores = torch.einsum("hd,shd->hs", q.view(heads, head_dim).float(), k) * head_dim ** -0.5
    expected = torch.einsum("hs,shd->hd", scores.softmax(-1), v).reshape(1, -1)
    assert out.shape == (1, heads * head_dim)
    torch.testing.assert_close(out.float(), expected, rtol=2e-3, atol=2e-3)


@pytest.mark.skipif(not RUNS_HERE, reason="runs in the child process of test_in_a_child_process")
def test_graph_buffer_holds_the_longer_decode_listings():
    """A captured decode batch of ``max_num_tokens`` requests past the window lists ``window + 1`` keys each:
    upstream's buffer holds ``window`` per request, the patched state one more."""
    from sglang.srt.layers.attention.triton_backend import TritonAttnBackend

    backend = object.__new__(TritonAttnBackend)
    backend.num_head, backend.max_kv_splits, backend.v_head_dim, backend.max_context_len = 4, 4, 64, 512
    backend.device, backend.skip_prefill, backend.sliding_window_size = "cpu", True, 31
    backend.init_cuda_graph_state(max_bs=8, max_num_tokens=8)
    assert backend.cuda_graph_window_kv_indices.numel() == 8 * 32
    assert backend.sliding_window_size == 31
