# SPDX-License-Identifier: Apache-2.0
"""SGLang's torch_native backend as patched by ``patches/cpu_attention.py``, on real SGLang pools: a hybrid
``SWAKVPool`` with its ``SWATokenToKVPoolAllocator`` (sliding layer 0 in the window-sized pool, full layer 1),
and a plain ``MHATokenToKVPool``. Extend (prefix-cache hits, a prompt longer than a query tile), decode and
both block passes (the target's causal chain, the drafter's non-causal block; ``DFLASH_BLOCK_ATTENTION`` on and
off) of 3 requests with GQA equal a dense masked SDPA over each request's own K/V in fp32. Slots are shuffled
by the allocators, tokens before the window are evicted (SWA map entry 0) and every row a windowed layer must
not read (evicted, free, padding row 0, and in the plain pool the tokens before the window) holds NaN."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
from child_pytest import sglang_cpu_rerun

from dflash_sglang.deploy.cpu_stub import driver_present

CHILD = "DFLASH_TEST_CPU_ATTENTION_CHILD"
IMPORTED = False
if driver_present() or os.environ.get(CHILD):  # SGLang's layers load sgl_kernel, which needs a GPU driver
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
    from sglang.srt.layers.radix_attention import AttentionType, RadixAttention
    from sglang.srt.mem_cache.allocator import TokenToKVPoolAllocator
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
    from sglang.srt.mem_cache.swa_memory_pool import SWAKVPool, SWATokenToKVPoolAllocator
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode

    from dflash_sglang.serving.info import DFlashVerifyInput

    IMPORTED = True

in_sglang = pytest.mark.skipif(not IMPORTED, reason="runs in the child process of test_in_a_child_process")

HEADS, KV_HEADS, DIM = 4, 2, 8  # GQA: 2 query heads per KV head
SLOTS, SWA_SLOTS, WIDTH = 256, 160, 128  # full slots, SWA slots, req_to_token row width
REQ_POOL_INDICES = [2, 0, 3]  # rows out of batch order
BLOCK = 4


test_in_a_child_process = sglang_cpu_rerun(__file__, CHILD, IMPORTED)


def _shuffle_free_slots(allocator, generator) -> None:
    """Hands every slot out and takes it back in a random order, so later slots are not consecutive."""
    taken = allocator.alloc(allocator.available_size())
    allocator.free(taken[torch.randperm(len(taken), generator=generator)])


class _Case:
    """A batch of requests with ``prefix`` cached tokens and ``new`` tokens of this pass, on a ``kind`` pool
    ("swa" or "mha"); ``k``/``v`` hold each request's K/V at positions 0 .. prefix + new - 1."""

    def __init__(self, kind: str, window: int, causal: bool, prefix: list[int], new: list[int]) -> None:
        generator = torch.Generator().manual_seed(sum(prefix) + 7 * sum(new) + window)
        self.prefix, self.new, self.window = prefix, new, window
        if kind == "swa":
            self.pool = SWAKVPool(size=SLOTS, size_swa=SWA_SLOTS, page_size=1, dtype=torch.float32, head_num=KV_HEADS,
                                  head_dim=DIM, swa_attention_layer_ids=[0], full_attention_layer_ids=[1],
                                  enable_kvcache_transpose=False, device="cpu")
            self.allocator = SWATokenToKVPoolAllocator(SLOTS, SWA_SLOTS, 1, torch.float32, "cpu", self.pool, False)
            _shuffle_free_slots(self.allocator.full_attn_allocator, generator)
            _shuffle_free_slots(self.allocator.swa_attn_allocator, generator)
            layer_id = 0 if window >= 0 else 1  # the SWA pool's full-attention layer has no window
        else:
            self.pool = MHATokenToKVPool(SLOTS, 1, torch.float32, KV_HEADS, DIM, layer_num=2, device="cpu",
                                         enable_memory_saver=False)
            self.allocator = TokenToKVPoolAllocator(SLOTS, torch.float32, "cpu", self.pool, False)
            _shuffle_free_slots(self.allocator, generator)
            layer_id = 0
        self.layer = RadixAttention(HEADS, DIM, DIM ** -0.5, KV_HEADS, layer_id=layer_id, sliding_window_size=window,
                                    attn_type=AttentionType.DECODER if causal else AttentionType.ENCODER_ONLY)
        unread = float("nan") if window >= 0 else 1e3  # the plain block pass reads (masked) padding rows
        self.pool.get_key_buffer(layer_id).fill_(unread)
        self.pool.get_value_buffer(layer_id).fill_(unread)

        self.req_to_token_pool = ReqToTokenPool(4, WIDTH, "cpu", False)
        lengths = [p + n for p, n in zip(prefix, new)]
        self.slots = [torch.empty(0, dtype=torch.int64) for _ in lengths]
        while any(len(s) < n for s, n in zip(self.slots, lengths)):  # requests take slots in turns
            for r, n in enumerate(lengths):
                take = min(n - len(self.slots[r]), int(torch.randint(1, 4, (1,), generator=generator)))
                if take > 0:
                    self.slots[r] = torch.cat([self.slots[r], self.allocator.alloc(take).to(torch.int64)])
        for r, slots in enumerate(self.slots):
            self.req_to_token_pool.req_to_token[REQ_POOL_INDICES[r], :len(slots)] = slots.to(torch.int32)
        self.k = [torch.randn(n, KV_HEADS, DIM, generator=generator) for n in lengths]
        self.v = [torch.randn(n, KV_HEADS, DIM, generator=generator) for n in lengths]
        self.q = [torch.randn(n, HEADS, DIM, generator=generator) for n in new]
        for r, p in enumerate(prefix):  # the cached prefix; the pass writes its new tokens itself
            self.pool.set_kv_buffer(self.layer, self.slots[r][:p], self.k[r][:p], self.v[r][:p])
        if window >= 0:
            self._evict_before_window(kind)

    def _evict_before_window(self, kind: str) -> None:
        """As ``ScheduleBatch._evict_swa``: the SWA rows of tokens before the first query's window go back."""
        for r, p in enumerate(self.prefix):
            old = self.slots[r][:max(p - self.window, 0)]
            if kind == "swa":
                rows = self.pool.full_to_swa_index_mapping[old]
                self.allocator.free_swa(old)
                assert not self.pool.full_to_swa_index_mapping[old].any()
            else:
                rows = old
            self.pool.get_key_buffer(self.layer.layer_id)[rows] = float("nan")
            self.pool.get_value_buffer(self.layer.layer_id)[rows] = float("nan")

    def forward_batch(self, mode, prefix_field: list[int], **fields):
        bs = len(self.prefix)
        seq_lens = torch.tensor(prefix_field)
        return ForwardBatch(
            forward_mode=mode, batch_size=bs, input_ids=torch.zeros(sum(self.new), dtype=torch.int64),
            req_pool_indices=torch.tensor(REQ_POOL_INDICES[:bs]), seq_lens=seq_lens,
            out_cache_loc=torch.cat([s[p:] for s, p in zip(self.slots, self.prefix)]),
            seq_lens_sum=int(seq_lens.sum()), seq_lens_cpu=seq_lens, req_to_token_pool=self.req_to_token_pool,
            token_to_kv_pool=self.pool, **fields)

    def run(self, forward_batch) -> torch.Tensor:
        backend = TorchNativeAttnBackend(SimpleNamespace(device="cpu"))
        forward_batch.attn_backend = backend
        new_k = torch.cat([k[p:] for k, p in zip(self.k, self.prefix)])
        new_v = torch.cat([v[p:] for v, p in zip(self.v, self.prefix)])
        out = backend.forward(torch.cat(self.q).view(-1, HEADS * DIM), new_k, new_v, self.layer, forward_batch)
        assert out.shape == (sum(self.new), HEADS * DIM)
        return out.view(-1, HEADS, DIM)

    def reference(self, causal: bool) -> torch.Tensor:
        """Dense masked SDPA over each request's own (un-mapped) K/V, fp32."""
        outs = []
        for r, p in enumerate(self.prefix):
            length = p + self.new[r]
            distance = torch.arange(p, length)[:, None] - torch.arange(length)[None, :]
            visible = distance >= 0 if causal else torch.ones_like(distance, dtype=torch.bool)
            if self.window >= 0:
                visible &= distance.abs() <= self.window
            out = torch.nn.functional.scaled_dot_product_attention(
                self.q[r].transpose(0, 1)[None], self.k[r].transpose(0, 1)[None], self.v[r].transpose(0, 1)[None],
                attn_mask=visible, scale=DIM ** -0.5, enable_gqa=True)
            outs.append(out[0].transpose(0, 1))
        return torch.cat(outs)

    def check(self, out: torch.Tensor, causal: bool) -> None:
        torch.testing.assert_close(out, self.reference(causal), rtol=1e-5, atol=1e-6)
        for r, p in enumerate(self.prefix):  # the pass wrote its tokens where the layer reads them
            rows = self.slots[r][p:]
            if self.layer.layer_id == 0 and isinstance(self.pool, SWAKVPool):
                rows = self.pool.full_to_swa_index_mapping[rows]
            assert torch.equal(self.pool.get_key_buffer(self.layer.layer_id)[rows], self.k[r][p:])


