# SPDX-License-Identifier: Apache-2.0
"""Gemma 4 configs for SGLang 0.5.10.post1, whose pinned transformers (5.3.0) cannot parse them.

``Gemma4Config`` (``model_type: gemma4``, the multimodal "it" wrapper with ``text_config``,
``vision_config`` and ``audio_config``) and ``Gemma4TextConfig`` (``model_type: gemma4_text``) read the
released ``config.json`` files as transformers' own Gemma 4 configuration (transformers >= 5.17,
``models/gemma4/configuration_gemma4.py``) does, without ``trust_remote_code``: same keys, same defaults.
``patches/gemma4.py`` registers both with transformers' ``AutoConfig`` and SGLang's config registry.

Released layouts (checked against public copies of google/gemma-4-26B-A4B-it and google/gemma-4-31B-it
``config.json`` quoted in third-party loaders' tests, 2026-11): ``architectures:
["Gemma4ForConditionalGeneration"]``; text_config with ``layer_types`` (5 sliding : 1 full, last full),
``head_dim`` 256 / ``global_head_dim`` 512, ``num_key_value_heads`` 16 / ``num_global_key_value_heads`` 4
(31B; 8 / 2 for 26B-A4B), ``attention_k_eq_v: true``, ``sliding_window`` 1024, ``final_logit_softcapping``
30, ``rope_parameters`` per layer type (sliding: default, theta 1e4; full: ``proportional``, theta 1e6,
``partial_rotary_factor`` 0.25), ``hidden_size_per_layer_input`` 0 or null, ``num_kv_shared_layers`` 0;
26B-A4B adds ``enable_moe_block``, ``num_experts`` 128, ``top_k_experts`` 8, ``moe_intermediate_size`` 704.

The per-layer-embedding and KV-sharing features of the small Gemma 4 models (E2B/E4B) are parsed but not
served: :func:`check_servable` says so.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from transformers import PretrainedConfig

from dflash_sglang.serving.models.tp_split import check_tp_split

logger = logging.getLogger(__name__)
SLIDING, FULL = "sliding_attention", "full_attention"
DEFAULT_ROPE_PARAMETERS = {
    SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
    FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}
SUPPORTED_ROPE_TYPES = ("default", "proportional")


@dataclass(frozen=True)
class LayerAttention:
    """One decoder layer's attention shape: ``k_eq_v`` layers have no ``v_proj`` (values = raw keys)."""

    layer_type: str
    head_dim: int
    num_kv_heads: int
    k_eq_v: bool
    rope_theta: float
    rotary_fraction: float  # share of head_dim pairs that rotate (1.0 for the default RoPE)
    sliding_window: int | None


