# SPDX-License-Identifier: Apache-2.0
"""End to end on the CPU: real SGLang server processes on the tiny checkpoints, with and without
`--speculative-algorithm DFLASH`, driven with the `openai` client and SGLang's native /generate.

Every server prefills in chunks of 32 tokens (`--chunked-prefill-size`), so prompts longer than that
exercise chunked prefill. The baseline and the random-drafter server are `python -m sglang.launch_server`;
the agreeing-drafter server is SGLang's `sglang serve` CLI. Greedy outputs must be token-identical
(lossless); sampled outputs must follow the same distribution; the agreeing drafter must be accepted;
SGLang's own idle memory check (strict mode) must find no leaked KV slots; bad requests get an HTTP error
and the server keeps serving. The servers run SGLang's overlap scheduler (DFLASH's default loop), one of
them in SGLang's retraction test mode; `sglang.Engine` in a user's process runs with it off (DFLASH's
host-committed loop) and must give the same greedy outputs.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import os
import subprocess
import sys
import urllib.error

import openai
import pytest
from scipy import stats

from openai_client import client as _client, greedy_completion as _complete
from tiny_servers import CONTEXT_LENGTH, DTYPE, assert_no_leak, dflash_args, tiny_server

from dflash_sglang.deploy.cpu_stub import cpu_server_env
from dflash_sglang.deploy.launch import SGLANG_SERVE, ServerProcess

pytestmark = pytest.mark.slow

PROMPTS = [
    "the quick brown fox",
    "Speculative decoding drafts a block of tokens and",
    "hello",
    "In a small village by the sea there lived an old fisherman who every morning",
]


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoints) -> dict[str, str]:
    return tiny_checkpoints


@pytest.fixture
def baseline(plain_server):
    return plain_server


@pytest.fixture(scope="module")
def dflash(checkpoints, tmp_path_factory):
    with tiny_server(checkpoints, tmp_path_factory, "dflash", dflash_args(checkpoints, "drafter")) as server:
        yield server


@pytest.fixture(scope="function")
def dflash_retracting(checkpoints, tmp_path_factory):
    """SGLang's retraction test mode: every 3rd scheduler step retracts running requests (their KV freed,
    over-allocation included; they are prefilled again later) while the overlap loop has a step in flight.
    Stopped after its one test, so it takes no CPU from the tests that follow."""
    with tiny_server(checkpoints, tmp_path_factory, "dflash-retracting", dflash_args(checkpoints, "drafter-agree"),
                     env_extra={"SGLANG_TEST_RETRACT": "1", "SGLANG_TEST_RETRACT_INTERVAL": "3"}) as server:
        yield server


@pytest.fixture(scope="module")
def dflash_agree(checkpoints, tmp_path_factory):
    extra = [*dflash_args(checkpoints, "drafter-agree"), "--decode-log-interval", "2"]
    with tiny_server(checkpoints, tmp_path_factory, "dflash-agree", extra, launcher=SGLANG_SERVE) as server:
        yield server


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


def test_greedy_token_identical_generate(baseline, dflash):
    for prompt in PROMPTS[:3]:
        spec_ids, meta = dflash.generate_greedy(prompt, 32)
        base_ids, _ = baseline.generate_greedy(prompt, 32)
        assert spec_ids == base_ids, prompt
        assert meta["spec_verify_ct"] >= 1 and len(spec_ids) == 32
    assert "DFLASH: overlap scheduler (spec v2)" in dflash.log_text(), "the default server runs the overlap loop"


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
    assert_no_leak(dflash)


STOP_CASES = [(PROMPTS[1], False, 1), (PROMPTS[1], False, 13), (PROMPTS[3], True, 40)]
_baseline_completions: dict = {}


def _assert_stops_match(baseline: ServerProcess, dflash: ServerProcess) -> None:
    """A stop string, max_tokens 1 and 13 (inside a block): same text, finish reason and token count."""
    for prompt, with_stop, max_tokens in STOP_CASES:
        kwargs = {}
        if with_stop:
            text = _baseline_completion(baseline, prompt, 40, ())[0]
            stop = text[len(text) // 2: len(text) // 2 + 3]
            assert stop.strip(), "the baseline produced no text to stop on"
            kwargs = {"stop": [stop]}
        expected = _baseline_completion(baseline, prompt, max_tokens, tuple(kwargs.get("stop", ())))
        assert _complete(dflash, prompt, max_tokens, **kwargs) == expected, (prompt, kwargs, max_tokens)


def _baseline_completion(baseline: ServerProcess, prompt: str, max_tokens: int, stop: tuple) -> tuple[str, str, int]:
    key = (prompt, max_tokens, stop)
    if key not in _baseline_completions:
        _baseline_completions[key] = _complete(baseline, prompt, max_tokens, **({"stop": list(stop)} if stop else {}))
    return _baseline_completions[key]


def test_stop_strings_eos_and_max_tokens_inside_a_block(baseline, dflash, dflash_agree):
    """With the agreeing drafter a step emits many tokens, so the stops fall inside accepted blocks."""
    for server in dflash, dflash_agree:
        _assert_stops_match(baseline, server)


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
    assert_no_leak(dflash_agree)


def test_a_block_shorter_than_the_drafters_verifies_that_many_tokens(checkpoints, baseline, tmp_path_factory):
    """``--speculative-num-draft-tokens 3`` with the agreeing block-8 drafter: each step verifies 2 drafts and
    the bonus token, so it emits at most 3 tokens (over 4 a step at the drafter's own size, see
    test_agreeing_drafter_is_accepted_and_lossless), losslessly and without leaked slots."""
    extra = [*dflash_args(checkpoints, "drafter-agree"), "--speculative-num-draft-tokens", "3"]
    with tiny_server(checkpoints, tmp_path_factory, "dflash-block3", extra) as server:
        for prompt in PROMPTS[:2]:
            spec_ids, meta = server.generate_greedy(prompt, 31)
            assert spec_ids == baseline.generate_greedy(prompt, 31)[0], prompt
            # the prefill emits the first token; each verify step at most 3 of the other 30
            assert 10 <= meta["spec_verify_ct"] <= 15, meta
        assert "DFLASH: block size 3" in server.log_text()
        assert_no_leak(server)


def test_unsupported_request_gets_clear_http_error_and_server_keeps_serving(baseline, dflash):
    with pytest.raises(openai.BadRequestError) as error:
        _client(dflash).completions.create(model="default", prompt="hi", max_tokens=4,
                                           extra_body={"custom_params": {"bias": 1}})
    assert "DFLASH" in str(error.value) and "custom logit processors" in str(error.value)
    assert _complete(dflash, PROMPTS[0], 8) == _complete(baseline, PROMPTS[0], 8)


def test_requests_that_killed_sglang_get_http_400_without_dflash_too(baseline):
    """The package's hook guards a plain server as well (tests/test_request_safety.py probes a DFLASH one):
    each of these requests killed SGLang 0.5.10's scheduler, and with it the server."""
    client = _client(baseline)
    for prompt, token in (([1, 2, 99999999], 99999999), ([1, 2, -1], -1)):
        with pytest.raises(openai.BadRequestError, match=f"token id {token} at prompt position 2"):
            client.completions.create(model="default", prompt=prompt, max_tokens=4)
    with pytest.raises(urllib.error.HTTPError) as error:  # the openai client cannot send a NaN
        baseline.generate({"text": "hi", "sampling_params": {"max_new_tokens": 4, "temperature": float("nan")}})
    assert error.value.code == 400 and b"temperature must be a finite number" in error.value.read()
    with pytest.raises(openai.BadRequestError, match="top_logprobs_num"):
        client.completions.create(model="default", prompt="hi", max_tokens=4, logprobs=10**6)
    response = client.completions.create(model="default", prompt="hi", max_tokens=4, temperature=1.0,
                                         extra_body={"top_k": 10**20})  # the whole vocabulary, as -1
    assert response.usage.completion_tokens == 4
    assert _complete(baseline, PROMPTS[0], 8)[2] == 8
    assert_no_leak(baseline)


