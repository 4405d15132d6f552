# SPDX-License-Identifier: Apache-2.0
"""Dummy weights that keep a model's signal, for benchmarks (``DFLASH_BENCH_DUMMY_SCALES=neutral``).

``--load-format dummy`` fills every parameter uniformly in [-1e-3, 1e-3] (``initialize_dummy_weights``). For
Gemma 4 that includes the RMSNorm weights (applied as ``x * weight``) and each layer's ``layer_scalar``, so the
residual stream shrinks a thousandfold per layer and underflows: every token reaches each router with the same
(zero) input, all tokens choose the same top-k experts, and a step at 8 requests or a 16-token verify pass reads 8
experts per layer where real routing touches ~52 or ~82 of the 128. A benchmark of Gemma-4-26B-A4B on upstream's
dummy weights thus measures fused MoE on 8 experts (the 26B's AR step at c8 came out below its weight-read floor).
With the setting, after upstream's fill every one-dimensional floating parameter but a bias (norm weights, scalars,
per-expert scales) is set to 1, so each norm returns unit-scale activations, the residual keeps each token's
embedding and the routers see distinct inputs; matrices keep upstream's values. Unset or ``upstream``: as SGLang.
"""

from __future__ import annotations

from dflash_sglang.core.config import bench_dummy_scales
from dflash_sglang.serving.patches import patches


def neutral_scales(model) -> list[str]:
    """Sets every one-dimensional floating parameter of ``model`` but biases to 1; returns their names."""
    import torch

    names = []
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1 and torch.is_floating_point(param) and not name.endswith("bias"):
                param.fill_(1.0)
                names.append(name)
    return names


@patches(lambda module: module)
def patch_dummy_loader(module) -> None:
    """Wraps ``initialize_dummy_weights`` as ``model_loader/loader.py`` (``DummyModelLoader``) calls it."""
    import functools
    import logging

    original = module.initialize_dummy_weights

    @functools.wraps(original)
    def initialize_dummy_weights(model, *args, **kwargs) -> None:
        original(model, *args, **kwargs)
        if bench_dummy_scales() == "neutral":
            names = neutral_scales(model)
            logging.getLogger(__name__).info("DFLASH_BENCH_DUMMY_SCALES=neutral: %d norm weights and scales set to 1",
                                             len(names))

    module.initialize_dummy_weights = initialize_dummy_weights
