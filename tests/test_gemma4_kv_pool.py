# SPDX-License-Identifier: Apache-2.0
"""The Gemma 4 target's KV memory (``models/gemma4_kv_pool.py``) on the CPU: SGLang's model config marks a Gemma 4
as a hybrid sliding-window model (``--disable-hybrid-swa-memory``: our one-slot-space pool, every layer at its own
shape), SGLang's profiler and our split size the pools by what each layer type and the drafter take (the
released shapes get at least twice the tokens of the one-shape pool, and several times more with a window-sized
sliding pool), DFLASH frees sliding slots below the window over SGLang's real SWA allocator
(``kv_slots.evict_swa_slots``), and the triton backend's decode partials are viewed at each layer's width.
Server-level checks (golden logits through these pools): tests/test_gemma4.py."""

from __future__ import annotations

import json
import os
import shutil
import types

import pytest
from child_pytest import sglang_cpu_rerun
from test_gemma4_config import FIXTURES, RELEASED_26B, RELEASED_31B

from dflash_sglang.deploy.cpu_stub import driver_present
from dflash_sglang.serving.models.gemma4_config import FULL, SLIDING

CHILD = "DFLASH_TEST_GEMMA4_KV_POOL_CHILD"
IN_SGLANG = driver_present() or bool(os.environ.get(CHILD))  # SGLang's pools load sgl_kernel (driver or stand-in)
in_sglang = pytest.mark.skipif(not IN_SGLANG, reason="runs in the child process of test_in_a_child_process")


test_in_a_child_process = sglang_cpu_rerun(__file__, CHILD, IN_SGLANG)


def _model_config(tmp_path, variant: str):
    from sglang.srt.configs.model_config import ModelConfig

    path = str(tmp_path / variant)
    shutil.copytree(os.path.join(FIXTURES, variant), path)
    return ModelConfig(path)


@in_sglang
@pytest.mark.parametrize("variant", ["dense", "moe"])
def test_kv_pool_keeps_every_layer_at_its_own_shape(tmp_path, variant, monkeypatch):
    import torch

    from dflash_sglang.serving.models.gemma4_kv_pool import Gemma4KVPool, build_pool

    model_config = _model_config(tmp_path, variant)
    text, size = model_config.hf_text_config, 64
    pool = build_pool(text, 1, size, page_size=1, dtype=torch.float32, head_num=model_config.get_num_kv_heads(1),
                      head_dim=model_config.head_dim, layer_num=text.num_hidden_layers, device="cpu",
                      enable_memory_saver=False, start_layer=0, end_layer=text.num_hidden_layers)
    assert isinstance(pool, Gemma4KVPool) and pool.size == pool.size_swa == size
    shapes = [(text.layer_attention(i).num_kv_heads, text.layer_attention(i).head_dim) for i in range(4)]
    assert shapes == [(2, 16), (1 if variant == "moe" else 2, 32)] * 2  # k_eq_v full layers have 1 KV head
    for i, shape in enumerate(shapes):
        assert tuple(pool.get_key_buffer(i).shape) == tuple(pool.get_value_buffer(i).shape) == (size + 1, *shape)
    assert sum(pool.get_kv_size_bytes()) == (size + 1) * text.kv_bytes_per_token(4)

    # every layer writes the same slots of its own buffers; an offload/reload copy moves all of them
    slots, written = torch.tensor([3, 17]), {}
    for i, (heads, dim) in enumerate(shapes):
        k, v = torch.randn(2, heads, dim), torch.randn(2, heads, dim)
        pool.set_kv_buffer(types.SimpleNamespace(layer_id=i), slots, k, v)
        written[i] = (k, v)
        assert torch.equal(pool.get_key_buffer(i)[slots], k) and torch.equal(pool.get_value_buffer(i)[slots], v)
    assert torch.equal(pool.translate_loc_from_full_to_swa(slots), slots)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: None)  # MHATokenToKVPool's copies sync CUDA
    new_slots = torch.tensor([5, 9])
    pool.load_cpu_copy(pool.get_cpu_copy(slots), new_slots)
    for i, (k, v) in written.items():
        assert torch.equal(pool.get_key_buffer(i)[new_slots], k) and torch.equal(pool.get_value_buffer(i)[new_slots], v)


