# SPDX-License-Identifier: Apache-2.0
"""A GGUF file (llama.cpp's format) to a Hugging Face model folder that SGLang and transformers load.

:func:`convert_gguf` dequantizes every tensor with the ``gguf`` package's own NumPy dequantizers (the ones
transformers uses for ``from_pretrained(..., gguf_file=...)``), undoes llama.cpp's rotary permutation of
Llama's q/k rows, and writes ``config.json``, ``generation_config.json``, ``model.safetensors`` (float32:
the dequantized values exactly) and the tokenizer (``tokenizer.json`` + ``tokenizer_config.json`` with the
GGUF's chat template). Covered: the ``llama`` and ``qwen2`` architectures with a byte-level BPE tokenizer
(``tokenizer.ggml.model == "gpt2"``, pre-tokenizers ``smollm``, ``qwen2``); anything else is refused by name.

Not transformers' own GGUF loading: in transformers 5.3 it needs ``accelerate``, and its tokenizer for
SmolLM2's GGUF prepends ``<|im_start|>`` to every text (the GGUF says ``add_bos_token: false``).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

# Part of a converted folder's identity (real_models' completion marker): bump it when the output changes.
CONVERTER_VERSION = 2
ARCHITECTURES = {"llama": ("LlamaForCausalLM", "llama"), "qwen2": ("Qwen2ForCausalLM", "qwen2")}
# llama.cpp's pre-tokenizer regexes (llama-vocab.cpp) as Hugging Face tokenizers pipelines.
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = ("smollm", "qwen2")
# tokenizer.ggml.token_type: 1 normal, 2 unknown, 3 control (special), 4 user-defined (added, not special),
# 5 unused (llama.cpp's [PADn] rows past the tokenizer), 6 byte
CONTROL_TOKEN, USER_DEFINED_TOKEN = 3, 4
END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>")  # also end generation where the vocabulary has them

_LAYER = re.compile(r"blk\.(\d+)\.(.+)")
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}


class GGUFConvertError(ValueError):
    """The GGUF file cannot be converted (missing reader, unsupported architecture or tokenizer)."""


def require_gguf():
    """The ``gguf`` package, or a :class:`GGUFConvertError` saying how to install it."""
    try:
        import gguf
    except ImportError as error:
        raise GGUFConvertError(
            "reading a GGUF file needs the `gguf` package: `pip install gguf` (or install this project with "
            "its `models` or `test` extra: `pip install -e \".[models]\"`)") from error
    return gguf


@dataclass
class GGUFModel:
    """A GGUF file's metadata (``key -> value``) and tensors (``name -> dequantized float32 array``)."""

    metadata: dict[str, Any]
    tensors: dict[str, np.ndarray]

    @property
    def arch(self) -> str:
        return self.metadata["general.architecture"]

    def get(self, key: str, default: Any = None) -> Any:
        """An architecture key without its prefix: ``get("block_count")`` reads ``llama.block_count``."""
        return self.metadata.get(f"{self.arch}.{key}", default)


def read_gguf(path: str) -> GGUFModel:
    """Reads and dequantizes a whole GGUF file (float32 arrays in PyTorch's ``[out, in]`` layout)."""
    gguf = require_gguf()
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(path)
    metadata = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    arch = metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFConvertError(f"{path}: GGUF architecture {arch!r} is not supported (supported: "
                               f"{', '.join(ARCHITECTURES)})")
    tensors = {t.name: np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
               for t in reader.tensors}
    return GGUFModel(metadata, tensors)


