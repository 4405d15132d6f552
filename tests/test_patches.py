# SPDX-License-Identifier: Apache-2.0
"""The patch table and the ``patches`` decorator: every entry names a real patch, a patch applies once,
and each SGLang module named in the table exists in the installed SGLang (no import needed to check)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import types

import pytest

from dflash_sglang.serving import plugin
from dflash_sglang.serving.patches import PATCHED_MARK, patches


@pytest.mark.parametrize("sglang_module", sorted(plugin.PATCHES))
def test_every_table_entry_names_a_patch_and_an_existing_sglang_module(sglang_module):
    module_name, function = plugin.PATCHES[sglang_module].split(":")
    patch = getattr(importlib.import_module(f"dflash_sglang.serving.patches.{module_name}"), function)
    assert callable(patch) and patch.__doc__, f"{plugin.PATCHES[sglang_module]} needs a docstring"
    # Located by path: importing some of SGLang's packages loads sgl_kernel, which needs a GPU driver.
    root = os.path.dirname(importlib.util.find_spec("sglang").origin)
    relative = os.path.join(root, *sglang_module.split(".")[1:])
    assert os.path.isfile(relative + ".py") or os.path.isfile(os.path.join(relative, "__init__.py")), \
        f"SGLang has no {sglang_module}"


def test_a_patch_applies_once_and_marks_its_target():
    calls = []

    class Target:
        def greet(self) -> str:
            return "hello"

    @patches(lambda module: module.Target)
    def patch_target(cls) -> None:
        """Wraps Target.greet."""
        calls.append(cls)
        original = cls.greet
        cls.greet = lambda self: original(self) + ", DFLASH"

    module = types.ModuleType("fake_sglang_module")
    module.Target = Target
    patch_target(module)
    patch_target(module)
    assert calls == [Target] and vars(Target)[PATCHED_MARK] is True
    assert Target().greet() == "hello, DFLASH"
    assert patch_target.__doc__ == "Wraps Target.greet."


def test_a_subclass_of_a_patched_class_is_patched_on_its_own():
    class Base:
        pass

    class Child(Base):
        pass

    patched = []
    patch_base = patches(lambda module: module.Base)(patched.append)
    patch_child = patches(lambda module: module.Child)(patched.append)
    module = types.SimpleNamespace(Base=Base, Child=Child)
    patch_base(module)
    patch_child(module)  # the mark Child inherits from Base must not stop its own patch
    assert patched == [Base, Child]


# ------------------------------------------------------------------------------------------------------
# Which triton-backend extend calls run the block attention kernel. The layers are SGLang's own
# RadixAttention; the backend's metadata and the batch are the few fields the predicate reads (the real
# TritonAttnBackend needs a CUDA model runner).
def _route(layer=None, mode="TARGET_VERIFY", custom_mask=None, kv_dtype="bfloat16", sinks=None, env=None,
           monkeypatch=None) -> bool:
    import torch
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    from dflash_sglang.serving.patches.cuda_graphs import _runs_block_attention

    if env is not None:
        monkeypatch.setenv("DFLASH_BLOCK_ATTENTION", env)
    layer = layer or RadixAttention(32, 128, 128 ** -0.5, 8, layer_id=0)
    q = torch.empty(16, 32 * 128, dtype=torch.bfloat16)
    backend = types.SimpleNamespace(forward_metadata=types.SimpleNamespace(custom_mask=custom_mask),
                                    enable_deterministic=False, use_mla=False)
    batch = types.SimpleNamespace(forward_mode=ForwardMode[mode],
                                  token_to_kv_pool=types.SimpleNamespace(dtype=getattr(torch, kv_dtype)))
    return _runs_block_attention(backend, q, q, q, layer, batch, sinks)


def test_block_attention_routes_dflash_block_passes_only(monkeypatch):
    from sglang.srt.layers.radix_attention import AttentionType, RadixAttention

    def layer(**kwargs):
        return RadixAttention(32, kwargs.pop("head_dim", 128), 0.1, 8, layer_id=0, **kwargs)

    assert _route()  # the target's verify pass
    assert _route(layer(attn_type=AttentionType.ENCODER_ONLY))  # the drafter's pass
    assert _route(layer(head_dim=256)) and _route(layer(head_dim=512))
    assert _route(layer(head_dim=16)) and _route(layer(head_dim=32))  # the golden fixtures' heads
    assert _route(layer(sliding_window_size=1023))  # Gemma 4's sliding layers: the kernel applies the window
    # Everything else keeps SGLang's kernels.
    assert not _route(mode="EXTEND") and not _route(mode="DECODE")
    assert not _route(custom_mask=object())  # an EAGLE tree
    assert not _route(layer(logit_cap=30.0))
    assert not _route(layer(head_dim=80))
    assert not _route(layer(v_head_dim=64))
    assert not _route(kv_dtype="float8_e4m3fn")
    assert not _route(sinks=object())
    assert not _route(env="off", monkeypatch=monkeypatch)


def _decode_route(layer, env: str, monkeypatch, mode: str = "DECODE") -> bool:
    import torch
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    from dflash_sglang.serving.patches.cuda_graphs import _runs_block_decode

    monkeypatch.setenv("DFLASH_DECODE_ATTENTION", env)
    q = torch.empty(1, 32 * layer.qk_head_dim, dtype=torch.bfloat16)
    backend = types.SimpleNamespace(enable_deterministic=False, use_mla=False)
    batch = types.SimpleNamespace(forward_mode=ForwardMode[mode],
                                  token_to_kv_pool=types.SimpleNamespace(dtype=torch.bfloat16))
    return _runs_block_decode(backend, q, q, q, layer, batch, None)


def test_decode_steps_of_windowed_layers_run_the_block_kernel_by_default(monkeypatch):
    """``auto``: sliding-window layers decode on the block kernel (no window listing, no host sync),
    full layers on SGLang's; ``block``: every layer the kernel covers; ``sglang``: none."""
    from sglang.srt.layers.radix_attention import RadixAttention

    sliding = RadixAttention(32, 256, 1.0, 16, layer_id=0, sliding_window_size=1023)
    full = RadixAttention(32, 512, 1.0, 4, layer_id=1)
    capped = RadixAttention(32, 256, 1.0, 16, layer_id=2, sliding_window_size=1023, logit_cap=30.0)
    assert _decode_route(sliding, "auto", monkeypatch) and not _decode_route(full, "auto", monkeypatch)
    assert _decode_route(sliding, "block", monkeypatch) and _decode_route(full, "block", monkeypatch)
    assert not _decode_route(sliding, "sglang", monkeypatch) and not _decode_route(full, "sglang", monkeypatch)
    assert not _decode_route(capped, "auto", monkeypatch)  # what the kernel does not cover keeps SGLang's
    assert not _decode_route(sliding, "block", monkeypatch, mode="EXTEND")


