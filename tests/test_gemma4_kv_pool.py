# SPDX-License-Identifier: Apache-2.0
"""The Gemma 4 target's KV pool (``models/gemma4_kv_pool.py``) on the CPU: every layer keeps buffers of its
own shape in one slot space, SGLang's profiler sizes it by what each layer type takes (the released shapes
get at least twice the tokens of the one-shape pool), and the triton backend's decode partials are viewed at
each layer's width. Server-level checks (golden logits through this pool): tests/test_gemma4.py."""

from __future__ import annotations

import json
import os
import shutil
import types

import pytest
from child_pytest import run_child_pytest
from test_gemma4_config import FIXTURES, RELEASED_26B, RELEASED_31B

from dflash_sglang.deploy.cpu_stub import cpu_server_env, driver_present
from dflash_sglang.serving.models.gemma4_config import FULL, SLIDING

CHILD = "DFLASH_TEST_GEMMA4_KV_POOL_CHILD"
IN_SGLANG = driver_present() or bool(os.environ.get(CHILD))  # SGLang's pools load sgl_kernel (driver or stand-in)
in_sglang = pytest.mark.skipif(not IN_SGLANG, reason="runs in the child process of test_in_a_child_process")


@pytest.mark.skipif(IN_SGLANG, reason="SGLang's memory pools import here: the tests run directly")
def test_in_a_child_process():
    run_child_pytest(__file__, "not test_in_a_child_process", {**cpu_server_env(), CHILD: "1"}, timeout=600)


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
    assert pool.max_v_head_dim == 32

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


class _ProfilingRunner:
    """What ``ModelRunnerKVCacheMixin.profile_max_num_token`` reads of a model runner (SGLang's own method runs)."""

    def __init__(self, model_config, mem_fraction_static: float) -> None:
        import torch

        self.model_config, self.mem_fraction_static = model_config, mem_fraction_static
        self.kv_cache_dtype, self.use_mla_backend = torch.bfloat16, False
        self.is_draft_worker, self.mambaish_config = False, None
        self.num_effective_layers = model_config.num_hidden_layers
        self.device, self.gpu_id = "cuda", 0


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
