# SPDX-License-Identifier: Apache-2.0
"""Tensor parallelism end to end on the CPU: a DFLASH server at ``--tp-size 2`` (two SGLang scheduler processes,
gloo collectives) against DFLASH at ``--tp-size 1`` and the plain server, on the tiny checkpoints in float32.

Greedy outputs must be token-identical across the three (lossless at TP 2). The agreeing drafter's drafts are
deterministic, so the sharded drafter must also be accepted exactly as the unsharded one: the same number of
verify steps and the same acceptance histogram per request. Sampled requests must finish on both ranks (ranks
that parted would hang on their next collective), and SGLang's strict idle check must find no leaked KV slot.
``ServerProcess`` splits the host's cores between the ranks (``SGLANG_CPU_OMP_THREADS_BIND``).

Each test runs at TP 2 on one node (one launch starting both ranks) and on two nodes of one rank each (``--nnodes
2``: two ``launch_server`` processes that meet at ``--dist-init-addr`` as on two machines, gloo over TCP; node 1
serves only SGLang's dummy health check, node 0 the API).
"""

from __future__ import annotations

import concurrent.futures

import pytest

from openai_client import greedy_completion as _complete
from test_server_e2e import PROMPTS
from tiny_servers import assert_no_leak, dflash_args, tiny_server

from dflash_sglang.deploy.launch import free_port

# DFLASH at TP 1 is the shared server with the agreeing drafter in the overlap loop (conftest.py).
pytestmark = [pytest.mark.slow, pytest.mark.parametrize("dflash_server", [("drafter-agree", "overlap")], indirect=True,
                                                        ids=["drafter-agree-overlap"])]
MAX_TOKENS = 24


@pytest.fixture(scope="module", params=[1, 2], ids=["one-node", "two-nodes"])
def dflash_tp2(request, tiny_checkpoints, tmp_path_factory):
    """The API server of DFLASH at TP 2 over ``request.param`` nodes; ``.logs()``: every node's log text."""
    extra = ["--tp-size", "2", *dflash_args(tiny_checkpoints, "drafter-agree")]
    if request.param == 1:
        nodes = [tiny_server(tiny_checkpoints, tmp_path_factory, "dflash-tp2", extra)]
    else:
        extra += ["--nnodes", "2", "--dist-init-addr", f"127.0.0.1:{free_port()}"]
        nodes = [tiny_server(tiny_checkpoints, tmp_path_factory, f"dflash-tp2-node{rank}",
                             [*extra, "--node-rank", str(rank)]) for rank in (0, 1)]
    with concurrent.futures.ThreadPoolExecutor(len(nodes)) as pool:
        try:
            for started in [pool.submit(node.start) for node in nodes]:
                started.result()  # the nodes wait for each other: started together
            nodes[0].logs = lambda: "".join(node.log_text() for node in nodes)
            yield nodes[0]
        finally:
            for node in nodes:
                node.stop()  # a node still starting sees its process gone and gives up


def test_tp2_greedy_is_token_identical_and_accepted_as_at_tp1(plain_server, dflash_server, dflash_tp2):
    for prompt in PROMPTS:
        base_ids, _ = plain_server.generate_greedy(prompt, MAX_TOKENS)
        tp1_ids, tp1 = dflash_server.generate_greedy(prompt, MAX_TOKENS)
        tp2_ids, tp2 = dflash_tp2.generate_greedy(prompt, MAX_TOKENS)
        assert tp2_ids == tp1_ids == base_ids, prompt
        assert (tp2["spec_verify_ct"], tp2["spec_accept_histogram"]) == \
            (tp1["spec_verify_ct"], tp1["spec_accept_histogram"]), prompt
    assert "TP1" in dflash_tp2.logs(), "the TP 2 server runs a second rank"
    assert dflash_tp2.logs().count("DFLASH: overlap scheduler") == 2, "both ranks run DFLASH's worker"


def test_tp2_concurrent_greedy_and_sampled_requests(plain_server, dflash_server, dflash_tp2):
    prompts = [f"{' '.join(['word'] * (i + 1))} {PROMPTS[i % len(PROMPTS)]}" for i in range(4)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        greedy = pool.map(lambda p: _complete(dflash_tp2, p, MAX_TOKENS), prompts)
        sampled = pool.map(lambda p: dflash_tp2.generate({"text": p, "sampling_params": {
            "max_new_tokens": MAX_TOKENS, "temperature": 0.8, "top_p": 0.9, "top_k": 20}}), prompts)
        greedy, sampled = list(greedy), list(sampled)
    assert greedy == [_complete(plain_server, p, MAX_TOKENS) for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        assert list(pool.map(lambda p: _complete(dflash_server, p, MAX_TOKENS), prompts)) == greedy
    assert all(1 <= len(result["output_ids"]) <= MAX_TOKENS for result in sampled)
    assert_no_leak(dflash_tp2)