def _float(value: float) -> float:
    """A float32 metadata value as its shortest decimal (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(value)))


def hf_config(model: GGUFModel) -> dict[str, Any]:
    """``config.json`` for the GGUF's architecture (float32 weights; tied embeddings without ``output``)."""
    architecture, model_type = ARCHITECTURES[model.arch]
    hidden = int(model.get("embedding_length"))
    heads = int(model.get("attention.head_count"))
    meta = model.metadata
    config = {
        "architectures": [architecture],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": int(model.get("feed_forward_length")),
        "num_hidden_layers": int(model.get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(model.get("attention.head_count_kv", heads)),
        "head_dim": int(model.get("attention.key_length", hidden // heads)),
        "hidden_act": "silu",
        "max_position_embeddings": int(model.get("context_length")),
        "rms_norm_eps": _float(model.get("attention.layer_norm_rms_epsilon")),
        "rope_theta": _float(model.get("rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "attention_bias": "blk.0.attn_q.bias" in model.tensors,
        "attention_dropout": 0.0,
        "tie_word_embeddings": "output.weight" not in model.tensors,
        "vocab_size": int(model.tensors["token_embd.weight"].shape[0]),
        "bos_token_id": int(meta["tokenizer.ggml.bos_token_id"]),
        "eos_token_id": int(meta["tokenizer.ggml.eos_token_id"]),
        "torch_dtype": "float32",
        "use_cache": True,
    }
    config.update(_transformers_version())
    if model.arch == "llama":
        config.update(mlp_bias=False, pretraining_tp=1)
    else:
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=config["num_hidden_layers"])
    if "tokenizer.ggml.padding_token_id" in meta:
        config["pad_token_id"] = int(meta["tokenizer.ggml.padding_token_id"])
    return config


def _transformers_version() -> dict[str, str]:
    """``{"transformers_version": ...}`` where transformers is installed: without the key, transformers 5
    takes a local tokenizer for a possibly broken Mistral one and warns."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return {"transformers_version": version("transformers")}
    except PackageNotFoundError:
        return {}


def _unpermute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undoes llama.cpp's Llama q/k row permutation (it interleaves each head's two rotary halves)."""
    rows = weight.shape[0]
    return weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def hf_weights(model: GGUFModel) -> dict[str, torch.Tensor]:
    """The tensors under transformers' names (``model.layers.{i}.self_attn.q_proj.weight``, ...)."""
    heads = int(model.get("attention.head_count"))
    kv_heads = int(model.get("attention.head_count_kv", heads))
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for name, array in model.tensors.items():
        match = _LAYER.fullmatch(name)
        if name in _GLOBAL_NAMES:
            hf_name = _GLOBAL_NAMES[name]
        elif match and match.group(2) in _LAYER_NAMES:
            hf_name = f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
        else:
            unknown.append(name)
            continue
        if model.arch == "llama" and match and match.group(2) in ("attn_q.weight", "attn_k.weight"):
            array = _unpermute(array, heads if match.group(2) == "attn_q.weight" else kv_heads)
        out[hf_name] = torch.from_numpy(np.array(array, dtype=np.float32, order="C"))  # owned and writable
    if unknown:
        raise GGUFConvertError(f"GGUF tensors with no Hugging Face name here: {', '.join(sorted(unknown))}")
    return out


def _special_name(tokens: list[str], meta: dict[str, Any], key: str) -> str | None:
    token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
    return None if token_id is None else tokens[int(token_id)]


def build_tokenizer(meta: dict[str, Any]):
    """A ``tokenizers.Tokenizer`` equivalent to llama.cpp's for this vocabulary (byte-level BPE)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre")
    if kind != "gpt2" or pre not in PRE_TOKENIZERS:
        raise GGUFConvertError(f"GGUF tokenizer {kind!r} with pre-tokenizer {pre!r} is not supported (supported: "
                               f"'gpt2' with {', '.join(PRE_TOKENIZERS)})")
    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(merge.split(" ", 1)) for merge in meta["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                     fuse_unk=False, byte_fallback=False))
    if pre == "smollm":  # llama.cpp: "\p{N}" (each digit alone), then GPT-2's split
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    else:
        tokenizer.normalizer = normalizers.NFC()
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.decoder = decoders.ByteLevel()
    types = meta["tokenizer.ggml.token_type"]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, kind in zip(tokens, types) if kind == CONTROL_TOKEN])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                          for t, kind in zip(tokens, types) if kind == USER_DEFINED_TOKEN])
    return tokenizer


def eos_token_ids(meta: dict[str, Any]) -> list[int]:
    """The GGUF's eos id, then the other end-of-turn control tokens it has (as llama.cpp ends on them too)."""
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    ids = [int(meta["tokenizer.ggml.eos_token_id"])]
    ids += [tokens.index(t) for t in END_OF_TURN_TOKENS if t in tokens and types[tokens.index(t)] == CONTROL_TOKEN]
    return list(dict.fromkeys(ids))


def write_tokenizer(meta: dict[str, Any], out_dir: str) -> None:
    """``tokenizer.json``, ``tokenizer_config.json`` (with the chat template) and ``special_tokens_map.json``."""
    tokenizer = build_tokenizer(meta)
    tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    tokens = list(meta["tokenizer.ggml.tokens"])
    specials = {key: _special_name(tokens, meta, key) for key in ("bos", "eos", "unknown", "padding")}
    added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                      "special": kind == CONTROL_TOKEN}
             for i, (t, kind) in enumerate(zip(tokens, meta["tokenizer.ggml.token_type"]))
             if kind in (CONTROL_TOKEN, USER_DEFINED_TOKEN)}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",  # tokenizer.json as is (GPT2Tokenizer would re-split digits)
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "bos_token": specials["bos"],
        "eos_token": specials["eos"],
        "unk_token": specials["unknown"],
        "pad_token": specials["padding"],
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(meta[f"{meta['general.architecture']}.context_length"]),
    }
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    _write_json(os.path.join(out_dir, "tokenizer_config.json"), config)
    token_map = {key: value for key, value in (("bos_token", specials["bos"]), ("eos_token", specials["eos"]),
                                                ("unk_token", specials["unknown"]), ("pad_token", specials["padding"]))
                 if value is not None}
    _write_json(os.path.join(out_dir, "special_tokens_map.json"), token_map)


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(obj, handle, indent=2, ensure_ascii=False)
        handle.write("\n")


def convert_gguf(gguf_path: str, out_dir: str) -> dict[str, Any]:
    """Writes the Hugging Face folder of ``gguf_path`` into ``out_dir`` (created; files overwritten).

    Returns:
        The written ``config.json`` as a dict.
    Raises:
        GGUFConvertError: the ``gguf`` package is missing, or the architecture/tokenizer is not supported.
    """
    model = read_gguf(gguf_path)
    os.makedirs(out_dir, exist_ok=True)
    config = hf_config(model)
    weights = hf_weights(model)
    write_tokenizer(model.metadata, out_dir)
    _write_json(os.path.join(out_dir, "config.json"), config)
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": eos_token_ids(model.metadata),
                  **_transformers_version()}
    if "pad_token_id" in config:
        generation["pad_token_id"] = config["pad_token_id"]
    _write_json(os.path.join(out_dir, "generation_config.json"), generation)
    save_file(weights, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    return config
