# SPDX-License-Identifier: Apache-2.0
"""End to end on the CPU: real `python -m sglang.launch_server` processes on the tiny checkpoints, one with
`--speculative-algorithm DFLASH` and one without, driven with the `openai` client.

Greedy outputs must be token-identical (lossless); the agreeing drafter must be accepted; SGLang's own
idle memory check (strict mode) must find no leaked KV slots; bad requests get an HTTP error and the
server keeps serving.
"""

from __future__ import annotations

import concurrent.futures
import os
import time

import openai
import pytest

from dflash_sglang.launch import ServerProcess

pytestmark = pytest.mark.slow

COMMON_ARGS = ["--device", "cpu", "--attention-backend", "torch_native", "--disable-cuda-graph",
               "--skip-server-warmup", "--mem-fraction-static", "0.1", "--max-total-tokens", "8192",
               "--dtype", "bfloat16", "--random-seed", "0"]
PROMPTS = [
    "the quick brown fox",
    "Speculative decoding drafts a block of tokens and",
    "hello",
    "In a small village by the sea there lived an old fisherman who every morning",
]


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoints) -> dict[str, str]:
    return tiny_checkpoints


def _server(checkpoints, tmp_path_factory, name: str, extra: list[str]) -> ServerProcess:
    log = str(tmp_path_factory.mktemp("logs") / f"{name}.log")
    env = dict(os.environ, SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE="1")
    return ServerProcess(["--model-path", checkpoints["target"], *COMMON_ARGS, *extra], log_path=log, env=env)


@pytest.fixture(scope="module")
def baseline(checkpoints, tmp_path_factory):
    with _server(checkpoints, tmp_path_factory, "baseline", []) as server:
        yield server


@pytest.fixture(scope="module")
def dflash(checkpoints, tmp_path_factory):
    extra = ["--speculative-algorithm", "DFLASH", "--speculative-draft-model-path", checkpoints["drafter"]]
    with _server(checkpoints, tmp_path_factory, "dflash", extra) as server:
        yield server


@pytest.fixture(scope="module")
def dflash_agree(checkpoints, tmp_path_factory):
    extra = ["--speculative-algorithm", "DFLASH", "--speculative-draft-model-path", checkpoints["drafter-agree"],
             "--decode-log-interval", "2"]
    with _server(checkpoints, tmp_path_factory, "dflash-agree", extra) as server:
        yield server


def _client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="none", timeout=600, max_retries=0)


def _complete(server: ServerProcess, prompt: str, max_tokens: int, **kwargs) -> tuple[str, str]:
    response = _client(server).completions.create(model="default", prompt=prompt, max_tokens=max_tokens,
                                                  temperature=0, **kwargs)
    return response.choices[0].text, response.choices[0].finish_reason


def _chat(server: ServerProcess, content: str, max_tokens: int, stream: bool) -> str:
    messages = [{"role": "user", "content": content}]
    client = _client(server)
    if not stream:
        response = client.chat.completions.create(model="default", messages=messages, max_tokens=max_tokens,
                                                  temperature=0)
        return response.choices[0].message.content
    chunks = client.chat.completions.create(model="default", messages=messages, max_tokens=max_tokens,
                                            temperature=0, stream=True)
    return "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)


def _assert_no_leak(server: ServerProcess) -> None:
    time.sleep(3)  # the scheduler checks its pools when idle (strict mode raises on a leak)
    assert server.healthy(), f"server died after the requests:\n{server.log_tail()}"
    assert "memory leak" not in server.log_text(), server.log_tail()


def test_greedy_token_identical_generate(baseline, dflash):
    for prompt in PROMPTS[:3]:
        spec_ids, meta = dflash.generate_greedy(prompt, 32)
        base_ids, _ = baseline.generate_greedy(prompt, 32)
        assert spec_ids == base_ids, prompt
        assert meta["spec_verify_ct"] >= 1 and len(spec_ids) == 32


def test_chat_and_completion_streaming_and_not(baseline, dflash):
    for content in PROMPTS[:2]:
        for stream in (False, True):
            assert _chat(dflash, content, 40, stream) == _chat(baseline, content, 40, stream)
    assert _complete(dflash, PROMPTS[3], 64) == _complete(baseline, PROMPTS[3], 64)


def test_sixteen_concurrent_requests_of_different_lengths(baseline, dflash):
    prompts = [" ".join(["word"] * (i + 1)) + f" {PROMPTS[i % len(PROMPTS)]}" for i in range(16)]
    lengths = [4 + 3 * i for i in range(16)]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        spec = list(pool.map(lambda a: _complete(dflash, *a), zip(prompts, lengths)))
        base = list(pool.map(lambda a: _complete(baseline, *a), zip(prompts, lengths)))
    assert spec == base
    _assert_no_leak(dflash)


def test_stop_strings_eos_and_max_tokens_inside_a_block(baseline, dflash):
    text, _ = _complete(baseline, PROMPTS[1], 40)
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop.strip(), "the baseline produced no text to stop on"
    for kwargs in ({"stop": [stop]}, {}):
        for max_tokens in (1, 13):
            assert _complete(dflash, PROMPTS[1], max_tokens, **kwargs) == \
                _complete(baseline, PROMPTS[1], max_tokens, **kwargs)


def test_agreeing_drafter_is_accepted_and_lossless(baseline, dflash_agree):
    reported = []
    for prompt in PROMPTS[:3]:
        spec_ids, meta = dflash_agree.generate_greedy(prompt, 48)
        base_ids, _ = baseline.generate_greedy(prompt, 48)
        assert spec_ids == base_ids, prompt
        # SGLang's own per-request acceptance: tokens per verify step, as the server reports it.
        assert meta["spec_accept_length"] == pytest.approx(len(spec_ids) / meta["spec_verify_ct"], abs=0.5)
        reported.append(meta["spec_accept_length"])
    assert sum(reported) / len(reported) > 4, reported
    logged = [float(line.split("accept len: ")[1].split(",")[0])
              for line in dflash_agree.log_text().splitlines() if "accept len: " in line]
    assert logged and max(logged) > 4, "the periodic decode log line reports the acceptance length"
    _assert_no_leak(dflash_agree)


def test_unsupported_request_gets_clear_http_error_and_server_keeps_serving(baseline, dflash):
    with pytest.raises(openai.BadRequestError) as error:
        _client(dflash).completions.create(model="default", prompt="hi", max_tokens=4, logprobs=2)
    assert "DFLASH" in str(error.value)
    assert _complete(dflash, PROMPTS[0], 8) == _complete(baseline, PROMPTS[0], 8)
