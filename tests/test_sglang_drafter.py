# SPDX-License-Identifier: Apache-2.0
"""The SGLang drafter's attention setup: each layer's RadixAttention gets SGLang's window convention (keys
before the query: transformers' ``sliding_window`` minus one) and the config's causality (``ENCODER_ONLY`` =
non-causal); the model reports that window to SGLang's backends; window/backend combinations a backend would
apply wrongly are refused. The attention itself is tested against the plain drafter end to end
(tests/test_server_e2e.py)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
from child_pytest import sglang_cpu_rerun

from dflash_sglang.core.config import DFlashDraftConfig
from dflash_sglang.deploy.cpu_stub import driver_present

CHILD = "DFLASH_TEST_SGLANG_DRAFTER_CHILD"
IMPORTED = False
if driver_present() or os.environ.get(CHILD):  # SGLang's layers load sgl_kernel, which needs a GPU driver
    from sglang.srt.layers.radix_attention import AttentionType  # or the CPU stand-in at start-up
    from sglang.srt.server_args import set_global_server_args_for_scheduler

    from dflash_sglang.serving.models.dflash_draft import (DFlashDraftAttention, DFlashDraftModel,
                                                           check_windows_on_backends, sglang_window)
    IMPORTED = True

in_sglang = pytest.mark.skipif(not IMPORTED, reason="runs in the child process of test_in_a_child_process")


test_in_a_child_process = sglang_cpu_rerun(__file__, CHILD, IMPORTED)


def _config(**overrides) -> DFlashDraftConfig:
    raw = {
        "architectures": ["DFlashDraftModel"], "hidden_size": 16, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8, "intermediate_size": 32,
        "vocab_size": 50, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "layer_types": ["sliding_attention", "full_attention"], "sliding_window": 6,
        "dflash_config": {"block_size": 4, "mask_token_id": 3, "target_layer_ids": [0, 1]},
    }
    raw.update(overrides)
    return DFlashDraftConfig.from_dict(raw)


@in_sglang
def test_sglang_window_counts_the_keys_before_the_query():
    assert sglang_window(None) == -1
    assert sglang_window(6) == 5  # query p sees keys p-5 .. p: six with itself


@in_sglang
@pytest.mark.parametrize("is_causal, expected", [
    (None, [(5, "DECODER"), (-1, "ENCODER_ONLY")]),
    (False, [(5, "ENCODER_ONLY"), (-1, "ENCODER_ONLY")]),
    (True, [(5, "DECODER"), (-1, "DECODER")]),
], ids=["default", "explicit-non-causal", "explicit-causal"])
def test_layers_pass_window_and_causality(is_causal, expected):
    set_global_server_args_for_scheduler(SimpleNamespace(rl_on_policy_target=None))  # read by get_rope
    config = _config() if is_causal is None else _config(is_causal=is_causal)
    layers = [DFlashDraftAttention(config, i, max_position=64, tp_rank=0, tp_size=1).attn for i in range(2)]
    assert [(layer.sliding_window_size, AttentionType(layer.attn_type).name) for layer in layers] == expected


@in_sglang
def test_model_reports_the_window_to_the_backends():
    window = DFlashDraftModel.get_attention_sliding_window_size
    assert window(SimpleNamespace(draft_config=_config())) == 5
    assert window(SimpleNamespace(draft_config=_config(layer_types=["full_attention"] * 2))) is None


@in_sglang
@pytest.mark.parametrize("backend", ["triton", "fa3", "fa4", "flashinfer", "torch_native"])
def test_causal_sliding_layers_run_on_every_backend(backend):
    check_windows_on_backends(_config(), {backend})


@in_sglang
@pytest.mark.parametrize("backend", ["fa3", "fa4", "flashinfer"])
def test_non_causal_sliding_layers_are_refused_where_the_window_would_be_wrong(backend):
    with pytest.raises(NotImplementedError, match="speculative-draft-attention-backend triton"):
        check_windows_on_backends(_config(is_causal=False), {backend})


@in_sglang
def test_non_causal_windows_shorter_than_a_block_need_the_block_kernel_on_triton(monkeypatch):
    check_windows_on_backends(_config(is_causal=False), {"triton"})
    check_windows_on_backends(_config(is_causal=False, sliding_window=3), {"triton"})  # the block kernel: both sides
    monkeypatch.setenv("DFLASH_BLOCK_ATTENTION", "off")  # SGLang's extend kernel bounds only the left side
    check_windows_on_backends(_config(is_causal=False), {"triton"})
    with pytest.raises(NotImplementedError, match="block_size"):
        check_windows_on_backends(_config(is_causal=False, sliding_window=3), {"triton"})
