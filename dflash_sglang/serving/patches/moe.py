# SPDX-License-Identifier: Apache-2.0
"""Tuned fused-MoE kernel configs shipped with this package, picked up by SGLang's fused MoE.

SGLang looks a Triton fused-MoE config up by file name (``E=..,N=..,device_name=..[,dtype=..].json``, see
``get_config_file_name``) in its own ``configs/triton_<version>/`` folder or ``$SGLANG_MOE_CONFIG_DIR``, and
otherwise runs a generic default ("Using default MoE kernel config"). It ships none for the expert shapes
of the targets DFLASH serves here (Gemma-4-26B-A4B: E=128, N=704) or for its verify shapes (16 tokens per
request). ``scripts/tune_moe.py`` tunes them on a GPU into ``dflash_sglang/serving/moe_configs/``; this patch
makes ``get_moe_configs`` read that folder first (same names, same Triton-version folders), and SGLang's own
files and defaults stay as they are for every other shape.
"""

from __future__ import annotations

import json
import logging
import os

from dflash_sglang.serving.patches import patches

logger = logging.getLogger(__name__)
PACKAGED_MOE_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "moe_configs")


def triton_version_folder(version: str) -> str:
    """SGLang's folder name for a Triton version: ``triton_3_6_0`` for 3.6.0."""
    return "triton_" + version.split("+")[0].replace(".", "_")


def packaged_moe_config(file_name: str, triton_version: str) -> dict[int, dict] | None:
    """The packaged config map (tokens -> kernel config) named ``file_name`` for this Triton version, or None.
    Configs tuned under another Triton version are not used: SGLang measured such reuse to lose speed."""
    path = os.path.join(PACKAGED_MOE_CONFIGS, triton_version_folder(triton_version), file_name)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        configs = {int(tokens): config for tokens, config in json.load(handle).items()}
    logger.info("Using dflash-sglang's tuned MoE kernel config %s", path)
    return configs


@patches(lambda module: module)
def patch_fused_moe_config(module) -> None:
    """Wraps ``get_moe_configs`` (``layers/moe/fused_moe_triton/fused_moe_triton_config.py``; an lru-cached
    lookup that ``try_get_optimal_moe_config`` calls through the module) to return a packaged config first."""
    import functools

    import triton

    original = module.get_moe_configs.__wrapped__  # the lookup under upstream's lru_cache

    @functools.lru_cache
    def get_moe_configs(E, N, dtype, block_n=0, block_k=0, per_channel_quant=False, down_moe=False):
        deterministic = module.get_global_server_args().enable_deterministic_inference
        if not deterministic:
            name = module.get_config_file_name(E, N, dtype, [block_n, block_k], per_channel_quant,
                                               down_moe=down_moe)
            configs = packaged_moe_config(name, triton.__version__)
            if configs is not None:
                return configs
        return original(E, N, dtype, block_n, block_k, per_channel_quant, down_moe)

    module.get_moe_configs = get_moe_configs