@in_sglang
@pytest.mark.parametrize("variant", ["dense", "moe"])
def test_model_config_is_hybrid_sliding_window_unless_disabled(tmp_path, variant):
    from sglang.srt.configs.model_config import ModelConfig

    path = str(tmp_path / variant)
    shutil.copytree(os.path.join(FIXTURES, variant), path)
    hybrid = ModelConfig(path)
    assert hybrid.is_hybrid_swa and hybrid.is_hybrid_swa_compress
    assert (hybrid.swa_attention_layer_ids, hybrid.full_attention_layer_ids) == ([0, 2], [1, 3])
    assert (hybrid.swa_head_dim, hybrid.head_dim, hybrid.get_swa_num_kv_heads(1)) == (16, 32, 2)
    text = hybrid.hf_text_config
    assert (text.swa_head_dim, text.swa_v_head_dim, text.v_head_dim) == (16, 16, 32)
    assert not ModelConfig(path, disable_hybrid_swa_memory=True).is_hybrid_swa


class _ProfilingRunner:
    """What ``ModelRunnerKVCacheMixin.profile_max_num_token`` reads of a model runner (SGLang's own method runs)."""

    def __init__(self, model_config, mem_fraction_static: float) -> None:
        import torch

        self.model_config, self.mem_fraction_static = model_config, mem_fraction_static
        self.kv_cache_dtype, self.use_mla_backend = torch.bfloat16, False
        self.is_draft_worker, self.mambaish_config = False, None
        self.num_effective_layers = model_config.num_hidden_layers
        self.device, self.gpu_id = "cuda", 0
        self.server_args = types.SimpleNamespace(speculative_algorithm=None)  # a plain server: no drafter's KV


@in_sglang
@pytest.mark.parametrize("name, overrides, weights_gb", [("31B", {}, 62), ("26B-A4B", RELEASED_26B, 52)])
def test_h200_token_capacity_at_least_doubles(tmp_path, monkeypatch, name, overrides, weights_gb):
    """SGLang's profiler on a 139 GiB GPU at --mem-fraction-static 0.789 (what the 26B-A4B's logged 133797 tokens
    with the padded pool imply), with our per-layer-type cell size against the one-shape pool's."""
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.model_executor import model_runner_kv_cache_mixin as mixin_module

    path = tmp_path / name
    path.mkdir()
    config = {"architectures": ["Gemma4ForConditionalGeneration"], "model_type": "gemma4",
              "text_config": {**RELEASED_31B, **overrides}}
    (path / "config.json").write_text(json.dumps(config))
    model_config = ModelConfig(str(path))
    text = model_config.hf_text_config
    gpu_gib, weights_gib, fraction = 139.0, weights_gb * 1e9 / 2 ** 30, 0.789
    monkeypatch.setattr(mixin_module, "get_available_gpu_memory", lambda *args, **kwargs: gpu_gib - weights_gib)
    monkeypatch.setattr(mixin_module, "get_world_group", lambda: types.SimpleNamespace(world_size=1, cpu_group=None))
    monkeypatch.setattr(mixin_module, "get_attention_tp_size", lambda: 1)
    runner = type("Runner", (_ProfilingRunner, mixin_module.ModelRunnerKVCacheMixin), {})(model_config, fraction)
    tokens = runner.profile_max_num_token(gpu_gib)

    rest_bytes = int((gpu_gib - weights_gib - gpu_gib * (1 - fraction)) * 2 ** 30)
    widest_heads, widest_dim = max(text.kv_shape(SLIDING)[0], text.kv_shape(FULL)[0]), text.kv_shape(FULL)[1]
    padded_tokens = rest_bytes // (text.num_hidden_layers * widest_heads * 2 * widest_dim * 2)
    assert tokens == rest_bytes // text.kv_bytes_per_token(2)
    print(f"{name}: {padded_tokens} tokens with one {widest_heads} x {widest_dim} pool -> {tokens} per layer type")
    assert tokens >= 2 * padded_tokens

    # the window-sized sliding pool: upstream's split, through our replacement (no drafter here)
    runner.sliding_window_size = text.sliding_window - 1
    for ratio, at_least in ((0.8, 1.1), (0.25, 2.5)):
        runner.server_args = types.SimpleNamespace(swa_full_tokens_ratio=ratio, page_size=1, speculative_algorithm=None)
        _, full, swa = runner._resolve_hybrid_swa_tokens(tokens)
        print(f"{name}: --swa-full-tokens-ratio {ratio}: {full} full slots, {swa} sliding slots")
        assert swa == int(full * ratio) and full >= at_least * tokens
        full_bytes, swa_bytes = (2 * heads * dim * 2 * len(text.layer_ids(kind))
                                 for kind, (heads, dim) in ((k, text.kv_shape(k)) for k in (FULL, SLIDING)))
        assert full * full_bytes + swa * swa_bytes <= rest_bytes < (full + 2) * full_bytes + (swa + 3) * swa_bytes