def test_chunked_prefill_of_a_long_prompt(baseline, dflash):
    prompt = " ".join(PROMPTS * 6)  # well over two 32-token chunks
    spec_ids, meta = dflash.generate_greedy(prompt, 24)
    base_ids, _ = baseline.generate_greedy(prompt, 24)
    assert meta["prompt_tokens"] > 64, meta
    assert spec_ids == base_ids
    assert "#new-token: 32," in dflash.log_text(), "the prompt was prefilled in 32-token chunks"


def test_generation_up_to_the_context_limit(baseline, dflash_agree):
    """A prompt 30 tokens short of the context length, generating to 2 tokens short of it (SGLang's limit): the
    overlap loop's KV over-allocation (committed + 2 blocks) is clamped to the request's req_to_token row,
    the last blocks' positions stay in range, and the output is the target's."""
    prompt_ids = [3 + (7 * i) % 300 for i in range(CONTEXT_LENGTH - 30)]
    body = {"input_ids": prompt_ids, "sampling_params": {"max_new_tokens": 28, "temperature": 0}}
    spec, base = dflash_agree.generate(body), baseline.generate(body)
    assert spec["output_ids"] == base["output_ids"] and len(spec["output_ids"]) == 28
    assert spec["meta_info"]["spec_verify_ct"] < 28, "the drafter's blocks were accepted near the limit"
    assert_no_leak(dflash_agree)


