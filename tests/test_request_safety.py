# SPDX-License-Identifier: Apache-2.0
"""No single request brings a DFLASH server down: the API probed as an attacker or a buggy client would
(loopback only, a few requests each), on one real SGLang server on the CPU with the agreeing drafter (so
stops and budgets fall inside accepted blocks).

Every probe must get a 4xx or a correct answer, after which a normal request is served; SGLang's strict idle
memory check (``SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE``) must find every KV slot back in the pools.
Before ``dflash_sglang/serving/request_safety.py`` an out-of-vocabulary or negative prompt token id, a NaN
temperature, a ``top_k`` beyond int32, a fractional ``max_new_tokens`` (and on a DFLASH server a
``stop_token_ids`` entry beyond int64) each killed the server, as they kill SGLang 0.5.10 without the
package; ``n = 10**9`` made it build a list of 10**9 prompts. The same checks guard a plain server
(``test_checks_run_on_servers_without_dflash``; ``test_server_e2e`` sends one to a real plain server).

The server also runs with ``--enable-metrics``: SGLang's own tools must see DFLASH's acceptance
(``/server_info``'s ``avg_spec_accept_length``, read by ``sglang.bench_serving``, and the Prometheus gauges).
"""

from __future__ import annotations

import http.client
import json
import math
import os
import threading
import time
import types
import urllib.error
import urllib.request

import pytest

from dflash_sglang.deploy.launch import ServerProcess
from dflash_sglang.serving import request_safety

pytestmark = pytest.mark.slow

CONTEXT_LENGTH = 256
VOCAB_SIZE = 448  # the tiny target's (dflash_sglang.testing.tiny)
ARGS = ["--device", "cpu", "--attention-backend", "torch_native", "--disable-cuda-graph", "--skip-server-warmup",
        "--mem-fraction-static", "0.1", "--max-total-tokens", "8192", "--dtype", "float32", "--random-seed", "0",
        "--chunked-prefill-size", "32", "--context-length", str(CONTEXT_LENGTH), "--sleep-on-idle",
        "--enable-metrics"]


@pytest.fixture(scope="module")
def server(tiny_checkpoints, tmp_path_factory):
    log = str(tmp_path_factory.mktemp("logs") / "dflash-safety.log")
    env = dict(os.environ, SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE="1")
    args = ["--model-path", tiny_checkpoints["target"], *ARGS, "--speculative-algorithm", "DFLASH",
            "--speculative-draft-model-path", tiny_checkpoints["drafter-agree"]]
    with ServerProcess(args, log_path=log, env=env) as process:
        yield process