@in_sglang
def test_split_keeps_the_drafter_in_the_profiled_memory():
    """A DFLASH drafter's pool has one row per full slot: the split leaves room for it, page-aligned."""
    from dflash_sglang.serving.models.gemma4_config import Gemma4TextConfig
    from dflash_sglang.serving.models.gemma4_kv_pool import split_swa_tokens

    text = Gemma4TextConfig(**RELEASED_31B)
    cell, draft = text.kv_bytes_per_token(2), 5 * 2 * 8 * 128 * 2
    memory = 60_000 * (cell + draft)
    for page_size in (1, 64):
        full, swa = split_swa_tokens(60_000, text, 2, 1, 0.25, page_size, draft)
        assert full % page_size == swa % page_size == 0 and swa == int(full * 0.25) // page_size * page_size
        full_bytes = 2 * 4 * 512 * 2 * len(text.layer_ids(FULL))
        swa_bytes = 2 * 16 * 256 * 2 * len(text.layer_ids(SLIDING))
        used = full * (full_bytes + draft) + swa * swa_bytes
        assert used <= memory < used + (page_size + 1) * (full_bytes + draft + 2 * swa_bytes)
    assert split_swa_tokens(60_000, text, 2, 1, 0.25, 1, draft)[0] < split_swa_tokens(60_000, text, 2, 1, 0.25, 1)[0]


@in_sglang
def test_triton_decode_partials_are_viewed_at_each_layers_width(monkeypatch):
    """SGLang's decode kernels find a split's log-sum-exp at (partials' strides) // v_head_dim, so a layer
    narrower than the buffer must see a contiguous [tokens, heads, splits, its v_head_dim] view."""
    import torch
    from sglang.srt.layers.attention.triton_backend import TritonAttnBackend

    from dflash_sglang.serving.patches.gemma4 import _layer_type_triton_backend

    seen = []

    def upstream_forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, sinks=None):
        partials = self.forward_metadata.attn_logits
        seen.append((tuple(partials.shape), partials.is_contiguous(), partials.data_ptr()))

    monkeypatch.setattr(TritonAttnBackend, "forward_decode", upstream_forward_decode)
    backend = object.__new__(_layer_type_triton_backend())  # the real __init__ needs a CUDA model runner
    buffer = torch.zeros(3, 4, 8, 16)  # [tokens, heads, kv splits, widest v_head_dim]
    backend.forward_metadata = types.SimpleNamespace(attn_logits=buffer)
    for width in (8, 16):
        backend.forward_decode(None, None, None, types.SimpleNamespace(v_head_dim=width), None)
    assert seen == [((3, 4, 8, 8), True, buffer.data_ptr()), ((3, 4, 8, 16), True, buffer.data_ptr())]
    assert backend.forward_metadata.attn_logits is buffer



def _runner(**options) -> types.SimpleNamespace:
    """The server options ``_check_layer_type_pool_options`` reads, as ServerArgs has them."""
    args = types.SimpleNamespace(**{
        "attention_backend": "triton", "prefill_attention_backend": None, "decode_attention_backend": None,
        "speculative_draft_attention_backend": None, "enable_hierarchical_cache": False,
        "disaggregation_mode": "null", **options})
    args.get_attention_backends = lambda: (args.prefill_attention_backend or args.attention_backend,
                                           args.decode_attention_backend or args.attention_backend)
    return types.SimpleNamespace(server_args=args, is_draft_worker=False)


@pytest.mark.parametrize("options, refused", [
    ({"attention_backend": "fa3"}, "attention backend fa3"),
    ({"decode_attention_backend": "flashinfer"}, "attention backend flashinfer"),
    ({"enable_hierarchical_cache": True}, "--enable-hierarchical-cache"),
    ({"disaggregation_mode": "prefill"}, "--disaggregation-mode"),
])
def test_options_the_pool_does_not_serve_are_refused_by_name(options, refused):
    from dflash_sglang.serving.patches.gemma4 import _check_layer_type_pool_options

    for backend in ("triton", "torch_native"):
        _check_layer_type_pool_options(_runner(attention_backend=backend))
    with pytest.raises(NotImplementedError, match=refused):
        _check_layer_type_pool_options(_runner(**options))


