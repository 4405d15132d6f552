# SPDX-License-Identifier: Apache-2.0
"""SGLang servers on the tiny checkpoints for the end-to-end modules, on the CPU: the arguments every such server
runs with, how one is started (SGLang's strict idle memory check on), the leak check, and the plain server's
answers kept for reuse. The servers several modules compare against (the plain server in both loops, DFLASH for
each drafter and loop) are session fixtures in conftest.py, started once for the whole run."""

from __future__ import annotations

import json
import os
import time

from dflash_sglang.deploy.launch import ServerProcess

# float32: exact greedy equality is only meaningful where rounding cannot flip a near-tie. In bfloat16 a random
# tiny model's top-2 logits tie often, and the baseline's decode attention and DFLASH's verify (extend) attention
# round differently, differently again on another CPU (a CI machine parted one request of 16 at a tie that this
# machine does not reproduce). The GPU check measures bf16 ties explicitly (scripts/gpu_e2e.py).
DTYPE = "float32"
CONTEXT_LENGTH = 1024
COMMON_ARGS = ["--device", "cpu", "--attention-backend", "torch_native", "--disable-cuda-graph",
               "--skip-server-warmup", "--mem-fraction-static", "0.1", "--max-total-tokens", "8192",
               "--dtype", DTYPE, "--random-seed", "0", "--chunked-prefill-size", "32",
               "--context-length", str(CONTEXT_LENGTH), "--sleep-on-idle"]
# JSON-schema answers without free whitespace (the tiny model would fill its tokens with spaces); requests without
# a JSON grammar are not affected, so the shared servers all run with it.
GRAMMAR_ARGS = ["--constrained-json-disable-any-whitespace"]
# (drafter, loop) of the shared DFLASH servers: a drafter that agrees with the target (whole blocks accepted) and a
# random one (most of each block rejected), in the overlap loop (the default) and the host-committed loop.
DFLASH_MATRIX = [("drafter-agree", "overlap"), ("drafter", "overlap"), ("drafter-agree", "no-overlap"),
                 ("drafter", "no-overlap")]


def tiny_server(checkpoints: dict[str, str], tmp_path_factory, name: str, extra: list[str],
                env_extra: dict | None = None, **kwargs) -> ServerProcess:
    """A server (not started) on the tiny target with ``COMMON_ARGS + extra``, its log in a fresh folder."""
    log = str(tmp_path_factory.mktemp("logs") / f"{name}.log")
    env = dict(os.environ, SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE="1", **(env_extra or {}))
    return ServerProcess(["--model-path", checkpoints["target"], *COMMON_ARGS, *extra], log_path=log, env=env,
                         **kwargs)


def dflash_args(checkpoints: dict[str, str], drafter: str, loop: str = "overlap") -> list[str]:
    """The arguments that make a tiny server DFLASH with ``drafter``, in the overlap or the ``no-overlap`` loop."""
    args = ["--speculative-algorithm", "DFLASH", "--speculative-draft-model-path", checkpoints[drafter]]
    return args + (["--disable-overlap-schedule"] if loop == "no-overlap" else [])


def assert_no_leak(server: ServerProcess) -> None:
    time.sleep(3)  # the scheduler checks its pools when idle (strict mode raises on a leak)
    assert server.healthy(), f"server died after the requests:\n{server.log_tail()}"
    assert "memory leak" not in server.log_text(), server.log_tail()


_ANSWERS: dict[tuple[str, str], object] = {}


def cached_answer(server: ServerProcess, key, compute):
    """``compute()``'s result for ``key`` on ``server`` (a plain server, deterministic), computed once per run
    for all the DFLASH servers compared with it."""
    entry = (server.base_url, json.dumps(key, sort_keys=True))
    if entry not in _ANSWERS:
        _ANSWERS[entry] = compute()
    return _ANSWERS[entry]


def cached_generate(server: ServerProcess, body: dict) -> dict:
    """``server``'s /generate answer to ``body``, asked once per run (``cached_answer``)."""
    return cached_answer(server, body, lambda: server.generate(body))
