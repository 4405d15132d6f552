# SPDX-License-Identifier: Apache-2.0
"""Tiny Gemma 4 targets (dense and MoE) and a DFlash drafter for them, in the released layouts.

* :func:`gemma4_config` -- a ``config.json`` laid out like google/gemma-4-*-it's (``Gemma4ForConditionalGeneration``
  wrapper, ``text_config`` with sliding + full layers, per-layer-type RoPE, ``attention_k_eq_v``, soft-capping;
  the ``moe`` variant adds the 26B-A4B MoE block) with a tiny ``vision_config``.
* :func:`gemma4_text_weights` -- random text-decoder tensors named as in the released safetensors
  (``model.language_model.*``). Norm weights, layer scalars and router scales are random around 1 so that
  a wrong norm convention changes the output.
* :func:`write_gemma4_tokenizer` -- the byte-level BPE of ``tiny.py`` with Gemma 4's special tokens and a
  Gemma-4-style chat template (below).
* :func:`write_gemma4_drafter` -- a random 2-layer DFlash drafter for such a target, with the Gemma keys of
  ``dflash_config`` (``input_embedding_scale`` = sqrt(hidden), ``final_logit_softcapping``).
* :func:`write_tiny_gemma4` -- a servable target folder (config, bf16 weights, tokenizer) and its drafter,
  with head sizes of choice: GPU kernels need 64+ (``scripts/gpu_e2e.py --target gemma4-*``).

``scripts/make_gemma4_golden.py`` builds the committed golden fixtures (weights + transformers' reference
logits) from these; the tests add the tokenizer and the drafter at run time.

The chat template follows the structure of the released Gemma 4 template (turns ``<|turn>ROLE\\n...<turn|>``,
the assistant role named ``model``, thinking switched on by a ``<|think|>`` line in a leading system turn
when ``enable_thinking`` is true); tools and multimodal content are left out.
"""

from __future__ import annotations

import math
import os

import torch

from dflash_sglang.core.checkpoint import save_drafter
from dflash_sglang.testing.tiny import TokenizerSpec, drafter_config, random_drafter, write_tokenizer

VARIANTS = ("dense", "moe")
HIDDEN_SIZE = 32
NUM_LAYERS = 4
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
SOFTCAP = 30.0

PAD, EOS, BOS, MASK = "<pad>", "<eos>", "<bos>", "<mask>"
TURN_START, TURN_END, THINK, CHANNEL_START, CHANNEL_END = "<|turn>", "<turn|>", "<|think|>", "<|channel>", "<channel|>"
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- set thinking = enable_thinking is defined and enable_thinking -%}"
    "{%- set has_system = messages[0]['role'] == 'system' -%}"
    "{%- if thinking or has_system -%}"
    "{{- '<|turn>system\\n' -}}"
    "{%- if thinking -%}{{- '<|think|>\\n' -}}{%- endif -%}"
    "{%- if has_system -%}{{- messages[0]['content'] | trim -}}{%- endif -%}"
    "{{- '<turn|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if not (loop.first and has_system) -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{- '<|turn>' + role + '\\n' + (message['content'] | trim) + '<turn|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|turn>model\\n' -}}{%- endif -%}"
)
MULTIMODAL_TOKEN_KEYS = ("boi_token_id", "eoi_token_id", "image_token_id", "video_token_id", "boa_token_id",
                         "eoa_token_index", "audio_token_id")
GEMMA4_TOKENIZER = TokenizerSpec((PAD, EOS, BOS, MASK, TURN_START, TURN_END, THINK, CHANNEL_START, CHANNEL_END),
                                 CHAT_TEMPLATE, eos_token=TURN_END, pad_token=PAD, bos_token=BOS,
                                 tokenizer_class="PreTrainedTokenizerFast")


def write_gemma4_tokenizer(out: str, seed: int = 0) -> tuple[dict[str, int], int]:
    """Tokenizer files into ``out``; returns (special token -> id, padded vocabulary size)."""
    os.makedirs(out, exist_ok=True)
    return write_tokenizer(out, GEMMA4_TOKENIZER, seed)


