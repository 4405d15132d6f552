# SPDX-License-Identifier: Apache-2.0
"""SGLang patches, one function per patched object, and what they share: the supported SGLang version and
the ``patches`` decorator that makes every patch check that version and apply once.

The import hook (``dflash_sglang.serving.plugin``) calls a patch with the SGLang module it belongs to, right after
SGLang imported it. Modules: ``algorithm`` (DFLASH as an algorithm, its arguments and requests), ``cpu``
(what SGLang's CPU path lacks, grammars included), ``cpu_attention`` (the torch_native attention backend:
block passes, sliding windows, SWA pools), ``cuda_graphs`` (both block passes in CUDA graphs; attention
backends), ``dummy_weights`` (benchmarks' dummy weights), ``gemma4`` (Gemma 4 configs, KV pool), ``moe``
(packaged fused-MoE kernel configs), ``overlap`` (the overlap scheduler's step state). No module here imports
SGLang or torch at import time.
"""

from __future__ import annotations

import functools
from importlib.metadata import version
from types import ModuleType
from typing import Any, Callable

SUPPORTED_SGLANG_VERSIONS = ("0.5.10.post1",)
ALGORITHM = "DFLASH"
PATCHED_MARK = "_dflash_patched"


class UnsupportedSGLangVersion(RuntimeError):
    pass


def check_sglang_version() -> None:
    found = version("sglang")
    if found not in SUPPORTED_SGLANG_VERSIONS:
        raise UnsupportedSGLangVersion(
            f"dflash-sglang supports SGLang {', '.join(SUPPORTED_SGLANG_VERSIONS)}, but {found} is installed: "
            f"pip install sglang=={SUPPORTED_SGLANG_VERSIONS[-1]}, or set DFLASH_SGLANG_DISABLE=1 to run SGLang "
            "without DFLASH")


def patches(owner: Callable[[ModuleType], Any]) -> Callable[[Callable[[Any], None]], Callable[[ModuleType], None]]:
    """Turns ``patch(target)`` into ``apply(module)``: ``target = owner(module)`` (a class, or the module
    itself) is patched once, after the SGLang version check, and marked so that a second call does nothing."""

    def decorate(patch: Callable[[Any], None]) -> Callable[[ModuleType], None]:
        @functools.wraps(patch)
        def apply(module: ModuleType) -> None:
            target = owner(module)
            if vars(target).get(PATCHED_MARK, False):
                return
            check_sglang_version()
            patch(target)
            setattr(target, PATCHED_MARK, True)

        return apply

    return decorate


def is_dflash_server(server_args) -> bool:
    return server_args.speculative_algorithm == ALGORITHM
