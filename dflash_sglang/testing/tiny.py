# SPDX-License-Identifier: Apache-2.0
"""Tiny checkpoints for tests and CPU smoke runs, written offline in the released formats.

:func:`write_tiny_checkpoints` writes four folders:

* ``target/``: a 4-layer random Qwen3 causal LM (``Qwen3ForCausalLM``, bf16 safetensors, tied embeddings)
  with a real byte-level BPE tokenizer trained on a built-in corpus, a ChatML chat template and a
  ``<|mask|>`` token. It is *repeat-prone*: with unit-variance tied embeddings and its attention ``o_proj``
  and MLP ``down_proj`` scaled by :data:`TARGET_BRANCH_SCALE`, the current token's embedding dominates the
  LM head's choice, so greedy decoding mostly repeats the last token (not always).
* ``drafter/``: a random 2-layer DFlash drafter (``DFlashDraftModel``) for that target.
* ``drafter-agree/``: a drafter built to propose the block's first token ``t0`` at every position: zero
  ``q_proj`` (uniform attention), zero ``fc`` (the context contributes nothing), zero MLP ``down_proj``,
  identity ``v_proj``/``o_proj``. The target's ``<|mask|>`` embedding row is zero, so the only non-zero
  value in the block is ``t0``'s and every position's hidden state points along ``embedding(t0)``; the tied
  LM head then picks ``t0``, which the repeat-prone target usually picks too.
* ``drafter-disagree/``: a drafter whose final ``norm`` weight is zero, so its logits are all zero and it
  always proposes token 0; the target's embedding row 0 is zero, so the target's logit for token 0 is 0
  and it never picks it (its own repeat logit is large and positive): acceptance length 1 every step.

Everything comes from one ``torch.Generator`` seeded with ``seed``; the output is deterministic.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass

import torch
from safetensors.torch import save_file

from dflash_sglang.core.checkpoint import save_drafter
from dflash_sglang.core.config import DFlashDraftConfig

# The target: small enough to run in milliseconds on a CPU.
HIDDEN_SIZE = 64
NUM_TARGET_LAYERS = 4
NUM_HEADS = 4
NUM_KV_HEADS = 2
HEAD_DIM = 16
INTERMEDIATE_SIZE = 128
ROPE_THETA = 1000000.0
RMS_NORM_EPS = 1e-6
MAX_POSITION_EMBEDDINGS = 4096
INIT_STD = 0.02  # only recorded in config.json (initializer_range)
# Weights: unit-variance embeddings, projections with std 1/sqrt(fan_in), norms one. The attention and MLP
# branches' output projections are scaled by TARGET_BRANCH_SCALE. A random 64-d branch output is nearly
# orthogonal to every embedding, so even a branch larger than the embedding leaves the current token's
# embedding the best match of the tied LM head: greedy decoding repeats the last token in ~88% of steps
# (0.05, or 1.0, repeats always; 4.0 drops drafter-agree's mean acceptance at block 8 to ~4.7; 3.0 gives
# ~6.5 and a target whose output still depends on its context). Unit embeddings also give large logit
# margins, so greedy argmaxes survive the rounding differences of token-by-token vs block-wise evaluation.
TARGET_BRANCH_SCALE = 3.0
BPE_VOCAB_SIZE = 400  # byte alphabet (256) + merges; the special tokens come on top

# The drafters. SGLang captures layer i's output at the input of layer i + 1, so ids <= layers - 2.
NUM_DRAFT_LAYERS = 2
TARGET_LAYER_IDS = (1, 2)

ENDOFTEXT, IM_START, IM_END, MASK = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, MASK)
# Qwen2/Qwen3's pre-tokenizer split (transformers' Qwen2Tokenizer rebuilds exactly this pipeline).
PRETOKENIZE_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                     r"\s*[\r\n]+|\s+(?!\S)|\s+")
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_SUBJECTS = ["the cat", "a small dog", "my neighbour", "the old sailor", "our teacher", "the engineer",
             "a tired student", "the baker", "every child", "the quiet river", "the red train", "a farmer"]
_VERBS = ["walks to", "looks at", "writes about", "builds", "finds", "carries", "paints", "remembers",
          "repairs", "sings to", "follows", "opens"]
_OBJECTS = ["the market", "a wooden box", "the blue door", "an empty street", "the morning light", "a letter",
            "the garden", "a long bridge", "the kitchen table", "a paper boat", "the mountain", "the city"]
_TAILS = ["before dinner.", "in the rain.", "every morning.", "with great care.", "after school.",
          "on a sunny day.", "without a word.", "again and again.", "at the end of the week.", "near the sea."]
_QUESTIONS = ["What is the answer?", "How many apples are left?", "Can you explain it again?",
              "Why is the sky blue?", "Where did they go?", "Who wrote this story?"]


def _corpus(rng: random.Random, num_sentences: int = 160) -> list[str]:
    """A few KB of simple English (plus digits and punctuation) to train the BPE on."""
    lines = []
    for i in range(num_sentences):
        sentence = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}"
        lines.append(sentence[0].upper() + sentence[1:])
        if i % 4 == 0:
            lines.append(rng.choice(_QUESTIONS))
        if i % 7 == 0:
            a, b = rng.randrange(100), rng.randrange(100)
            lines.append(f"{a} plus {b} is {a + b}, and {a} times {b} is {a * b}.")
    return lines


@dataclass(frozen=True)
class TokenizerSpec:
    """What a tiny tokenizer's files say: its special tokens (after the BPE vocabulary), chat template, roles."""

    special_tokens: tuple[str, ...]
    chat_template: str
    eos_token: str
    pad_token: str
    bos_token: str | None
    tokenizer_class: str