def test_retracted_requests_resume_losslessly(baseline, dflash_retracting):
    body = {"text": PROMPTS, "sampling_params": {"max_new_tokens": 40, "temperature": 0}}
    spec, base = dflash_retracting.generate(body), baseline.generate(body)
    assert [r["output_ids"] for r in spec] == [r["output_ids"] for r in base]
    retracted = [int(line.split("#retracted_reqs: ")[1].split(",")[0])
                 for line in dflash_retracting.log_text().splitlines() if "#retracted_reqs: " in line]
    assert sum(retracted) > 0, "SGLang's test mode retracted no request"
    assert_no_leak(dflash_retracting)


def _sampled_pairs(server: ServerProcess, prompt: str, count: int) -> collections.Counter:
    """The first two generated tokens of ``count`` independent sampled requests."""
    result = server.generate({"text": [prompt] * count, "sampling_params": {
        "max_new_tokens": 2, "temperature": 1.0, "top_k": 4, "ignore_eos": True}})
    return collections.Counter(tuple(r["output_ids"][:2]) for r in result)


def test_sampling_follows_the_target_distribution(baseline, dflash):
    """The second token comes from a speculative step (draft + rejection sampling); its joint law with the
    first must match the target's own sampling: a two-sample chi-square test over the (t1, t2) cells."""
    count = 400
    spec = _sampled_pairs(dflash, PROMPTS[1], count)
    base = _sampled_pairs(baseline, PROMPTS[1], count)
    cells = sorted(set(spec) | set(base), key=lambda cell: -(spec[cell] + base[cell]))
    frequent = [cell for cell in cells if spec[cell] + base[cell] >= 10]
    table = [[spec[cell] for cell in frequent] + [sum(spec[c] for c in cells if c not in frequent)],
             [base[cell] for cell in frequent] + [sum(base[c] for c in cells if c not in frequent)]]
    if table[0][-1] + table[1][-1] == 0:
        table = [row[:-1] for row in table]
    assert len(table[0]) >= 4, f"too few outcomes to test: {table}"
    _, p_value, _, _ = stats.chi2_contingency(table)
    assert p_value > 1e-3, f"DFLASH's sampled (t1, t2) differ from the target's: p={p_value:.2g}, {table}"


ENGINE_SCRIPT = """
import json, sys
import sglang
engine = sglang.Engine(model_path=sys.argv[1], speculative_algorithm="DFLASH", speculative_draft_model_path=sys.argv[2],
                       device="cpu", attention_backend="torch_native", disable_cuda_graph=True, dtype=sys.argv[4],
                       mem_fraction_static=0.1, max_total_tokens=8192, random_seed=0, chunked_prefill_size=32,
                       disable_overlap_schedule=True)
outputs = [engine.generate(prompt, params) for prompt, params in json.loads(sys.argv[3])]
print("RESULT " + json.dumps([o["output_ids"] for o in outputs]))
engine.shutdown()
"""


def test_sglang_engine_in_process_without_overlap(checkpoints, baseline, tmp_path):
    """sglang.Engine(..., speculative_algorithm="DFLASH") in a user's own Python process, with SGLang's overlap
    scheduler off (DFLASH's host-committed loop): greedy outputs, and a stop string inside an accepted block."""
    text = baseline.generate({"text": PROMPTS[3], "sampling_params": {"max_new_tokens": 40, "temperature": 0}})["text"]
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop.strip(), "the baseline produced no text to stop on"
    requests = [(prompt, {"max_new_tokens": 32, "temperature": 0}) for prompt in PROMPTS[:3]]
    requests.append((PROMPTS[3], {"max_new_tokens": 40, "temperature": 0, "stop": [stop]}))
    run = subprocess.run([sys.executable, "-c", ENGINE_SCRIPT, checkpoints["target"], checkpoints["drafter-agree"],
                          json.dumps(requests), DTYPE], capture_output=True, text=True, timeout=900,
                         env=cpu_server_env(dict(os.environ)), cwd=tmp_path)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stderr[-4000:]
    engine_ids = json.loads(lines[0][len("RESULT "):])
    assert engine_ids == [baseline.generate({"text": prompt, "sampling_params": params})["output_ids"]
                          for prompt, params in requests]