def _swa_batch(monkeypatch, page_size: int, window: int, lens: list[int]):
    """SGLang's hybrid pool and allocator on the CPU for the tiny dense Gemma 4 (2 full + 2 sliding layers), and
    what ``evict_swa_slots`` reads of a ScheduleBatch, with ``lens`` tokens prefilled per request."""
    import torch
    from sglang.srt import server_args as sglang_server_args
    from sglang.srt.mem_cache.swa_memory_pool import SWAKVPool, SWATokenToKVPoolAllocator

    from dflash_sglang.serving.kv_slots import assign_row_slots

    # get_last_loc picks its implementation from the global server args (torch on the torch_native backend)
    monkeypatch.setattr(sglang_server_args, "_global_server_args",
                        types.SimpleNamespace(attention_backend="torch_native"))
    size, size_swa = 4096, 1024
    pool = SWAKVPool(size=size, size_swa=size_swa, page_size=page_size, dtype=torch.float32, head_num=2, head_dim=32,
                     swa_attention_layer_ids=[0, 2], full_attention_layer_ids=[1, 3], enable_kvcache_transpose=False,
                     device="cpu", swa_head_num=2, swa_head_dim=16, swa_v_head_dim=16, v_head_dim=32)
    allocator = SWATokenToKVPoolAllocator(size, size_swa, page_size=page_size, dtype=torch.float32, device="cpu",
                                          kvcache=pool, need_sort=False)
    tree_cache = types.SimpleNamespace(token_to_kv_pool_allocator=allocator, page_size=page_size,
                                       sliding_window_size=window, supports_swa=lambda: True,
                                       is_chunk_cache=lambda: True)
    req_to_token = torch.zeros(len(lens), 2048, dtype=torch.int32)
    reqs = [types.SimpleNamespace(req_pool_idx=i, kv_committed_len=n, swa_evicted_seqlen=0, cache_protected_len=0,
                                  decode_batch_idx=1) for i, n in enumerate(lens)]
    assign_row_slots(tree_cache, req_to_token, list(range(len(lens))), [0] * len(lens), lens)
    return types.SimpleNamespace(tree_cache=tree_cache, reqs=reqs, token_to_kv_pool_allocator=allocator,
                                 req_to_token_pool=types.SimpleNamespace(req_to_token=req_to_token))


@in_sglang
@pytest.mark.parametrize("page_size", [1, 16])
def test_dflash_steps_free_sliding_slots_below_the_window_and_keep_the_rest(monkeypatch, page_size):
    """The v1 loop's bookkeeping (evict, block slots, verdict, rejected slots freed) for 60 steps: every position
    from ``swa_evicted_seqlen`` on keeps a sliding slot, none before it does, the evicted length trails the
    window by at most a stride, no sliding slot is held twice, and every slot of both pools comes back."""
    import random

    import torch

    from dflash_sglang.serving.kv_slots import (SWA_EVICT_STRIDE, assign_row_slots, evict_swa_slots,
                                                first_freeable_offsets)

    block, window, lens = 8, 40, [30, 75, 140]
    batch = _swa_batch(monkeypatch, page_size, window, lens)
    allocator, req_to_token = batch.token_to_kv_pool_allocator, batch.req_to_token_pool.req_to_token
    mapping = allocator.full_to_swa_index_mapping
    rng = random.Random(page_size)

    def check() -> None:
        live = []
        for req in batch.reqs:
            slots = req_to_token[req.req_pool_idx, :req.kv_committed_len].to(torch.int64)
            kept = mapping[slots[req.swa_evicted_seqlen:]]
            assert bool((kept > 0).all()) and not bool(mapping[slots[:req.swa_evicted_seqlen]].any())
            assert req.swa_evicted_seqlen <= max(0, req.kv_committed_len - window - block)
            if req.kv_committed_len - window - block >= SWA_EVICT_STRIDE + page_size:
                assert req.swa_evicted_seqlen > req.kv_committed_len - window - block - SWA_EVICT_STRIDE - page_size
            live.append(kept)
        live = torch.cat(live)
        assert live.unique().numel() == live.numel(), "a sliding slot held twice"

    evicted_any = False
    for _ in range(60):
        evict_swa_slots(batch, slack=block, skip_first_decode=False)
        check()
        evicted_any |= any(req.swa_evicted_seqlen > 0 for req in batch.reqs)
        lens = [req.kv_committed_len for req in batch.reqs]
        block_slots = assign_row_slots(batch.tree_cache, req_to_token, list(range(len(lens))), lens,
                                       [n + block for n in lens]).view(-1, block)
        kept = torch.tensor([rng.randint(1, block) for _ in lens])
        rejected = torch.arange(block)[None, :] >= first_freeable_offsets(torch.tensor(lens), kept, page_size)[:, None]
        allocator.free(block_slots[rejected])
        for req, n in zip(batch.reqs, kept.tolist()):
            req.kv_committed_len += n
    assert evicted_any

    # the step in flight may still read the window: a request whose prefill may be running is left alone
    waiting = batch.reqs[0]
    waiting.decode_batch_idx, before = 0, waiting.swa_evicted_seqlen
    waiting.kv_committed_len += 4 * SWA_EVICT_STRIDE  # as if far ahead (its slots are never read here)
    evict_swa_slots(batch, slack=block, skip_first_decode=True)
    assert waiting.swa_evicted_seqlen == before
    waiting.kv_committed_len -= 4 * SWA_EVICT_STRIDE

    # the verdicts freed every rejected slot but those sharing a kept token's page: releasing the committed tokens
    # (their pages) gives back everything, sliding slots included (evicted ones map to 0 and are skipped)
    for req in batch.reqs:
        allocator.free(req_to_token[req.req_pool_idx, :req.kv_committed_len].to(torch.int64))
    free_sizes = allocator.full_available_size(), allocator.swa_available_size()
    assert free_sizes == (allocator.size_full, allocator.size_swa)


