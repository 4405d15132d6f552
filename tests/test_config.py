# SPDX-License-Identifier: Apache-2.0
"""DFlashDraftConfig: parsing released-style config.json files, rejecting bad ones by field name, and
checking a drafter against its target."""

from __future__ import annotations

import copy
import json

import pytest

from dflash_sglang.core.config import DFlashDraftConfig, DraftConfigError, default_target_layer_ids

# Laid out like z-lab/Qwen3-8B-DFlash-b16 (classic: block_size at the top level).
CLASSIC = {
    "architectures": ["DFlashDraftModel"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "block_size": 16,
    "bos_token_id": 151643,
    "dflash_config": {"mask_token_id": 151669, "target_layer_ids": [1, 9, 17, 25, 33]},
    "dtype": "bfloat16",
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 12288,
    "layer_types": ["full_attention"] * 5,
    "max_position_embeddings": 40960,
    "max_window_layers": 5,
    "model_type": "qwen3",
    "num_attention_heads": 32,
    "num_hidden_layers": 5,
    "num_key_value_heads": 8,
    "num_target_layers": 36,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}

# z-lab/dflash tests/fixtures/dflash2-config.json (a 52-layer target's "dflash2" drafter).
DFLASH2 = {
    "architectures": ["DFlash2DraftModel"],
    "attention_bias": False,
    "is_causal": False,
    "dflash_config": {"block_size": 16, "conv_group_size": 16, "conv_kernel_size": 2,
                      "final_logit_softcapping": 20.0, "mask_token_id": 201818,
                      "output_multiplier": 0.19611613513818404, "selector_rank": 256, "selector_top_k": 16,
                      "target_layer_ids": [1, 13, 25, 37, 49]},
    "dtype": "bfloat16",
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 6656,
    "intermediate_size": 19968,
    "layer_types": ["sliding_attention"] * 5,
    "max_position_embeddings": 131072,
    "model_type": "qwen3",
    "num_attention_heads": 32,
    "num_hidden_layers": 5,
    "num_key_value_heads": 8,
    "num_target_layers": 52,
    "rms_norm_eps": 1e-05,
    "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"},
    "sliding_window": 2048,
    "vocab_size": 202048,
}

QWEN3_8B = {"architectures": ["Qwen3ForCausalLM"], "hidden_size": 4096, "num_hidden_layers": 36,
            "vocab_size": 151936}


def _classic(**changes) -> dict:
    raw = copy.deepcopy(CLASSIC)
    raw.update(changes)
    return raw


def test_classic_config_parses():
    config = DFlashDraftConfig.from_dict(CLASSIC)
    assert config.architecture == "DFlashDraftModel"
    assert config.block_size == 16
    assert config.mask_token_id == 151669
    assert config.target_layer_ids == (1, 9, 17, 25, 33)
    assert config.num_context_features == 5 * 4096
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (32, 8, 128)
    assert config.rope_theta == 1e6
    assert config.num_target_layers == 36
    assert config.layer_types == ("full_attention",) * 5
    assert not any(config.layer_is_causal(i) for i in range(5))
    assert config.layer_sliding_window(0) is None
    assert config.input_embedding_scale is None and config.output_multiplier is None


def test_dflash_config_wins_over_top_level():
    raw = _classic(block_size=16, mask_token_id=5)
    raw["dflash_config"] = {**raw["dflash_config"], "block_size": 8}
    config = DFlashDraftConfig.from_dict(raw)
    assert config.block_size == 8
    assert config.mask_token_id == 151669


def test_keys_at_top_level_only():
    raw = _classic(mask_token_id=7, target_layer_ids=[2, 4])
    del raw["dflash_config"]
    config = DFlashDraftConfig.from_dict(raw)
    assert (config.mask_token_id, config.target_layer_ids) == (7, (2, 4))


def test_block_size_defaults_to_16():
    raw = _classic()
    del raw["block_size"]
    assert DFlashDraftConfig.from_dict(raw).block_size == 16


def test_dflash2_is_named_as_unsupported():
    with pytest.raises(NotImplementedError, match="DFlash2DraftModel"):
        DFlashDraftConfig.from_dict(DFLASH2)


def test_dflash2_layout_with_classic_architecture_parses():
    # The same file under the classic architecture name: sliding-window layers made non-causal by `is_causal: false`,
    # rope_parameters, output_multiplier and soft-capping from dflash_config.
    config = DFlashDraftConfig.from_dict({**DFLASH2, "architectures": ["DFlashDraftModel"]})
    assert config.rope_theta == 500000.0
    assert config.sliding_window == 2048
    assert config.is_causal is False and not config.layer_is_causal(0)
    assert config.layer_sliding_window(4) == 2048
    assert config.final_logit_softcapping == 20.0
    assert config.output_multiplier == pytest.approx(0.19611613513818404)


def _without_target_layer_ids():
    raw = _classic()
    raw["dflash_config"] = {"mask_token_id": 151669}
    return raw


def _mask_id(value):
    raw = _classic()
    raw["dflash_config"] = {**raw["dflash_config"], "mask_token_id": value}
    return raw


