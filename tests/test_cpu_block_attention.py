# SPDX-License-Identifier: Apache-2.0
"""The CPU block attention of TARGET_VERIFY passes (``patches.cpu_attention.block_attention_cpu``) against
SGLang's torch_native loop that it replaces (``DFLASH_BLOCK_ATTENTION=off``): the same output for the target's
causal chain and the drafter's non-causal block, at batch sizes 1 and 3 with unequal prefixes, with GQA; and the
block's K/V written to the pool at ``out_cache_loc`` either way."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
from child_pytest import sglang_cpu_rerun

from dflash_sglang.deploy.cpu_stub import driver_present

CHILD = "DFLASH_TEST_CPU_BLOCK_ATTENTION_CHILD"
IMPORTED = False
if driver_present() or os.environ.get(CHILD):  # SGLang's layers load sgl_kernel, which needs a GPU driver
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
    from sglang.srt.layers.radix_attention import AttentionType
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    IMPORTED = True

in_sglang = pytest.mark.skipif(not IMPORTED, reason="runs in the child process of test_in_a_child_process")


test_in_a_child_process = sglang_cpu_rerun(__file__, CHILD, IMPORTED)


class _Pool:
    def __init__(self, num_slots: int, kv_heads: int, dim: int) -> None:
        self.k = torch.randn(num_slots, kv_heads, dim)
        self.v = torch.randn(num_slots, kv_heads, dim)

    def set_kv_buffer(self, layer, loc, k, v) -> None:
        self.k[loc], self.v[loc] = k, v

    def get_key_buffer(self, layer_id):
        return self.k

    def get_value_buffer(self, layer_id):
        return self.v


def _run(prefix_lens: list[int], causal: bool, mode: str, monkeypatch) -> tuple[torch.Tensor, _Pool]:
    torch.manual_seed(0)
    heads, kv_heads, dim, block = 6, 2, 16, 4
    bs, max_context = len(prefix_lens), 64
    pool = _Pool(bs * max_context + 1, kv_heads, dim)
    req_to_token = torch.randperm(bs * max_context).view(bs, max_context).to(torch.int32) + 1  # slot 0: padding
    req_pool_indices = torch.arange(bs).flip(0)  # rows out of order
    seq_lens = torch.tensor(prefix_lens)
    out_cache_loc = torch.cat([req_to_token[req_pool_indices[i], p:p + block].to(torch.int64)
                               for i, p in enumerate(prefix_lens)])
    forward_batch = SimpleNamespace(
        forward_mode=ForwardMode.TARGET_VERIFY, spec_info=SimpleNamespace(custom_mask=None, draft_token_num=block),
        seq_lens=seq_lens, extend_prefix_lens=None, extend_seq_lens=None, req_pool_indices=req_pool_indices,
        req_to_token_pool=SimpleNamespace(req_to_token=req_to_token), token_to_kv_pool=pool,
        out_cache_loc=out_cache_loc, encoder_out_cache_loc=None)
    layer = SimpleNamespace(layer_id=0, tp_q_head_num=heads, tp_k_head_num=kv_heads, qk_head_dim=dim, v_head_dim=dim,
                            scaling=dim ** -0.5, is_cross_attention=False, sliding_window_size=-1,
                            attn_type=AttentionType.DECODER if causal else AttentionType.ENCODER_ONLY)
    q = torch.randn(bs * block, heads * dim)
    k, v = torch.randn(bs * block, kv_heads, dim), torch.randn(bs * block, kv_heads, dim)
    monkeypatch.setenv("DFLASH_BLOCK_ATTENTION", mode)
    backend = TorchNativeAttnBackend.__new__(TorchNativeAttnBackend)
    out = backend.forward_extend(q, k, v, layer, forward_batch)
    assert forward_batch.seq_lens is seq_lens  # restored
    return out, pool


@in_sglang
@pytest.mark.parametrize("prefix_lens", [[7], [7, 0, 19]], ids=["bs1", "bs3-unequal"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal-target", "noncausal-drafter"])
def test_block_attention_matches_torch_native_loop(prefix_lens, causal, monkeypatch):
    out, pool = _run(prefix_lens, causal, "on", monkeypatch)
    ref, ref_pool = _run(prefix_lens, causal, "off", monkeypatch)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(pool.k, ref_pool.k) and torch.equal(pool.v, ref_pool.v)