POOLS = pytest.mark.parametrize("kind", ["swa", "mha"])
WINDOWS = pytest.mark.parametrize("window", [2, 5, 20, -1], ids=["window2", "window5", "window20", "no-window"])
CAUSAL = pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])


@in_sglang
@POOLS
@WINDOWS
@CAUSAL
def test_extend_with_prefix_hits_equals_dense_attention(kind, window, causal):
    prefix, new = [0, 9, 31], [40, 6, 1]  # a 40-token prompt spans several query tiles; a 1-token chunk
    case = _Case(kind, window, causal, prefix, new)
    forward_batch = case.forward_batch(ForwardMode.EXTEND, [p + n for p, n in zip(prefix, new)],
                                       extend_prefix_lens=torch.tensor(prefix), extend_seq_lens=torch.tensor(new),
                                       extend_prefix_lens_cpu=prefix, extend_seq_lens_cpu=new,
                                       extend_num_tokens=sum(new))
    case.check(case.run(forward_batch), causal)


@in_sglang
@POOLS
@WINDOWS
def test_decode_equals_dense_attention(kind, window):
    prefix = [3, 17, 44]  # a request shorter than the window, two past it
    case = _Case(kind, window, True, prefix, [1, 1, 1])
    forward_batch = case.forward_batch(ForwardMode.DECODE, [p + 1 for p in prefix])
    case.check(case.run(forward_batch), True)


