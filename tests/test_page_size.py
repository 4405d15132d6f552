# SPDX-License-Identifier: Apache-2.0
"""DFLASH with SGLang's paged KV allocator (``--page-size`` 16 and 64), end to end on the CPU.

Per page size two DFLASH servers on the tiny checkpoints, against the shared plain server (conftest.py; the
target alone, whose greedy tokens do not depend on the page size): DFLASH under the overlap scheduler
(the default loop; the agreeing drafter, so blocks are accepted and cross page boundaries) and DFLASH's
host-committed loop (``--disable-overlap-schedule``; the random drafter, so most of each block is rejected and
the pages past the last kept token are freed every step). Greedy outputs must be the target's, one at a time
and concurrently, with stops inside a block and with a radix-cache hit; SGLang's strict idle memory check must
find no leaked page. The CPU runs the paged allocator through ``patches.cpu.patch_paged_allocator``.
"""

from __future__ import annotations

import concurrent.futures

import pytest

from openai_client import greedy_completion as _complete
from test_server_e2e import PROMPTS
from tiny_servers import assert_no_leak, dflash_args, tiny_server

pytestmark = pytest.mark.slow
PAGE_SIZES = [16, 64]
LONG_PROMPT = " ".join(PROMPTS * 8)  # well over two 64-token pages, prefilled in chunks


@pytest.fixture(scope="module", params=PAGE_SIZES, ids=lambda p: f"page{p}")
def servers(request, tiny_checkpoints, tmp_path_factory, plain_server):
    # SGLang wants prefill chunks of whole pages: 32-token chunks (COMMON_ARGS) at page 16, one page at 64.
    page = ["--page-size", str(request.param), "--chunked-prefill-size", str(max(32, request.param))]
    specs = {
        "overlap": [*page, *dflash_args(tiny_checkpoints, "drafter-agree")],
        "v1": [*page, *dflash_args(tiny_checkpoints, "drafter", "no-overlap")],
    }
    started = {}
    try:
        for name, extra in specs.items():
            started[name] = tiny_server(tiny_checkpoints, tmp_path_factory, f"{name}-page{request.param}", extra)
            started[name].__enter__()
        yield {"baseline": plain_server, **started}
    finally:
        for server in reversed(list(started.values())):
            server.__exit__(None, None, None)


def _both(servers):
    return [(name, servers[name]) for name in ("overlap", "v1")]


def test_greedy_token_identical_one_at_a_time_and_concurrent(servers):
    baseline = servers["baseline"]
    expected = [baseline.generate_greedy(prompt, 40)[0] for prompt in PROMPTS[:3]]
    prompts = [" ".join(["word"] * (i + 1)) + f" {PROMPTS[i % len(PROMPTS)]}" for i in range(6)]
    lengths = [5 + 7 * i for i in range(6)]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        concurrent_expected = list(pool.map(lambda a: _complete(baseline, *a), zip(prompts, lengths)))
    for name, server in _both(servers):
        for prompt, ids in zip(PROMPTS[:3], expected):
            spec_ids, meta = server.generate_greedy(prompt, 40)
            assert spec_ids == ids, (name, prompt)
            assert meta["spec_verify_ct"] >= 1
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            assert list(pool.map(lambda a: _complete(server, *a), zip(prompts, lengths))) == concurrent_expected, name
    assert "DFLASH: overlap scheduler (spec v2)" in servers["overlap"].log_text()
    assert "DFLASH: overlap scheduler (spec v2)" not in servers["v1"].log_text()


def test_stop_string_and_max_tokens_inside_a_block(servers):
    baseline = servers["baseline"]
    text = _complete(baseline, PROMPTS[3], 40)[0]
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop.strip(), "the baseline produced no text to stop on"
    cases = [(PROMPTS[1], 13, {}), (PROMPTS[1], 1, {}), (PROMPTS[3], 40, {"stop": [stop]})]
    for prompt, max_tokens, kwargs in cases:
        expected = _complete(baseline, prompt, max_tokens, **kwargs)
        for name, server in _both(servers):
            assert _complete(server, prompt, max_tokens, **kwargs) == expected, (name, max_tokens, kwargs)


def test_prefix_cache_reuse(servers):
    """The same long prompt twice: the second prefill reuses whole cached pages, whose drafter K/V were
    injected the first time; outputs stay the target's."""
    expected, _ = servers["baseline"].generate_greedy(LONG_PROMPT, 24)
    for name, server in _both(servers):
        first, _ = server.generate_greedy(LONG_PROMPT, 24)
        second, meta = server.generate_greedy(LONG_PROMPT, 24)
        assert first == second == expected, name
        assert meta["cached_tokens"] >= 64, (name, meta)


def test_no_leaked_pages(servers):
    for name, server in _both(servers):
        assert_no_leak(server)