def _post(server: ServerProcess, path: str, body: dict, timeout: float = 120) -> tuple[int, dict | list]:
    """(HTTP status, JSON answer) of one POST; the body may hold NaN / Infinity, as Python's json writes them."""
    request = urllib.request.Request(f"{server.base_url}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _error(answer: dict) -> str:
    """The message of SGLang's error answer (native ``{"error": {"message"}}`` or OpenAI ``{"message"}``)."""
    return answer["error"]["message"] if "error" in answer else answer["message"]


def _generate(server: ServerProcess, sampling_params: dict, **body) -> tuple[int, dict | list]:
    return _post(server, "/generate", {"text": "hello", "sampling_params": sampling_params, **body})


def _assert_refused(status: int, answer: dict, *fragments: str) -> None:
    assert status == 400, answer
    for fragment in fragments:
        assert fragment in _error(answer), answer


def _assert_serving(server: ServerProcess) -> None:
    status, answer = _generate(server, {"max_new_tokens": 4, "temperature": 0})
    assert status == 200 and len(answer["output_ids"]) == 4, f"{answer}\n{server.log_tail()}"


def test_server_info_reports_the_acceptance_length_from_the_first_steps(server):
    """First in this module, so the server has printed no decode log line yet: SGLang folds its acceptance
    counters into ``avg_spec_accept_length`` only there (every 40 decode batches), so a short
    ``sglang.bench_serving`` run printed no acceptance length for DFLASH."""
    status, answer = _generate(server, {"max_new_tokens": 24, "temperature": 0, "ignore_eos": True})
    assert status == 200 and answer["meta_info"]["spec_verify_ct"] < 40
    with urllib.request.urlopen(f"{server.base_url}/server_info", timeout=30) as response:
        state = json.load(response)["internal_states"][0]
    # Tokens per verify step, as SGLang counts them (the overlap loop may count a finished request's last step).
    assert 1.0 <= state["avg_spec_accept_length"] <= 8.0, state.get("avg_spec_accept_length")
    assert state["avg_spec_accept_length"] > 3, "the agreeing drafter's blocks are accepted"


def test_out_of_vocabulary_and_negative_token_ids_are_refused(server):
    probes = [("/v1/completions", {"model": "default", "prompt": [1, 2, 99999999], "max_tokens": 4}, "99999999"),
              ("/v1/completions", {"model": "default", "prompt": [1, 2, -1], "max_tokens": 4}, "-1"),
              ("/v1/completions", {"model": "default", "prompt": [[1, 2], [3, VOCAB_SIZE]], "max_tokens": 4},
               str(VOCAB_SIZE)),
              ("/generate", {"input_ids": [1, 2, VOCAB_SIZE], "sampling_params": {"max_new_tokens": 4}},
               str(VOCAB_SIZE)),
              ("/generate", {"input_ids": [[5, 6], [1, 10**23]], "sampling_params": {"max_new_tokens": 4}},
               str(10**23))]
    for path, body, token in probes:
        status, answer = _post(server, path, body)
        _assert_refused(status, answer, f"token id {token} ", f"vocabulary of {VOCAB_SIZE} tokens")
    status, answer = _post(server, "/v1/completions", {"model": "default", "prompt": [1, 2, VOCAB_SIZE - 1],
                                                       "max_tokens": 4, "temperature": 0})
    assert status == 200 and answer["usage"]["completion_tokens"] == 4
    _assert_serving(server)


def test_non_finite_and_out_of_range_sampling_values_are_refused(server):
    for params, fragment in [({"temperature": math.nan}, "temperature must be a finite number"),
                             ({"temperature": math.inf}, "temperature must be a finite number"),
                             ({"temperature": -1}, "temperature must be non-negative"),
                             ({"top_p": math.nan}, "top_p must be a finite number"),
                             ({"top_p": -0.5}, "top_p must be in (0, 1]"),
                             ({"top_k": 0}, "top_k must be -1"),
                             ({"top_k": math.nan}, "top_k must be an integer"),
                             ({"max_new_tokens": 2.5}, "max_new_tokens must be an integer"),
                             ({"max_new_tokens": "5"}, "max_new_tokens must be an integer"),
                             ({"stop_token_ids": ["a"]}, "stop_token_ids must be a list of integers")]:
        _assert_refused(*_generate(server, {"max_new_tokens": 4, **params}), fragment)
    for path, body in [("/v1/completions", {"model": "default", "prompt": "hi", "max_tokens": 4,
                                            "temperature": math.nan}),
                       ("/v1/chat/completions", {"model": "default", "messages": [{"role": "user", "content": "hi"}],
                                                 "max_tokens": 4, "top_p": math.inf})]:
        _assert_refused(*_post(server, path, body), "must be a finite number")
    _assert_serving(server)


def test_top_k_beyond_the_vocabulary_samples_from_all_of_it(server):
    """top_k -1, above the vocabulary, and above int32 (which SGLang's batch cannot hold) mean the whole
    vocabulary; greedy requests ignore it. Integral floats are integers."""
    for top_k in (-1, VOCAB_SIZE + 1, 2**31, 10**20, 50.0):
        for temperature in (0, 0.8):
            status, answer = _generate(server, {"max_new_tokens": 12, "temperature": temperature, "top_k": top_k,
                                                "ignore_eos": True})
            assert status == 200 and len(answer["output_ids"]) == 12, (top_k, answer)
    _assert_serving(server)


def test_n_is_bounded_and_positive(server):
    huge = 10**9
    for path, body in [("/generate", {"text": "hi", "sampling_params": {"max_new_tokens": 4, "n": huge}}),
                       ("/v1/completions", {"model": "default", "prompt": "hi", "max_tokens": 4, "n": huge}),
                       ("/v1/chat/completions", {"model": "default", "messages": [{"role": "user", "content": "hi"}],
                                                 "max_tokens": 4, "n": huge}),
                       ("/v1/completions", {"model": "default", "prompt": "hi", "max_tokens": 4, "n": 0}),
                       ("/generate", {"text": "hi", "sampling_params": {"max_new_tokens": 4, "n": -1}})]:
        _assert_refused(*_post(server, path, body), "n (samples per prompt) must be an integer from 1 to 1024")
    status, answer = _post(server, "/v1/completions", {"model": "default", "prompt": "hi", "max_tokens": 6,
                                                       "n": 3, "temperature": 0.8})
    assert status == 200 and len(answer["choices"]) == 3 and answer["usage"]["completion_tokens"] == 18
    _assert_serving(server)


def test_max_tokens_at_the_context_edge(server):
    """The longest request SGLang admits runs to its limit (the context length less 2 tokens) with the
    verifier's budget and the overlap loop's KV over-allocation clamped; one token more is refused."""
    prompt = [3 + (7 * i) % 300 for i in range(CONTEXT_LENGTH - 40)]
    body = {"input_ids": prompt, "sampling_params": {"max_new_tokens": 39, "temperature": 0, "ignore_eos": True}}
    status, answer = _post(server, "/generate", body)
    assert status == 200, answer
    assert len(answer["output_ids"]) == CONTEXT_LENGTH - 2 - len(prompt), answer["meta_info"]
    assert answer["meta_info"]["finish_reason"]["type"] == "length"
    body["sampling_params"]["max_new_tokens"] = 40
    _assert_refused(*_post(server, "/generate", body), "maximum context length")
    _assert_refused(*_post(server, "/generate", {"input_ids": [5] * CONTEXT_LENGTH}), "context length")
    _assert_refused(*_post(server, "/v1/completions", {"model": "default", "prompt": "hi",
                                                       "max_tokens": 10**12}), "maximum context length")
    _assert_serving(server)


def test_empty_and_huge_stop_lists(server):
    params = {"max_new_tokens": 24, "temperature": 0, "ignore_eos": True}
    _, plain = _generate(server, params)
    for stop in ([], None):
        status, answer = _generate(server, {**params, "stop": stop})
        assert status == 200 and answer["output_ids"] == plain["output_ids"], stop
    text = plain["text"]
    target = text[len(text) // 2: len(text) // 2 + 2]
    never = [f"never-{i}" for i in range(2000)]
    _, expected = _generate(server, {**params, "stop": [target]})
    assert expected["meta_info"]["finish_reason"] == {"type": "stop", "matched": target}
    status, answer = _generate(server, {**params, "stop": [*never, target]})
    assert status == 200 and answer["output_ids"] == expected["output_ids"] and answer["text"] == expected["text"]
    status, answer = _generate(server, {**params, "stop": ["q" * 20000]})
    assert status == 200 and answer["output_ids"] == plain["output_ids"]
    # Stop token ids that no token can match: beyond int64 (DFLASH's verifier table), negative, many.
    for stop_token_ids in ([10**23], [-1], list(range(VOCAB_SIZE, VOCAB_SIZE + 5000))):
        status, answer = _generate(server, {**params, "stop_token_ids": stop_token_ids})
        assert status == 200 and answer["output_ids"] == plain["output_ids"]
    _assert_serving(server)


def test_unicode_stop_string_split_across_tokens(server):
    """A character whose UTF-8 bytes come from two tokens (the byte-level tokenizer's), as a stop string:
    the output ends at it, non-streaming and streaming."""
    params = {"max_new_tokens": 16, "temperature": 0, "ignore_eos": True}
    prompt = [305, 197]  # the tiny target answers with a two-byte character made of its 2nd and 3rd tokens
    _, plain = _post(server, "/generate", {"input_ids": prompt, "sampling_params": params})
    text = plain["text"]
    characters = [c for c in text if ord(c) > 127 and c != "\ufffd"]
    assert characters, f"no multi-byte character in {text!r}: pick another prompt"
    stop = characters[0]
    status, answer = _post(server, "/generate", {"input_ids": prompt, "sampling_params": {**params, "stop": stop}})
    assert status == 200 and answer["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert answer["text"] == text[:text.index(stop)]
    completion = {"model": "default", "prompt": prompt, "max_tokens": 16, "temperature": 0, "stop": [stop]}
    _, answer = _post(server, "/v1/completions", completion)
    assert answer["choices"][0]["text"] == text[:text.index(stop)]
    assert answer["choices"][0]["finish_reason"] == "stop"
    streamed = _stream_text(server, {**completion, "stream": True})
    assert streamed == text[:text.index(stop)]
    _assert_serving(server)


def _stream_text(server: ServerProcess, body: dict) -> str:
    request = urllib.request.Request(f"{server.base_url}/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    pieces = []
    with urllib.request.urlopen(request, timeout=120) as response:
        for line in response:
            line = line.decode().strip()
            if line.startswith("data:") and line != "data: [DONE]":
                pieces.extend(choice["text"] for choice in json.loads(line[5:])["choices"])
    return "".join(pieces)


def test_logprob_options_are_served_and_absurd_values_refused(server):
    """DFLASH serves logprobs (serving/logprobs.py); values SGLang's scheduler would die on get a 400."""
    for path, body in [("/v1/completions", {"model": "default", "prompt": "hi", "max_tokens": 4, "logprobs": 5}),
                       ("/v1/chat/completions", {"model": "default", "messages": [{"role": "user", "content": "hi"}],
                                                 "max_tokens": 4, "logprobs": True, "top_logprobs": 20})]:
        status, answer = _post(server, path, body)
        assert status == 200, answer
    for path, body in [("/v1/completions", {"model": "default", "prompt": "hi", "max_tokens": 4, "logprobs": 10**6,
                                            "echo": True}),
                       ("/generate", {"text": "hi", "return_logprob": True, "top_logprobs_num": 10**6}),
                       ("/generate", {"text": "hi", "return_logprob": True, "token_ids_logprob": [10**9]}),
                       ("/generate", {"text": "hi", "return_logprob": True, "logprob_start_len": -100})]:
        status, answer = _post(server, path, body)
        assert status == 400, answer
    _assert_serving(server)


def _stream_and_drop(server: ServerProcess, path: str, body: dict, events: int) -> int:
    """Reads ``events`` server-sent events of a streaming request, then closes the connection."""
    connection = http.client.HTTPConnection(server.host, server.port, timeout=120)
    connection.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    seen = 0
    while seen < events:
        line = response.fp.readline()
        if not line:
            break
        seen += line.startswith(b"data:")
    connection.sock.close()
    return response.status


def test_client_disconnects_mid_stream_under_load(server):
    """Six streams of 200 tokens dropped after 1..6 events (native and OpenAI routes, greedy and sampled),
    while four other requests run: the dropped ones are aborted (their KV freed), the others complete."""
    results: dict[str, object] = {}

    def run(name, function, *args):
        try:
            results[name] = function(*args)
        except Exception as error:  # noqa: BLE001 -- reported by the assertion below
            results[name] = repr(error)

    threads = []
    for i in range(6):
        if i % 2:
            path, body = "/generate", {"text": f"hello {i}", "stream": True, "sampling_params": {
                "max_new_tokens": 200, "temperature": 0.8, "ignore_eos": True}}
        else:
            path, body = "/v1/chat/completions", {"model": "default", "stream": True, "max_tokens": 200,
                                                  "temperature": 0, "messages": [{"role": "user", "content": f"{i}"}]}
        threads.append(threading.Thread(target=run, args=(f"drop{i}", _stream_and_drop, server, path, body, i + 1)))
    for i in range(4):
        params = {"max_new_tokens": 32, "temperature": 0.7 if i % 2 else 0, "ignore_eos": True}
        threads.append(threading.Thread(target=run, args=(f"full{i}", _generate, server, params)))
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(results[f"drop{i}"] == 200 for i in range(6)), {k: v for k, v in results.items() if "drop" in k}
    assert all(results[f"full{i}"][0] == 200 and len(results[f"full{i}"][1]["output_ids"]) == 32 for i in range(4))
    # 6 x 200 tokens would take far longer than the 4 x 32 that were asked for in full: the drops were aborted.
    _wait_idle(server, timeout_s=60)
    assert time.monotonic() - started < 60, "the dropped streams were not aborted"
    _assert_serving(server)


def _wait_idle(server: ServerProcess, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        # /get_load: SGLang 0.5.10's /v1/loads fails under --enable-metrics (its HTTP metrics middleware).
        with urllib.request.urlopen(f"{server.base_url}/get_load", timeout=30) as response:
            loads = json.load(response)
        if not any(load["num_reqs"] or load["num_waiting_reqs"] for load in loads):
            return
        time.sleep(0.5)
    raise AssertionError(f"requests still running after {timeout_s} s:\n{server.log_tail()}")


def test_metrics_export_the_speculative_gauges(server):
    """``--enable-metrics``: SGLang's ``sglang:spec_accept_length`` / ``spec_accept_rate`` gauges, set at each
    decode log line (every 40 decode batches), carry DFLASH's acceptance."""
    for _ in range(20):
        gauges = _spec_gauges(server)
        if gauges.get("sglang:spec_accept_length", 0) > 0:
            break
        _generate(server, {"max_new_tokens": 64, "temperature": 0, "ignore_eos": True})
    assert 1 < gauges["sglang:spec_accept_length"] <= 8, gauges
    assert 0 < gauges["sglang:spec_accept_rate"] <= 1, gauges


def _spec_gauges(server: ServerProcess) -> dict[str, float]:
    with urllib.request.urlopen(f"{server.base_url}/metrics", timeout=30) as response:
        text = response.read().decode()
    gauges = {}
    for line in text.splitlines():
        if line.startswith("sglang:spec_accept_"):
            name, value = line.split("{")[0], line.rsplit(" ", 1)[1]
            gauges[name] = float(value)
    return gauges


def test_kv_pools_return_to_idle(server):
    """Last: after every probe above, SGLang's strict idle check finds no leaked KV slot."""
    _wait_idle(server, timeout_s=60)
    time.sleep(3)  # the scheduler checks its pools when idle (strict mode raises on a leak)
    assert server.healthy(), f"server died after the probes:\n{server.log_tail()}"
    assert "memory leak" not in server.log_text(), server.log_tail()
    _assert_serving(server)


# ------------------------------------------------------------------------------------------------------
# The checks themselves, as the hook applies them to a server without DFLASH (no SGLang needed).
def test_checks_run_on_servers_without_dflash():
    from dflash_sglang.serving.patches.algorithm import patch_tokenizer_manager

    class TokenizerManager:
        def _validate_one_request(self, obj, input_ids):
            self.validated = input_ids

    patch_tokenizer_manager(types.SimpleNamespace(TokenizerManager=TokenizerManager))
    manager = TokenizerManager()
    manager.server_args = types.SimpleNamespace(speculative_algorithm=None)
    manager.model_config = types.SimpleNamespace(vocab_size=VOCAB_SIZE)

    def request(**fields):
        values = dict(sampling_params={}, input_embeds=None, return_logprob=True, logprob_start_len=-1,
                      top_logprobs_num=2, token_ids_logprob=None)
        return types.SimpleNamespace(**{**values, **fields})

    manager._validate_one_request(request(), [1, 2, VOCAB_SIZE - 1])  # logprobs are fine without DFLASH
    assert manager.validated == [1, 2, VOCAB_SIZE - 1]
    for obj, input_ids, fragment in [
            (request(), [1, 99999999], "token id 99999999 at prompt position 1"),
            (request(), [-3], "token id -3 at prompt position 0"),
            (request(sampling_params={"temperature": math.nan}), [1], "temperature must be a finite number"),
            (request(sampling_params={"repetition_penalty": 0}), [1], "repetition_penalty must be from 0.01"),
            (request(sampling_params={"logit_bias": {"5": 1e39}}), [1], "logit_bias[5] must be a number"),
            (request(top_logprobs_num=VOCAB_SIZE + 1), [1], "top_logprobs_num"),
            (request(token_ids_logprob=[VOCAB_SIZE]), [1], "token_ids_logprob entry"),
            (request(logprob_start_len=-2), [1], "logprob_start_len")]:
        with pytest.raises(ValueError, match=None) as error:
            manager._validate_one_request(obj, input_ids)
        assert fragment in str(error.value)
    embeds = request(input_embeds=[[0.0] * 4])
    manager._validate_one_request(embeds, [10**9])  # embeddings in, no token ids to check


def test_sampling_values_are_normalized_in_place():
    params = {"top_k": 2**40, "max_new_tokens": 8.0, "n": 2.0}
    request_safety.check_sampling_values(params)
    assert params == {"top_k": request_safety.TOP_K_ALL, "max_new_tokens": 8, "n": 2}
    assert type(params["max_new_tokens"]) is int
    samples = [{"n": None}, {"n": 4.0}]
    request_safety.check_parallel_samples(samples)
    assert samples == [{"n": 1}, {"n": 4}]
    with pytest.raises(ValueError, match="from 1 to 1024"):
        request_safety.check_parallel_samples({"n": request_safety.MAX_PARALLEL_SAMPLES + 1})
    with pytest.raises(ValueError, match="must be an integer"):
        request_safety.check_sampling_values({"top_k": True})
