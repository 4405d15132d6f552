# SPDX-License-Identifier: Apache-2.0
"""Gemma 4 configs under SGLang's transformers pin (5.3.0): the released layouts parse without
trust_remote_code, per-layer attention shapes and the KV shapes per layer type are derived as transformers'
Gemma 4 does, unsupported variants fail by name, and SGLang's own ModelConfig (through the plugin's hooks)
sees a text-only model with its full-attention and sliding KV shapes apart (SGLang's hybrid-SWA names).
(The KV pool built from these: tests/test_gemma4_kv_pool.py.)"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from dflash_sglang.serving.models.gemma4_config import FULL, SLIDING, Gemma4Config, Gemma4TextConfig, check_servable

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "gemma4")
PATTERN = (["sliding_attention"] * 5 + ["full_attention"]) * 10
ROPE = {"full_attention": {"partial_rotary_factor": 0.25, "rope_theta": 1000000.0, "rope_type": "proportional"},
        "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"}}
# google/gemma-4-31B-it's text_config, as quoted by public third-party loader tests (see gemma4_config.py).
RELEASED_31B = {
    "model_type": "gemma4_text", "hidden_size": 5376, "num_hidden_layers": 60, "intermediate_size": 21504,
    "num_attention_heads": 32, "num_key_value_heads": 16, "num_global_key_value_heads": 4, "head_dim": 256,
    "global_head_dim": 512, "vocab_size": 262144, "rms_norm_eps": 1e-6, "max_position_embeddings": 262144,
    "sliding_window": 1024, "final_logit_softcapping": 30.0, "use_double_wide_mlp": False,
    "num_kv_shared_layers": 0, "hidden_size_per_layer_input": 0, "attention_k_eq_v": True,
    "enable_moe_block": False, "tie_word_embeddings": True, "layer_types": PATTERN, "rope_parameters": ROPE,
}

# google/gemma-4-26B-A4B-it's text_config: what differs from the 31B's.
RELEASED_26B = dict(hidden_size=2816, num_hidden_layers=30, layer_types=PATTERN[:30], num_attention_heads=16,
                    num_key_value_heads=8, num_global_key_value_heads=2, intermediate_size=2112,
                    enable_moe_block=True, num_experts=128, top_k_experts=8, moe_intermediate_size=704)


def _released(**text_overrides) -> Gemma4Config:
    return Gemma4Config.from_dict({"architectures": ["Gemma4ForConditionalGeneration"], "model_type": "gemma4",
                                   "text_config": {**RELEASED_31B, **text_overrides},
                                   "vision_config": {"model_type": "gemma4_vision", "hidden_size": 1152}})


def test_released_31b_layout_per_layer_attention_and_kv_pool():
    text = _released().text_config
    assert isinstance(text, Gemma4TextConfig) and text.rope_parameters == ROPE
    sliding, full = text.layer_attention(0), text.layer_attention(5)
    assert (sliding.head_dim, sliding.num_kv_heads, sliding.k_eq_v, sliding.rope_theta, sliding.rotary_fraction,
            sliding.sliding_window) == (256, 16, False, 10000.0, 1.0, 1024)
    assert (full.head_dim, full.num_kv_heads, full.k_eq_v, full.rope_theta, full.rotary_fraction,
            full.sliding_window) == (512, 4, True, 1000000.0, 0.25, None)
    assert (text.kv_shape(SLIDING), text.kv_shape(FULL)) == ((16, 256), (4, 512))
    assert (len(text.layer_ids(SLIDING)), text.layer_ids(FULL)[:2]) == (50, [5, 11])
    # bf16 K+V per token: 50 x 16 x 256 x 4 B + 10 x 4 x 512 x 4 B; one 16 x 512 pool for all 60 layers
    # (the layout before per-layer-type pools) took 60 x 16 x 512 x 4 B = 1966080 B, 2.18x as much
    assert text.kv_bytes_per_token(2) == 819200 + 81920
    check_servable(text, tp_size=1, moe_tp_size=1)


def test_released_26b_a4b_moe_layout():
    text = _released(**RELEASED_26B).text_config
    assert (text.kv_shape(SLIDING), text.kv_shape(FULL)) == ((8, 256), (2, 512))
    assert text.layer_attention(29).num_kv_heads == 2
    assert text.kv_bytes_per_token(2) == 25 * 8 * 256 * 4 + 5 * 2 * 512 * 4  # 225280; 30 x 8 x 512 x 4 = 491520
    check_servable(text, tp_size=1, moe_tp_size=1)


def test_last_layer_is_global_and_defaults_follow_transformers():
    text = Gemma4TextConfig(num_hidden_layers=4, layer_types=["sliding_attention"] * 4)
    assert text.layer_types[-1] == "full_attention"
    assert Gemma4TextConfig(num_hidden_layers=12).layer_types == PATTERN[:12]
    assert Gemma4TextConfig().rope_parameters["full_attention"]["rope_type"] == "proportional"


@pytest.mark.parametrize("overrides, feature", [
    ({"hidden_size_per_layer_input": 256}, "per-layer input embeddings"),
    ({"num_kv_shared_layers": 20}, "KV sharing"),
    ({"use_double_wide_mlp": True}, "use_double_wide_mlp"),
    ({"rope_parameters": {**ROPE, "full_attention": {"rope_type": "yarn", "rope_theta": 1.0}}}, "yarn"),
])
def test_unsupported_variants_fail_by_name(overrides, feature):
    with pytest.raises(NotImplementedError, match=feature):
        check_servable(_released(**overrides).text_config, tp_size=1, moe_tp_size=1)


@pytest.mark.parametrize("tp_size", [2, 4, 8])
def test_released_layouts_split_over_tp_ranks(tp_size):
    """31B: 32 query heads, 16 sliding / 4 full KV heads; 26B-A4B: 16, 8 / 2 -- full KV heads replicated once
    there are more ranks than heads. Each rank's KV pool holds its heads only."""
    dense, moe = _released().text_config, _released(**RELEASED_26B).text_config
    check_servable(dense, tp_size=tp_size, moe_tp_size=1)
    check_servable(moe, tp_size=tp_size, moe_tp_size=tp_size)
    assert (dense.kv_shape(SLIDING, tp_size), dense.kv_shape(FULL, tp_size)) == \
        ((16 // tp_size, 256), (max(1, 4 // tp_size), 512))
    assert moe.kv_shape(FULL, tp_size) == (max(1, 2 // tp_size), 512)
    assert dense.kv_bytes_per_token(2, tp_size) == 50 * 16 // tp_size * 256 * 4 + 10 * max(1, 4 // tp_size) * 512 * 4


def test_tensor_parallel_sizes_that_do_not_split_are_refused_by_name():
    with pytest.raises(NotImplementedError, match="num_attention_heads 32 is not divisible"):
        check_servable(_released().text_config, tp_size=3, moe_tp_size=1)
    with pytest.raises(NotImplementedError, match="moe_intermediate_size"):
        check_servable(_released(**{**RELEASED_26B, "moe_intermediate_size": 700}).text_config, tp_size=2,
                       moe_tp_size=8)


def test_moe_without_expert_counts_is_a_config_error():
    with pytest.raises(ValueError, match="num_experts"):
        check_servable(_released(enable_moe_block=True).text_config, tp_size=1, moe_tp_size=1)


def test_kv_heads_must_divide_the_query_heads():
    with pytest.raises(ValueError, match="full_attention layers have 3 KV heads"):
        check_servable(_released(num_global_key_value_heads=3).text_config, tp_size=1, moe_tp_size=1)


def test_sglang_model_config_sees_text_only_gemma4_with_kv_shapes_per_layer_type(tmp_path):
    """SGLang's own config path (AutoConfig under transformers 5.3 + ModelConfig), through plugin.py."""
    from sglang.srt.configs.model_config import ModelConfig

    path = str(tmp_path / "moe")
    shutil.copytree(os.path.join(FIXTURES, "moe"), path)
    model_config = ModelConfig(path)
    with open(os.path.join(path, "config.json"), encoding="utf-8") as handle:
        raw = json.load(handle)["text_config"]
    assert model_config.hf_config.architectures == ["Gemma4ForConditionalGeneration"]
    assert isinstance(model_config.hf_text_config, Gemma4TextConfig)
    assert not model_config.is_multimodal and not model_config.is_image_understandable_model
    assert model_config.head_dim == model_config.v_head_dim == raw["global_head_dim"]
    assert model_config.get_num_kv_heads(1) == raw["num_global_key_value_heads"]  # k_eq_v full layers: 1
    assert model_config.swa_head_dim == model_config.swa_v_head_dim == raw["head_dim"]
    assert model_config.get_swa_num_kv_heads(1) == raw["num_key_value_heads"]
    assert model_config.is_hybrid_swa  # the sliding layers' own pool (tests/test_gemma4_kv_pool.py)
    assert model_config.num_hidden_layers == raw["num_hidden_layers"]