def gemma4_config(variant: str, vocab_size: int, ids: dict[str, int], *, head_dim: int = 8,
                  global_head_dim: int = 16, sliding_window: int = 512) -> dict:
    """``config.json`` of a tiny Gemma 4 target (``variant``: ``dense`` or ``moe``); ``head_dim`` is the sliding
    layers' head size, ``global_head_dim`` the full layers'."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown tiny Gemma 4 variant {variant!r}; choose one of {VARIANTS}")
    text = {
        "model_type": "gemma4_text", "vocab_size": vocab_size, "vocab_size_per_layer_input": vocab_size,
        "hidden_size": HIDDEN_SIZE, "intermediate_size": 64, "num_hidden_layers": NUM_LAYERS,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": head_dim, "global_head_dim": global_head_dim,
        "num_global_key_value_heads": 1, "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "attention_bias": False, "attention_dropout": 0.0,
        "layer_types": LAYER_TYPES, "sliding_window": sliding_window, "final_logit_softcapping": SOFTCAP,
        "rope_parameters": {
            "full_attention": {"partial_rotary_factor": 0.25, "rope_theta": 1000000.0, "rope_type": "proportional"},
            "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"},
        },
        "hidden_size_per_layer_input": 0, "num_kv_shared_layers": 0, "use_double_wide_mlp": False,
        "use_bidirectional_attention": None, "tie_word_embeddings": True, "use_cache": True,
        "pad_token_id": ids[PAD], "bos_token_id": ids[BOS], "eos_token_id": ids[EOS], "dtype": "bfloat16",
        # the dense variant keeps v_proj in its full layers; the MoE one shares K and V there, as released
        "attention_k_eq_v": variant == "moe", "enable_moe_block": variant == "moe",
        "num_experts": 4 if variant == "moe" else None, "top_k_experts": 2 if variant == "moe" else None,
        "moe_intermediate_size": 16 if variant == "moe" else None,
    }
    vision = {"model_type": "gemma4_vision", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
              "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 8, "patch_size": 4,
              "position_embedding_size": 16, "pooling_kernel_size": 2}
    return {
        "architectures": ["Gemma4ForConditionalGeneration"], "model_type": "gemma4", "text_config": text,
        "vision_config": vision, "audio_config": None,
        # multimodal placeholders: ids in the vocabulary's padding rows, past every real token
        **{name: vocab_size - 1 - k for k, name in enumerate(MULTIMODAL_TOKEN_KEYS)},
        "eos_token_id": [ids[EOS], ids[TURN_END]], "pad_token_id": ids[PAD],
        "bos_token_id": ids[BOS], "tie_word_embeddings": True, "dtype": "bfloat16",
    }


def _normal(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=generator) * shape[-1] ** -0.5


def _around_one(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return 1.0 + 0.2 * torch.randn(*shape, generator=generator)


def gemma4_text_weights(config: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """fp32 text-decoder tensors for ``config`` (a :func:`gemma4_config` dict), released names."""
    text = config["text_config"]
    hidden, heads = text["hidden_size"], text["num_attention_heads"]
    tensors = {"model.language_model.embed_tokens.weight": torch.randn(text["vocab_size"], hidden,
                                                                       generator=generator)}
    for i, layer_type in enumerate(text["layer_types"]):
        full = layer_type == "full_attention"
        head_dim = text["global_head_dim"] if full else text["head_dim"]
        k_eq_v = full and text["attention_k_eq_v"]
        kv_heads = text["num_global_key_value_heads"] if k_eq_v else text["num_key_value_heads"]
        p = f"model.language_model.layers.{i}."
        tensors.update({
            p + "self_attn.q_proj.weight": _normal(generator, heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": _normal(generator, kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": _normal(generator, hidden, heads * head_dim),
            p + "self_attn.q_norm.weight": _around_one(generator, head_dim),
            p + "self_attn.k_norm.weight": _around_one(generator, head_dim),
            p + "mlp.gate_proj.weight": _normal(generator, text["intermediate_size"], hidden),
            p + "mlp.up_proj.weight": _normal(generator, text["intermediate_size"], hidden),
            p + "mlp.down_proj.weight": _normal(generator, hidden, text["intermediate_size"]),
            p + "layer_scalar": 0.5 + torch.rand(1, generator=generator),
        })
        if not k_eq_v:
            tensors[p + "self_attn.v_proj.weight"] = _normal(generator, kv_heads * head_dim, hidden)
        norms = ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm"]
        if text["enable_moe_block"]:
            experts, inter = text["num_experts"], text["moe_intermediate_size"]
            norms += ["post_feedforward_layernorm_1", "post_feedforward_layernorm_2", "pre_feedforward_layernorm_2"]
            tensors.update({
                p + "router.proj.weight": _normal(generator, experts, hidden),
                p + "router.scale": _around_one(generator, hidden),
                p + "router.per_expert_scale": _around_one(generator, experts),
                p + "experts.gate_up_proj": _normal(generator, experts, 2 * inter, hidden),
                p + "experts.down_proj": _normal(generator, experts, hidden, inter),
            })
        for norm in norms:
            tensors[p + norm + ".weight"] = _around_one(generator, hidden)
    tensors["model.language_model.norm.weight"] = _around_one(generator, hidden)
    return tensors


def write_gemma4_drafter(out: str, target_config: dict, ids: dict[str, int], *, block_size: int = 8,
                         seed: int = 0, sliding_window: int | None = None) -> str:
    """A random DFlash drafter for ``target_config`` (a Gemma 4 ``config.json`` dict) into ``out``; with
    ``sliding_window``, sliding-window layers and then a full-attention one (``drafter_config``)."""
    text = target_config["text_config"]
    config = drafter_config(text["vocab_size"], ids[MASK], ids, block_size, bos=BOS, eos=TURN_END,
                            hidden_size=text["hidden_size"], num_target_layers=text["num_hidden_layers"],
                            dflash_extra={"input_embedding_scale": math.sqrt(text["hidden_size"]),
                                          "final_logit_softcapping": text["final_logit_softcapping"]},
                            sliding_window=sliding_window)
    generator = torch.Generator().manual_seed(seed)
    save_drafter(random_drafter(config, generator).to(torch.bfloat16), out)
    return out


def write_tiny_gemma4(out_dir: str, variant: str, *, head_dim: int, global_head_dim: int, sliding_window: int,
                      seed: int = 0, block_size: int = 8) -> dict[str, str]:
    """Writes ``target/`` (config.json, model.safetensors with the text decoder in bf16, tokenizer) and
    ``drafter/`` (with sliding layers of the same window, as z-lab's Gemma 4 drafters have) under ``out_dir``;
    returns ``{"target": path, "drafter": path}``. SGLang serves the target
    text-only (the vision tower's weights are not written: it skips them)."""
    from safetensors.torch import save_file

    from dflash_sglang.testing.tiny import write_json

    target = os.path.join(out_dir, "target")
    ids, vocab_size = write_gemma4_tokenizer(target, seed)
    config = gemma4_config(variant, vocab_size, ids, head_dim=head_dim, global_head_dim=global_head_dim,
                           sliding_window=sliding_window)
    write_json(os.path.join(target, "config.json"), config)
    weights = gemma4_text_weights(config, torch.Generator().manual_seed(seed))
    save_file({name: t.to(torch.bfloat16).contiguous() for name, t in weights.items()},
              os.path.join(target, "model.safetensors"))
    drafter = write_gemma4_drafter(os.path.join(out_dir, "drafter"), config, ids, block_size=block_size, seed=seed,
                                   sliding_window=sliding_window)
    return {"target": target, "drafter": drafter}