@in_sglang
@POOLS
@WINDOWS
@CAUSAL
@pytest.mark.parametrize("mode", ["on", "off"])
def test_block_pass_equals_dense_attention(kind, window, causal, mode, monkeypatch):
    monkeypatch.setenv("DFLASH_BLOCK_ATTENTION", mode)
    prefix = [0, 12, 37]
    case = _Case(kind, window, causal, prefix, [BLOCK] * len(prefix))
    forward_batch = case.forward_batch(ForwardMode.TARGET_VERIFY, prefix, spec_info=DFlashVerifyInput(None, BLOCK))
    case.check(case.run(forward_batch), causal)
    assert torch.equal(forward_batch.seq_lens, torch.tensor(prefix))  # the committed prefix, restored


@in_sglang
def test_layers_of_a_pass_share_its_inputs():
    from dflash_sglang.serving.patches.cpu_attention import window_attention

    case = _Case("swa", 5, True, [4, 30], [BLOCK, BLOCK])
    forward_batch = case.forward_batch(ForwardMode.TARGET_VERIFY, [4, 30], spec_info=DFlashVerifyInput(None, BLOCK))
    first = case.run(forward_batch)
    (key, inputs), = forward_batch._dflash_attention_inputs.items()
    assert key == (True, 5, True)
    assert inputs[2].shape == (2, 5 + BLOCK)  # key slots: window + block, never the whole context
    again = window_attention(torch.cat(case.q), None, None, case.layer, forward_batch, forward_batch.seq_lens,
                             torch.full((2,), BLOCK), True, save_kv_cache=False)
    assert torch.equal(again.view_as(first), first)
    assert len(forward_batch._dflash_attention_inputs) == 1


@in_sglang
def test_swa_layer_without_a_window_is_refused():
    case = _Case("swa", 5, True, [4], [1])
    case.layer.sliding_window_size = -1
    with pytest.raises(NotImplementedError, match="SWA pool but has no sliding window"):
        case.run(case.forward_batch(ForwardMode.DECODE, [5]))
