# SPDX-License-Identifier: Apache-2.0
"""Gemma 4 targets under SGLang's pinned transformers 5.3.0: the configs registered with SGLang and
transformers, and ``ModelConfig`` serving a Gemma 4 text-only with a KV pool as wide as its widest layer
(``models/gemma4_config.py``). Other models are left as they are."""

from __future__ import annotations

from dflash_sglang.serving.patches import patches


@patches(lambda module: module)
def patch_hf_transformers_utils(module) -> None:
    """Registers the Gemma 4 configs with SGLang's ``_CONFIG_REGISTRY`` and transformers' ``AutoConfig``."""
    from transformers import AutoConfig

    from dflash_sglang.serving.models.gemma4_config import Gemma4Config, Gemma4TextConfig

    for config_cls in (Gemma4Config, Gemma4TextConfig):
        module._CONFIG_REGISTRY[config_cls.model_type] = config_cls
        try:
            AutoConfig.register(config_cls.model_type, config_cls)
        except ValueError:  # a transformers with its own Gemma 4: SGLang's registry (ours) still wins
            pass


@patches(lambda module: module.ModelConfig)
def patch_model_config(model_config_cls) -> None:
    """Wraps ``ModelConfig._derive_model_shapes`` and ``ModelConfig.get_total_num_kv_heads``."""
    original_derive_shapes = model_config_cls._derive_model_shapes
    original_num_kv_heads = model_config_cls.get_total_num_kv_heads

    def derive_model_shapes(self) -> None:
        original_derive_shapes(self)
        from dflash_sglang.serving.models.gemma4_config import adapt_model_config

        adapt_model_config(self)

    def get_total_num_kv_heads(self) -> int:
        pool_heads = getattr(self.hf_text_config, "kv_pool_num_heads", None)  # Gemma4TextConfig only
        return pool_heads if pool_heads is not None else original_num_kv_heads(self)

    model_config_cls._derive_model_shapes = derive_model_shapes
    model_config_cls.get_total_num_kv_heads = get_total_num_kv_heads