@pytest.mark.parametrize("raw, field", [
    (_without_target_layer_ids(), "target_layer_ids"),
    (_mask_id("151669"), "mask_token_id"),
    (_mask_id(1.5), "mask_token_id"),
    (_mask_id(None), "mask_token_id"),
    (_mask_id(151936), "mask_token_id"),  # outside the vocabulary
    (_classic(num_key_value_heads=5), "num_key_value_heads"),
    (_classic(layer_types=["full_attention"] * 4), "layer_types"),
    (_classic(layer_types=["full_attention"] * 4 + ["linear_attention"]), "layer_types"),
    (_classic(layer_types=["sliding_attention"] * 5), "sliding_window"),
    (_classic(hidden_size=None), "hidden_size"),
    (_classic(block_size=1), "block_size"),
    (_classic(num_target_layers=30), "num_target_layers"),
    (_classic(architectures=["Qwen3ForCausalLM"]), "architectures"),
    (_classic(dflash_config=[1, 2]), "dflash_config"),
    (_classic(rope_theta="big"), "rope_theta"),
], ids=["no-target-layer-ids", "mask-id-str", "mask-id-float", "mask-id-missing", "mask-id-out-of-vocab",
        "heads-not-divisible", "layer-types-length", "layer-types-unknown", "sliding-without-window",
        "hidden-size-missing", "block-size-1", "ids-beyond-num-target-layers", "not-a-drafter",
        "dflash-config-not-object", "rope-theta-str"])
def test_bad_config_names_the_field(raw, field):
    with pytest.raises(DraftConfigError, match=field):
        DFlashDraftConfig.from_dict(raw)


def test_unsupported_rope_type():
    with pytest.raises(NotImplementedError, match="yarn"):
        DFlashDraftConfig.from_dict(_classic(rope_scaling={"rope_type": "yarn", "factor": 4.0}))


def test_from_pretrained(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(CLASSIC))
    assert DFlashDraftConfig.from_pretrained(str(tmp_path)).hidden_size == 4096
    assert DFlashDraftConfig.from_pretrained(str(tmp_path / "config.json")).hidden_size == 4096


def test_from_pretrained_errors_name_the_file(tmp_path):
    with pytest.raises(DraftConfigError, match="no drafter config"):
        DFlashDraftConfig.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(DraftConfigError, match="not valid JSON"):
        DFlashDraftConfig.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(_classic(num_key_value_heads=5)))
    with pytest.raises(DraftConfigError, match=r"config\.json.*num_key_value_heads"):
        DFlashDraftConfig.from_pretrained(str(tmp_path))


# ------------------------------------------------------------------------------------------------------
# Pairing with a target.
def test_check_target_accepts_its_target():
    config = DFlashDraftConfig.from_dict(CLASSIC)
    config.check_target(QWEN3_8B)
    config.check_target(QWEN3_8B, block_size=16)
    config.check_target(QWEN3_8B, block_size=2)  # shorter blocks than the drafter's run (fewer drafts verified)
    config.check_target({"text_config": QWEN3_8B})  # multimodal wrapper

    class Attributes:  # a transformers PretrainedConfig-like object
        hidden_size, num_hidden_layers, vocab_size = 4096, 36, 151936

    config.check_target(Attributes())


@pytest.mark.parametrize("target, block_size, problem", [
    ({**QWEN3_8B, "hidden_size": 5120}, None, "hidden_size"),
    ({**QWEN3_8B, "num_hidden_layers": 28}, None, "target_layer_ids"),
    ({**QWEN3_8B, "num_hidden_layers": 40}, None, "num_target_layers"),
    ({**QWEN3_8B, "vocab_size": 152064}, None, "vocab_size"),
    ({**QWEN3_8B, "vocab_size": 151000}, None, "mask_token_id"),
    (QWEN3_8B, 17, "takes 2..16"),
    (QWEN3_8B, 1, "takes 2..16"),
], ids=["hidden-size", "layer-ids-beyond-depth", "num-target-layers", "vocab", "mask-outside-vocab",
        "block-longer-than-trained", "block-without-drafts"])
def test_check_target_names_the_mismatch(target, block_size, problem):
    config = DFlashDraftConfig.from_dict(CLASSIC)
    with pytest.raises(DraftConfigError, match=problem):
        config.check_target(target, block_size=block_size)


def test_check_target_without_num_target_layers():
    raw = _classic()
    del raw["num_target_layers"]
    config = DFlashDraftConfig.from_dict(raw)
    config.check_target({**QWEN3_8B, "num_hidden_layers": 40})
    with pytest.raises(DraftConfigError, match="target_layer_ids"):
        config.check_target({**QWEN3_8B, "num_hidden_layers": 30})


def test_default_target_layer_ids_are_the_references():
    assert default_target_layer_ids(30, 5) == [1, 8, 14, 20, 27]  # SmolLM2
    assert default_target_layer_ids(36, 5) == [1, 9, 17, 25, 33]  # z-lab/Qwen3-8B-DFlash-b16's
    assert default_target_layer_ids(30, 1) == [15]
    assert default_target_layer_ids(60, 6) == [1, 12, 23, 35, 46, 57]  # z-lab's Gemma-4-31B drafter (bench_step)
