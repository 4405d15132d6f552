# SPDX-License-Identifier: Apache-2.0
"""Drafter checkpoint IO: the tiny released-format drafter loads; tampered checkpoints fail by name."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from dflash_sglang.core.checkpoint import CheckpointError, load_drafter, save_drafter
from dflash_sglang.core.config import DFlashDraftConfig, DraftConfigError
from dflash_sglang.core.model import DFlashDrafter


@pytest.fixture
def drafter_dir(tiny_checkpoints) -> str:
    return tiny_checkpoints["drafter"]


def _tensors(path: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(path, "model.safetensors"))


def _write_copy(src: str, dst, tensors: dict[str, torch.Tensor], config: dict | None = None) -> str:
    """A checkpoint folder with ``src``'s config.json (or ``config``) and the given tensors."""
    dst = str(dst)
    os.makedirs(dst, exist_ok=True)
    if config is None:
        shutil.copy(os.path.join(src, "config.json"), os.path.join(dst, "config.json"))
    else:
        with open(os.path.join(dst, "config.json"), "w", encoding="utf-8") as handle:
            json.dump(config, handle)
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return dst


def _assert_same_weights(a: DFlashDrafter, b: DFlashDrafter) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def test_tiny_drafter_loads(drafter_dir):
    drafter = load_drafter(drafter_dir)
    assert isinstance(drafter, DFlashDrafter)
    assert not drafter.training
    assert drafter.config.target_layer_ids == (1, 2) and drafter.config.block_size == 8
    stored = _tensors(drafter_dir)
    assert set(drafter.state_dict()) == set(stored)
    assert all(t.dtype == torch.bfloat16 for t in stored.values())
    assert torch.equal(drafter.fc.weight.float(), stored["fc.weight"].float())
    assert load_drafter(drafter_dir, dtype=torch.bfloat16).fc.weight.dtype == torch.bfloat16


def test_save_load_round_trip(drafter_dir, tmp_path):
    drafter = load_drafter(drafter_dir)
    save_drafter(drafter, str(tmp_path))
    _assert_same_weights(drafter, load_drafter(str(tmp_path)))
    with open(os.path.join(drafter_dir, "config.json")) as a, open(tmp_path / "config.json") as b:
        assert json.load(a) == json.load(b)


def _renamed(t):
    t["layers.0.mlp.upp_proj.weight"] = t.pop("layers.0.mlp.up_proj.weight")
    return ["missing tensors: layers.0.mlp.up_proj.weight", "unexpected tensors: layers.0.mlp.upp_proj.weight"]


def _reshaped(t):
    t["fc.weight"] = t["fc.weight"].t().contiguous()
    return ["shape mismatches: fc.weight: checkpoint (128, 64) vs expected (64, 128)"]


def _extra(t):
    t["lm_head.weight"] = torch.zeros(4, 4)
    return ["unexpected tensors: lm_head.weight"]


def _missing(t):
    del t["norm.weight"]
    return ["missing tensors: norm.weight"]


def _missing_layer(t):
    for name in [n for n in t if n.startswith("layers.1.")]:
        del t[name]
    return ["missing tensors: layers.1.input_layernorm.weight, layers.1.mlp.down_proj.weight"]


@pytest.mark.parametrize("tamper", [_renamed, _reshaped, _extra, _missing, _missing_layer],
                         ids=["renamed", "reshaped", "extra", "missing", "missing-layer"])
def test_tampered_checkpoint_lists_the_names(drafter_dir, tmp_path, tamper):
    tensors = _tensors(drafter_dir)
    expected = tamper(tensors)
    path = _write_copy(drafter_dir, tmp_path / "tampered", tensors)
    with pytest.raises(CheckpointError) as error:
        load_drafter(path)
    for fragment in expected:
        assert fragment in str(error.value)


def test_encoder_spelling_loads_the_same_model(drafter_dir, tmp_path):
    tensors = _tensors(drafter_dir)
    tensors["encoder.fc.weight"] = tensors.pop("fc.weight")
    tensors["encoder.output_norm_enc.weight"] = tensors.pop("hidden_norm.weight")
    path = _write_copy(drafter_dir, tmp_path / "encoder", tensors)
    _assert_same_weights(load_drafter(drafter_dir), load_drafter(path))


def test_both_spellings_at_once_fail(drafter_dir, tmp_path):
    tensors = _tensors(drafter_dir)
    tensors["encoder.fc.weight"] = tensors["fc.weight"].clone()
    path = _write_copy(drafter_dir, tmp_path / "twice", tensors)
    with pytest.raises(CheckpointError, match="fc.weight appears twice"):
        load_drafter(path)


def test_sharded_checkpoint_loads(drafter_dir, tmp_path):
    tensors = _tensors(drafter_dir)
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    shutil.copy(os.path.join(drafter_dir, "config.json"), tmp_path / "config.json")
    for file, shard in shards.items():
        save_file({n: tensors[n] for n in shard}, str(tmp_path / file), metadata={"format": "pt"})
    weight_map = {n: file for file, shard in shards.items() for n in shard}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    _assert_same_weights(load_drafter(drafter_dir), load_drafter(str(tmp_path)))