QWEN3_TOKENIZER = TokenizerSpec(SPECIAL_TOKENS, CHAT_TEMPLATE, eos_token=IM_END, pad_token=ENDOFTEXT, bos_token=None,
                                tokenizer_class="Qwen2Tokenizer")


def build_tokenizer(seed: int = 0, special_tokens: tuple[str, ...] = SPECIAL_TOKENS):
    """A byte-level BPE (Qwen-style pipeline) trained offline; the special tokens follow the BPE vocab."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB_SIZE, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tokenizer.train_from_iterator(_corpus(random.Random(seed)), trainer)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    return tokenizer


def write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(obj, handle, indent=2, ensure_ascii=False)
        handle.write("\n")


def write_tokenizer(out: str, spec: TokenizerSpec = QWEN3_TOKENIZER, seed: int = 0) -> tuple[dict[str, int], int]:
    """Writes ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` into ``out``.

    Returns:
        (special token -> id, padded vocabulary size: the tokenizer's size rounded up to a multiple of 64).
    """
    tokenizer = build_tokenizer(seed, spec.special_tokens)
    ids = {token: tokenizer.token_to_id(token) for token in spec.special_tokens}
    tokenizer.save(os.path.join(out, "tokenizer.json"))
    added = {str(ids[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                           "single_word": False, "special": True} for t in spec.special_tokens}
    additional = [t for t in spec.special_tokens if t not in (spec.pad_token, spec.bos_token)]
    write_json(os.path.join(out, "tokenizer_config.json"), {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": additional,
        "bos_token": spec.bos_token,
        "chat_template": spec.chat_template,
        "clean_up_tokenization_spaces": False,
        "eos_token": spec.eos_token,
        "errors": "replace",
        "model_max_length": MAX_POSITION_EMBEDDINGS,
        "pad_token": spec.pad_token,
        "split_special_tokens": False,
        "tokenizer_class": spec.tokenizer_class,
        "unk_token": None,
    })
    special = {"content": None, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    token_map = {"additional_special_tokens": additional, "eos_token": {**special, "content": spec.eos_token},
                 "pad_token": {**special, "content": spec.pad_token}}
    if spec.bos_token is not None:
        token_map["bos_token"] = {**special, "content": spec.bos_token}
    write_json(os.path.join(out, "special_tokens_map.json"), token_map)
    return ids, 64 * math.ceil(tokenizer.get_vocab_size(with_added_tokens=True) / 64)


def _transformers_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("transformers")
    except PackageNotFoundError:
        return "unknown"


def target_config(vocab_size: int, ids: dict[str, int], head_dim: int = HEAD_DIM) -> dict:
    """``config.json`` of the tiny target, laid out like Qwen/Qwen3-8B's."""
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": ids[ENDOFTEXT],
        "eos_token_id": ids[IM_END],
        "head_dim": head_dim,
        "hidden_act": "silu",
        "hidden_size": HIDDEN_SIZE,
        "initializer_range": INIT_STD,
        "intermediate_size": INTERMEDIATE_SIZE,
        "max_position_embeddings": MAX_POSITION_EMBEDDINGS,
        "max_window_layers": NUM_TARGET_LAYERS,
        "model_type": "qwen3",
        "num_attention_heads": NUM_HEADS,
        "num_hidden_layers": NUM_TARGET_LAYERS,
        "num_key_value_heads": NUM_KV_HEADS,
        "rms_norm_eps": RMS_NORM_EPS,
        "rope_scaling": None,
        "rope_theta": ROPE_THETA,
        "sliding_window": None,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "transformers_version": _transformers_version(),
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": vocab_size,
    }


def _normal(generator: torch.Generator, *shape: int) -> torch.Tensor:
    """[out, in] weights with std 1/sqrt(in)."""
    return torch.randn(*shape, generator=generator) * shape[-1] ** -0.5


def target_weights(vocab_size: int, zero_rows: list[int], generator: torch.Generator,
                   head_dim: int = HEAD_DIM) -> dict[str, torch.Tensor]:
    """Random repeat-prone Qwen3 weights (fp32), named as in the released safetensors (no ``lm_head``: tied)."""
    q_dim, kv_dim = NUM_HEADS * head_dim, NUM_KV_HEADS * head_dim
    embed = torch.randn(vocab_size, HIDDEN_SIZE, generator=generator)
    embed[zero_rows] = 0.0
    tensors = {"model.embed_tokens.weight": embed}
    for i in range(NUM_TARGET_LAYERS):
        p = f"model.layers.{i}."
        tensors.update({
            p + "input_layernorm.weight": torch.ones(HIDDEN_SIZE),
            p + "self_attn.q_proj.weight": _normal(generator, q_dim, HIDDEN_SIZE),
            p + "self_attn.k_proj.weight": _normal(generator, kv_dim, HIDDEN_SIZE),
            p + "self_attn.v_proj.weight": _normal(generator, kv_dim, HIDDEN_SIZE),
            p + "self_attn.o_proj.weight": _normal(generator, HIDDEN_SIZE, q_dim) * TARGET_BRANCH_SCALE,
            p + "self_attn.q_norm.weight": torch.ones(head_dim),
            p + "self_attn.k_norm.weight": torch.ones(head_dim),
            p + "post_attention_layernorm.weight": torch.ones(HIDDEN_SIZE),
            p + "mlp.gate_proj.weight": _normal(generator, INTERMEDIATE_SIZE, HIDDEN_SIZE),
            p + "mlp.up_proj.weight": _normal(generator, INTERMEDIATE_SIZE, HIDDEN_SIZE),
            p + "mlp.down_proj.weight": _normal(generator, HIDDEN_SIZE, INTERMEDIATE_SIZE) * TARGET_BRANCH_SCALE,
        })
    tensors["model.norm.weight"] = torch.ones(HIDDEN_SIZE)
    return tensors


def drafter_config(vocab_size: int, mask_token_id: int, ids: dict[str, int], block_size: int, *,
                   bos: str = ENDOFTEXT, eos: str = IM_END, hidden_size: int = HIDDEN_SIZE,
                   num_target_layers: int = NUM_TARGET_LAYERS, head_dim: int = HEAD_DIM,
                   dflash_extra: dict | None = None, sliding_window: int | None = None) -> DFlashDraftConfig:
    """The drafters' config, laid out like z-lab's classic releases (``block_size`` also at the top level).
    ``dflash_extra`` adds ``dflash_config`` keys (a Gemma target's ``input_embedding_scale``, ...). With
    ``sliding_window`` every layer but the last is a sliding-window layer, as in z-lab's Gemma 4 drafters."""
    first_layers = "full_attention" if sliding_window is None else "sliding_attention"
    raw = {
        "architectures": ["DFlashDraftModel"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "block_size": block_size,
        "bos_token_id": ids[bos],
        "dflash_config": {"block_size": block_size, "mask_token_id": mask_token_id,
                          "target_layer_ids": list(TARGET_LAYER_IDS), **(dflash_extra or {})},
        "dtype": "bfloat16",
        "eos_token_id": ids[eos],
        "head_dim": head_dim,
        "hidden_act": "silu",
        "hidden_size": hidden_size,
        "initializer_range": INIT_STD,
        "intermediate_size": INTERMEDIATE_SIZE,
        "layer_types": [first_layers] * (NUM_DRAFT_LAYERS - 1) + ["full_attention"],
        "max_position_embeddings": MAX_POSITION_EMBEDDINGS,
        "max_window_layers": NUM_DRAFT_LAYERS,
        "model_type": "qwen3",
        # hidden == num_heads * head_dim (and no GQA) lets drafter-agree use identity v_proj/o_proj.
        "num_attention_heads": hidden_size // head_dim,
        "num_hidden_layers": NUM_DRAFT_LAYERS,
        "num_key_value_heads": hidden_size // head_dim,
        "num_target_layers": num_target_layers,
        "rms_norm_eps": RMS_NORM_EPS,
        "rope_scaling": None,
        "rope_theta": ROPE_THETA,
        "sliding_window": sliding_window,
        "tie_word_embeddings": False,
        "transformers_version": _transformers_version(),
        "use_cache": True,
        "use_sliding_window": sliding_window is not None,
        "vocab_size": vocab_size,
    }
    return DFlashDraftConfig.from_dict(raw)


def random_drafter(config: DFlashDraftConfig, generator: torch.Generator):
    from dflash_sglang.core.model import DFlashDrafter

    drafter = DFlashDrafter(config)
    with torch.no_grad():
        for name, param in drafter.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.copy_(_normal(generator, *param.shape))
    return drafter


def _agreeing(drafter):
    """Zero q_proj/fc/down_proj and identity v_proj/o_proj: every block row points along embedding(t0)."""
    eye = torch.eye(drafter.config.hidden_size)
    with torch.no_grad():
        drafter.fc.weight.zero_()
        for layer in drafter.layers:
            layer.self_attn.q_proj.weight.zero_()
            layer.self_attn.k_proj.weight.zero_()
            layer.self_attn.v_proj.weight.copy_(eye)
            layer.self_attn.o_proj.weight.copy_(eye)
            layer.mlp.down_proj.weight.zero_()
    return drafter


def _disagreeing(drafter):
    """Zero final norm: all-zero logits, so the drafter always proposes token 0."""
    with torch.no_grad():
        drafter.norm.weight.zero_()
    return drafter


def write_tiny_checkpoints(out_dir: str, *, seed: int = 0, block_size: int = 8,
                           head_dim: int = HEAD_DIM) -> dict[str, str]:
    """Writes ``target/``, ``drafter/``, ``drafter-agree/`` and ``drafter-disagree/`` under ``out_dir``.

    Args:
        out_dir: folder to write into (created if needed; existing files are overwritten).
        seed: seeds the tokenizer corpus and every weight.
        block_size: the drafters' ``block_size``.
        head_dim: attention head size of both models (the drafters get ``HIDDEN_SIZE // head_dim`` heads).
            GPU attention kernels need more than the CPU default: FlashInfer's prefill and the fused KV
            injection cover 64, 128 and 256.
    Returns:
        ``{"target": path, "drafter": path, "drafter-agree": path, "drafter-disagree": path}``.
    """
    generator = torch.Generator().manual_seed(seed)
    paths = {name: os.path.join(out_dir, name) for name in ("target", "drafter", "drafter-agree", "drafter-disagree")}
    for path in paths.values():
        os.makedirs(path, exist_ok=True)

    target = paths["target"]
    ids, vocab_size = write_tokenizer(target, QWEN3_TOKENIZER, seed)
    padding_rows = list(range(max(ids.values()) + 1, vocab_size))
    # Row 0: drafter-disagree's proposal; <|mask|>: the block filler; padding rows: no token. All zero, so
    # their logit is 0 and greedy decoding never picks them.
    zero_rows = [0, ids[MASK]] + padding_rows
    write_json(os.path.join(target, "config.json"), target_config(vocab_size, ids, head_dim))
    write_json(os.path.join(target, "generation_config.json"), {
        "bos_token_id": ids[ENDOFTEXT],
        "eos_token_id": [ids[IM_END], ids[ENDOFTEXT]],
        "pad_token_id": ids[ENDOFTEXT],
        "transformers_version": _transformers_version(),
    })
    weights = target_weights(vocab_size, zero_rows, generator, head_dim)
    save_file({name: t.to(torch.bfloat16).contiguous() for name, t in weights.items()},
              os.path.join(target, "model.safetensors"), metadata={"format": "pt"})

    config = drafter_config(vocab_size, ids[MASK], ids, block_size, head_dim=head_dim)
    for name, build in (("drafter", lambda d: d), ("drafter-agree", _agreeing), ("drafter-disagree", _disagreeing)):
        save_drafter(build(random_drafter(config, generator)).to(torch.bfloat16), paths[name])
    return paths