class Gemma4TextConfig(PretrainedConfig):
    model_type = "gemma4_text"
    base_config_key = "text_config"

    def __init__(self, vocab_size: int = 262_144, hidden_size: int = 2304, intermediate_size: int = 9216,
                 num_hidden_layers: int = 30, num_attention_heads: int = 8, num_key_value_heads: int = 4,
                 head_dim: int = 256, global_head_dim: int = 512, num_global_key_value_heads: int | None = None,
                 hidden_activation: str = "gelu_pytorch_tanh", max_position_embeddings: int = 131_072,
                 rms_norm_eps: float = 1e-6, rope_parameters: dict | None = None, attention_bias: bool = False,
                 sliding_window: int = 512, layer_types: list[str] | None = None,
                 final_logit_softcapping: float | None = None, use_bidirectional_attention: str | None = None,
                 vocab_size_per_layer_input: int = 262_144, hidden_size_per_layer_input: int | None = 256,
                 attention_k_eq_v: bool = False, num_kv_shared_layers: int = 0, enable_moe_block: bool = False,
                 use_double_wide_mlp: bool = False, num_experts: int | None = None,
                 top_k_experts: int | None = None, moe_intermediate_size: int | None = None,
                 tie_word_embeddings: bool = True, pad_token_id: int | None = 0,
                 eos_token_id: int | list[int] | None = 1, bos_token_id: int | None = 2, **kwargs: Any) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.global_head_dim = global_head_dim
        self.num_global_key_value_heads = num_global_key_value_heads
        self.hidden_activation = hidden_activation
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_parameters = rope_parameters or {k: dict(v) for k, v in DEFAULT_ROPE_PARAMETERS.items()}
        self.attention_bias = attention_bias
        self.sliding_window = sliding_window
        if layer_types is None:  # transformers' default: 5 sliding : 1 full
            layer_types = [SLIDING if (i + 1) % 6 else FULL for i in range(num_hidden_layers)]
        self.layer_types = list(layer_types)
        if self.layer_types:  # as transformers: the last layer is always global
            self.layer_types[-1] = FULL
        self.final_logit_softcapping = final_logit_softcapping
        self.use_bidirectional_attention = use_bidirectional_attention
        self.vocab_size_per_layer_input = vocab_size_per_layer_input
        self.hidden_size_per_layer_input = hidden_size_per_layer_input
        self.attention_k_eq_v = attention_k_eq_v
        self.num_kv_shared_layers = num_kv_shared_layers
        self.enable_moe_block = enable_moe_block
        self.use_double_wide_mlp = use_double_wide_mlp
        self.num_experts = num_experts
        self.top_k_experts = top_k_experts
        self.moe_intermediate_size = moe_intermediate_size
        super().__init__(tie_word_embeddings=tie_word_embeddings, pad_token_id=pad_token_id,
                         eos_token_id=eos_token_id, bos_token_id=bos_token_id, **kwargs)

    def convert_rope_params_to_dict(self, ignore_keys_at_rope_validation=None, **kwargs: Any) -> dict[str, Any]:
        """Keeps ``rope_parameters`` per layer type as written (transformers' Gemma 4 config does the same);
        transformers 5.3's generic standardization would fold it into one dict."""
        return kwargs

    # ----------------------------------------------------------------------------------------------
    def layer_attention(self, layer_id: int) -> LayerAttention:
        """Layer ``layer_id``'s attention, as transformers' ``per_layer_config`` resolves it: full-attention
        layers use ``global_head_dim`` and, with ``attention_k_eq_v``, ``num_global_key_value_heads``."""
        layer_type = self.layer_types[layer_id]
        rope = self.rope_parameters[layer_type]
        is_full = layer_type == FULL
        k_eq_v = bool(self.attention_k_eq_v) and is_full
        num_kv_heads = self.num_key_value_heads
        if k_eq_v and self.num_global_key_value_heads is not None:
            num_kv_heads = self.num_global_key_value_heads
        return LayerAttention(
            layer_type=layer_type,
            head_dim=self.global_head_dim if is_full else self.head_dim,
            num_kv_heads=num_kv_heads,
            k_eq_v=k_eq_v,
            rope_theta=float(rope["rope_theta"]),
            rotary_fraction=float(rope.get("partial_rotary_factor", 1.0)) if rope["rope_type"] == "proportional"
            else 1.0,
            sliding_window=None if is_full else self.sliding_window,
        )

    # ----------------------------------------------------------------------------------------------
    # The KV cache by layer type (``gemma4_kv_pool.Gemma4KVPool`` keeps one buffer shape per type)
    def layer_ids(self, layer_type: str) -> list[int]:
        return [i for i, t in enumerate(self.layer_types[:self.num_hidden_layers]) if t == layer_type]

    def kv_shape(self, layer_type: str, tp_size: int = 1) -> tuple[int, int]:
        """(KV heads, head size) of every ``layer_type`` layer: both depend on the layer type only. At
        ``tp_size`` > 1 the heads one rank keeps, as SGLang's ``QKVParallelLinear`` and
        ``ModelConfig.get_num_kv_heads`` count them (one, replicated, when there are fewer heads than ranks)."""
        spec = self.layer_attention(self.layer_types.index(layer_type))
        return max(1, spec.num_kv_heads // tp_size), spec.head_dim

    # SGLang's names for the two layer types' KV shapes (``ModelConfig.get_swa_num_kv_heads``, and the
    # hybrid-SWA pool that ``ModelRunnerKVCacheMixin._init_pools`` builds): ``swa_*`` the sliding layers',
    # ``v_head_dim`` the full-attention layers' (``head_dim`` is the sliding layers' in Gemma 4's config).
    @property
    def swa_num_key_value_heads(self) -> int:
        return self.kv_shape(self._swa_type())[0]

    @property
    def swa_head_dim(self) -> int:
        return self.kv_shape(self._swa_type())[1]

    @property
    def swa_v_head_dim(self) -> int:
        return self.swa_head_dim

    @property
    def v_head_dim(self) -> int:
        return self.kv_shape(FULL if FULL in self.layer_types else SLIDING)[1]

    def _swa_type(self) -> str:
        return SLIDING if SLIDING in self.layer_types else FULL

    def kv_bytes_per_token(self, element_size: int, tp_size: int = 1) -> int:
        """K + V bytes one token takes over all layers on one of ``tp_size`` ranks, each layer at its own shape
        (no padding)."""
        return sum(self.layer_type_kv_bytes(layer_type, element_size, tp_size)
                   for layer_type in set(self.layer_types[:self.num_hidden_layers]))

    def layer_type_kv_bytes(self, layer_type: str, element_size: int, tp_size: int = 1) -> int:
        """K + V bytes one token takes over the ``layer_type`` layers on one of ``tp_size`` ranks (0 if none)."""
        if layer_type not in self.layer_types[:self.num_hidden_layers]:
            return 0
        heads, dim = self.kv_shape(layer_type, tp_size)
        return 2 * heads * dim * element_size * len(self.layer_ids(layer_type))


class Gemma4VisionConfig(PretrainedConfig):
    """Kept as read (vision is not served); a config object because SGLang inspects ``vision_config.model_type``."""

    model_type = "gemma4_vision"
    base_config_key = "vision_config"


class Gemma4AudioConfig(PretrainedConfig):
    model_type = "gemma4_audio"
    base_config_key = "audio_config"


class Gemma4Config(PretrainedConfig):
    """The multimodal wrapper (``Gemma4ForConditionalGeneration``). Only ``text_config`` is served."""

    model_type = "gemma4"
    sub_configs = {"text_config": Gemma4TextConfig, "vision_config": Gemma4VisionConfig,
                   "audio_config": Gemma4AudioConfig}

    def __init__(self, text_config: dict | Gemma4TextConfig | None = None, vision_config: dict | None = None,
                 audio_config: dict | None = None, tie_word_embeddings: bool = True, **kwargs: Any) -> None:
        self.text_config = _sub_config(Gemma4TextConfig, text_config) or Gemma4TextConfig()
        self.vision_config = _sub_config(Gemma4VisionConfig, vision_config)
        self.audio_config = _sub_config(Gemma4AudioConfig, audio_config)
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


def _sub_config(config_cls: type[PretrainedConfig], value: dict | PretrainedConfig | None):
    return config_cls(**{k: v for k, v in value.items() if k != "model_type"}) if isinstance(value, dict) else value


def text_config_of(config: PretrainedConfig) -> Gemma4TextConfig:
    """The text config of a Gemma 4 wrapper or text config, as our class (a newer transformers' own Gemma 4
    classes are converted through their dict)."""
    text = getattr(config, "text_config", None) or config
    return text if isinstance(text, Gemma4TextConfig) else Gemma4TextConfig(**text.to_dict())


def check_servable(config: Gemma4TextConfig, tp_size: int, moe_tp_size: int) -> None:
    """Raises ``NotImplementedError`` naming the feature for Gemma 4 variants this package does not serve, or
    the size that ``tp_size`` (``moe_tp_size`` for the experts' columns) cannot split."""
    unsupported = {
        "hidden_size_per_layer_input > 0 (per-layer input embeddings, gemma-4-E2B/E4B)":
            bool(config.hidden_size_per_layer_input),
        "num_kv_shared_layers > 0 (KV sharing, gemma-4-E2B/E4B)": bool(config.num_kv_shared_layers),
        "use_double_wide_mlp": bool(config.use_double_wide_mlp),
        "use_bidirectional_attention='all'": config.use_bidirectional_attention == "all",
    }
    for feature, used in unsupported.items():
        if used:
            raise NotImplementedError(f"Gemma 4 in dflash-sglang does not support {feature} yet")
    for layer_type in sorted(set(config.layer_types)):
        if layer_type not in (SLIDING, FULL):
            raise ValueError(f"Gemma 4 config: unknown layer type {layer_type!r} in layer_types")
        rope = config.rope_parameters.get(layer_type)
        if rope is None or rope.get("rope_type", "default") not in SUPPORTED_ROPE_TYPES:
            raise NotImplementedError(f"Gemma 4 config: rope_parameters[{layer_type!r}] = {rope!r}; supported rope "
                                      f"types: {SUPPORTED_ROPE_TYPES}")
    if config.enable_moe_block and not (config.num_experts and config.top_k_experts and config.moe_intermediate_size):
        raise ValueError("Gemma 4 config: enable_moe_block needs num_experts, top_k_experts and moe_intermediate_size")
    check_tp_split("Gemma 4", tp_size,
                   even={"num_attention_heads": config.num_attention_heads,
                         "intermediate_size": config.intermediate_size},
                   kv_heads={f"{layer_type} KV heads": config.kv_shape(layer_type)[0]
                             for layer_type in sorted(set(config.layer_types))})
    if config.enable_moe_block:
        check_tp_split("Gemma 4's experts (MoE TP size)", moe_tp_size,
                       even={"moe_intermediate_size": config.moe_intermediate_size}, kv_heads={})
    for layer_type in sorted(set(config.layer_types)):
        heads = config.kv_shape(layer_type)[0]
        if config.num_attention_heads % heads:
            raise ValueError(f"Gemma 4 config: {layer_type} layers have {heads} KV heads, which must divide "
                             f"num_attention_heads ({config.num_attention_heads})")


def adapt_model_config(model_config: Any) -> None:
    """Called by ``patches/gemma4.py`` at the end of SGLang's ``ModelConfig._derive_model_shapes``: for a Gemma 4
    target, turns the multimodal flags off (vision/audio are not served) and states the KV shapes per layer
    type in SGLang's hybrid-SWA vocabulary: ``head_dim`` / ``v_head_dim`` and ``get_num_kv_heads`` are the
    full-attention layers', ``swa_head_dim`` / ``swa_v_head_dim`` and ``get_swa_num_kv_heads`` the sliding
    layers' (the KV pool: ``gemma4_kv_pool``). Any other model is left untouched."""
    text = model_config.hf_text_config
    if not isinstance(text, Gemma4TextConfig):
        return
    if model_config.is_multimodal:
        logger.info("Gemma 4: serving text only (the vision and audio towers are not loaded)")
    for flag in ("is_multimodal", "is_audio_model", "is_image_understandable_model",
                 "is_audio_understandable_model", "is_multimodal_chunked_prefill_supported"):
        setattr(model_config, flag, False)
    model_config.head_dim = model_config.v_head_dim = text.v_head_dim
    model_config.swa_head_dim = model_config.swa_v_head_dim = text.swa_head_dim