def test_folder_without_weights(drafter_dir, tmp_path):
    shutil.copy(os.path.join(drafter_dir, "config.json"), tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="no \\*.safetensors file"):
        load_drafter(str(tmp_path))


def test_bad_config_json_names_the_problem(drafter_dir, tmp_path):
    with open(os.path.join(drafter_dir, "config.json")) as handle:
        config = json.load(handle)
    tensors = _tensors(drafter_dir)
    bad = {**config, "num_key_value_heads": 3}
    with pytest.raises(DraftConfigError, match="num_key_value_heads"):
        load_drafter(_write_copy(drafter_dir, tmp_path / "heads", tensors, bad))
    no_ids = {**config, "dflash_config": {"mask_token_id": config["dflash_config"]["mask_token_id"]}}
    with pytest.raises(DraftConfigError, match="target_layer_ids"):
        load_drafter(_write_copy(drafter_dir, tmp_path / "ids", tensors, no_ids))
    # A valid config that does not describe these weights: the shape check names the tensors.
    wider = {**config, "intermediate_size": 256}
    with pytest.raises(CheckpointError, match="layers.0.mlp.down_proj.weight"):
        load_drafter(_write_copy(drafter_dir, tmp_path / "wider", tensors, wider))
    os.makedirs(tmp_path / "broken")
    (tmp_path / "broken" / "config.json").write_text("{")
    with pytest.raises(DraftConfigError, match="not valid JSON"):
        load_drafter(str(tmp_path / "broken"))


def test_config_of_written_drafter_is_released_layout(drafter_dir):
    with open(os.path.join(drafter_dir, "config.json")) as handle:
        raw = json.load(handle)
    assert raw["architectures"] == ["DFlashDraftModel"] and raw["model_type"] == "qwen3"
    assert set(raw["dflash_config"]) == {"block_size", "mask_token_id", "target_layer_ids"}
    assert raw["num_target_layers"] == 4 and len(raw["layer_types"]) == raw["num_hidden_layers"] == 2
    assert DFlashDraftConfig.from_dict(raw).num_context_features == 2 * raw["hidden_size"]


# ------------------------------------------------------------------------------------------------------
# The tiny checkpoints themselves (dflash_sglang.testing.tiny).
def test_tiny_target_loads_in_transformers(tiny_checkpoints):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    path = tiny_checkpoints["target"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    text = "The cat walks to the market, 12 plus 7 is 19.\nWhy?"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n"
                        "<|im_start|>assistant\n")
    ids = tokenizer(rendered)["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>") and ids.count(tokenizer.eos_token_id) == 2
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    mask_id = tokenizer.convert_tokens_to_ids("<|mask|>")

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    config = model.config
    assert config.architectures == ["Qwen3ForCausalLM"] and config.model_type == "qwen3"
    assert config.vocab_size % 64 == 0 and len(tokenizer) <= config.vocab_size < len(tokenizer) + 64
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    embedding = model.model.embed_tokens.weight
    assert not embedding[0].any() and not embedding[mask_id].any() and embedding[1].any()
    assert GenerationConfig.from_pretrained(path).eos_token_id == [tokenizer.eos_token_id, tokenizer.pad_token_id]

    drafter = load_drafter(tiny_checkpoints["drafter"])
    drafter.config.check_target(config, block_size=8)
    assert drafter.config.mask_token_id == mask_id
    # SGLang captures layer i's output at the input of layer i + 1: the last layer cannot be captured.
    assert max(drafter.config.target_layer_ids) <= config.num_hidden_layers - 2


def test_tiny_drafters_are_built_as_described(tiny_checkpoints):
    agree = load_drafter(tiny_checkpoints["drafter-agree"])
    assert not agree.fc.weight.any()
    for layer in agree.layers:
        assert not layer.self_attn.q_proj.weight.any() and not layer.mlp.down_proj.weight.any()
        assert torch.equal(layer.self_attn.v_proj.weight.float(), torch.eye(agree.config.hidden_size))
    disagree = load_drafter(tiny_checkpoints["drafter-disagree"])
    assert not disagree.norm.weight.any()


def test_tiny_checkpoints_are_deterministic(tiny_checkpoints, tmp_path):
    from dflash_sglang.testing.tiny import write_tiny_checkpoints

    again = write_tiny_checkpoints(str(tmp_path / "again"), seed=0, block_size=8)
    other = write_tiny_checkpoints(str(tmp_path / "other"), seed=1, block_size=16)
    for name, path in tiny_checkpoints.items():
        for file in sorted(os.listdir(path)):
            with open(os.path.join(path, file), "rb") as a, open(os.path.join(again[name], file), "rb") as b:
                assert a.read() == b.read(), (name, file)
    assert _tensors(other["drafter"])["fc.weight"].shape == _tensors(tiny_checkpoints["drafter"])["fc.weight"].shape
    assert not torch.equal(_tensors(other["drafter"])["fc.weight"], _tensors(tiny_checkpoints["drafter"])["fc.weight"])
    assert load_drafter(other["drafter"]).config.block_size == 16