@in_sglang
def test_sliding_layers_write_at_one_translation_of_the_batch_slots(monkeypatch):
    """Inside ``sliding_slots_translated_once`` both sliding layers of SGLang's hybrid pool write their K/V at the
    batch's sliding-pool slots, translated once for the forward (upstream translated per layer in CUDA graphs),
    and the pool's ``swa_loc`` is what it was before on exit; the batch's own translation is used when it has one."""
    import torch

    from dflash_sglang.serving.models.gemma4_kv_pool import sliding_slots_translated_once

    batch = _swa_batch(monkeypatch, page_size=1, window=40, lens=[30, 75])
    allocator = batch.token_to_kv_pool_allocator
    pool, mapping = allocator._kvcache, allocator.full_to_swa_index_mapping
    slots = batch.req_to_token_pool.req_to_token[1, 70:75].to(torch.int64)
    mapping[slots] = mapping[slots].flip(0)  # the allocators hand out equal slots here: make them differ
    translations = []
    translate = pool.translate_loc_from_full_to_swa
    monkeypatch.setattr(pool, "translate_loc_from_full_to_swa", lambda loc: translations.append(loc) or translate(loc))

    forward_batch = types.SimpleNamespace(token_to_kv_pool=pool, out_cache_loc=slots, out_cache_loc_swa=None)
    with sliding_slots_translated_once(forward_batch):
        for layer_id in (0, 2):  # the sliding layers of _swa_batch's pool
            k, v = torch.randn(5, 2, 16), torch.randn(5, 2, 16)
            pool.set_kv_buffer(types.SimpleNamespace(layer_id=layer_id), slots, k, v)
            assert torch.equal(pool.get_key_buffer(layer_id)[mapping[slots]], k)
            assert torch.equal(pool.get_value_buffer(layer_id)[mapping[slots]], v)
    assert len(translations) == 1 and pool.swa_loc is None

    eager = types.SimpleNamespace(token_to_kv_pool=pool, out_cache_loc=slots, out_cache_loc_swa=mapping[slots].int())
    pool.set_swa_loc(eager.out_cache_loc_swa)  # as ModelRunner._forward_raw sets it for an eager batch
    with sliding_slots_translated_once(eager):
        assert pool.swa_loc is eager.out_cache_loc_swa
    assert len(translations) == 1 and pool.swa_loc is eager.out_cache_loc_swa


@in_sglang
def test_translation_scope_is_left_to_the_runner_under_torch_compile(monkeypatch):
    """SGLang's piecewise CUDA graphs (on by default for a text-only target without speculative decoding) trace
    the model with dynamo, and the runner sets the pool's ``swa_loc`` itself. The scope must then stand aside: the
    real allocator's mapping is a ``weakref.proxy``, which dynamo cannot inspect (a server start failed on it)."""
    import torch

    from dflash_sglang.serving.models.gemma4_kv_pool import sliding_slots_translated_once

    batch = _swa_batch(monkeypatch, page_size=1, window=40, lens=[30, 75])
    pool = batch.token_to_kv_pool_allocator._kvcache
    slots = batch.req_to_token_pool.req_to_token[1, 70:75].to(torch.int64)
    forward_batch = types.SimpleNamespace(token_to_kv_pool=pool, out_cache_loc=slots, out_cache_loc_swa=None)
    torch._dynamo.reset()

    @torch.compile(backend="eager", fullgraph=True)
    def layers(hidden: torch.Tensor) -> torch.Tensor:
        with sliding_slots_translated_once(forward_batch):
            return hidden * 2

    hidden = torch.randn(5, 16)
    assert torch.equal(layers(hidden), hidden * 2)
    assert pool.swa_loc is None