def test_decode_metadata_lists_one_key_more_or_none_once_no_layer_reads_it():
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    from dflash_sglang.serving.patches.cuda_graphs import _DecodeWindowListing, _skips_decode_window_listing

    backend = types.SimpleNamespace(sliding_window_size=1023)
    decode = ForwardMode.DECODE

    def window_seen(forward_mode, spec_info=None):
        with _DecodeWindowListing(backend, forward_mode, spec_info):
            seen = backend.sliding_window_size
        assert backend.sliding_window_size == 1023
        return seen

    assert not _skips_decode_window_listing(backend, decode, None)  # no decode forward yet: build it
    assert window_seen(decode) == 1024  # the query's own key and 1023 before it
    assert window_seen(ForwardMode.EXTEND) == window_seen(ForwardMode.TARGET_VERIFY) == 1023
    assert window_seen(decode, object()) == 1023  # a speculative decode input: upstream's as it is
    backend._dflash_decode_reads_window_listing = False  # every windowed layer ran the block kernel
    assert _skips_decode_window_listing(backend, decode, None)
    assert window_seen(decode) is None
    assert not _skips_decode_window_listing(backend, ForwardMode.TARGET_VERIFY, None)
    assert not _skips_decode_window_listing(backend, decode, object())
    backend._dflash_decode_reads_window_listing = True  # some windowed layer ran upstream's kernel
    assert not _skips_decode_window_listing(backend, decode, None)
    assert window_seen(decode) == 1024
    backend.sliding_window_size = None  # a model without windows: nothing changes
    with _DecodeWindowListing(backend, decode, None):
        assert backend.sliding_window_size is None
