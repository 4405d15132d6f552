# SPDX-License-Identifier: Apache-2.0
"""Logprobs end to end on the CPU: a DFLASH server's logprobs (output and prompt) against the plain SGLang
server started from the same tiny float32 checkpoint, in both DFLASH loops (overlap, the default, and the
host-committed loop of ``--disable-overlap-schedule``), with a drafter that agrees with the target (several
tokens per block carry logprobs) and a random one, on /generate, /v1/completions and /v1/chat/completions,
streaming and not, alone and concurrently with requests that ask for none.

Greedy tokens must be identical; logprobs equal within ``TOL`` (fp32 on the CPU: the plain server's decode
attention and DFLASH's verify (extend) attention add in different orders); top-logprob token ids identical
except where two candidates tie within ``TOL``.
"""

from __future__ import annotations

import concurrent.futures
import json
import urllib.request

import pytest

from openai_client import client as _client
from tiny_servers import cached_answer, cached_generate

from dflash_sglang.deploy.launch import ServerProcess

pytestmark = pytest.mark.slow

TOL = 1e-4
MAX_TOKENS = 20
PROMPTS = ["the quick brown fox", "Speculative decoding drafts a block of tokens and", "hello"]
TOKEN_IDS = [3, 10, 42]  # token_ids_logprob: the same few ids at every position


# ---------------------------------------------------------------------------------------------------------
def _assert_close(a: float | None, b: float | None, what: str) -> None:
    if a is None or b is None:
        assert a is None and b is None, what
        return
    assert abs(a - b) <= TOL, f"{what}: {a} vs {b}"


def _assert_same_top(spec: list, base: list, what: str) -> None:
    """Two top-k lists of (logprob, token id): equal values; ids equal except between candidates that tie."""
    assert len(spec) == len(base), what
    for rank, ((sv, sid), (bv, bid)) in enumerate(zip(spec, base)):
        _assert_close(sv, bv, f"{what} rank {rank}")
        if sid != bid:
            tied = [i for v, i in base if abs(v - bv) <= TOL]
            assert sid in tied, f"{what} rank {rank}: id {sid} vs {bid}, not a tie"


def _assert_same_generate_meta(spec: dict, base: dict, what: str) -> None:
    for key in ("output_token_logprobs", "input_token_logprobs"):
        s, b = spec.get(key) or [], base.get(key) or []
        assert [x[1] for x in s] == [x[1] for x in b], f"{what} {key} ids"
        for i, (x, y) in enumerate(zip(s, b)):
            _assert_close(x[0], y[0], f"{what} {key}[{i}]")
    for key in ("output_top_logprobs", "input_top_logprobs", "output_token_ids_logprobs",
                "input_token_ids_logprobs"):
        s, b = spec.get(key) or [], base.get(key) or []
        assert len(s) == len(b), f"{what} {key} length"
        for i, (x, y) in enumerate(zip(s, b)):
            _assert_same_top([tuple(e[:2]) for e in x or []], [tuple(e[:2]) for e in y or []], f"{what} {key}[{i}]")


def _generate_body(prompt: str, top: int = 5, **extra) -> dict:
    return {"text": prompt, "sampling_params": {"max_new_tokens": MAX_TOKENS, "temperature": 0},
            "return_logprob": True, "top_logprobs_num": top, "token_ids_logprob": TOKEN_IDS, **extra}


def _generate_stream(server: ServerProcess, body: dict) -> dict:
    """The last chunk of a streamed /generate (SGLang streams cumulative logprob lists by default)."""
    request = urllib.request.Request(f"{server.base_url}/generate", data=json.dumps({**body, "stream": True}).encode(),
                                     headers={"Content-Type": "application/json"})
    last = None
    with urllib.request.urlopen(request, timeout=600) as response:
        for line in response:
            line = line.decode().strip()
            if line.startswith("data:") and line[5:].strip() != "[DONE]":
                last = json.loads(line[5:])
    return last





def _openai_logprobs(server: ServerProcess, kind: str, prompt: str, stream: bool) -> tuple[str, list]:
    """(text, [(token, logprob, [(top token, top logprob), ...]), ...]) of a greedy chat or completion."""
    client, entries, text = _client(server), [], ""
    if kind == "chat":
        chunks = client.chat.completions.create(
            model="default", messages=[{"role": "user", "content": prompt}], max_tokens=MAX_TOKENS, temperature=0,
            logprobs=True, top_logprobs=3, stream=stream)
        for choice in ([c.choices[0] for c in chunks if c.choices] if stream else [chunks.choices[0]]):
            text += (choice.delta.content if stream else choice.message.content) or ""
            for entry in (choice.logprobs.content or []) if choice.logprobs else []:
                entries.append((entry.token, entry.logprob, [(t.token, t.logprob) for t in entry.top_logprobs]))
        return text, entries
    chunks = client.completions.create(model="default", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                       logprobs=3, stream=stream)
    for choice in ([c.choices[0] for c in chunks if c.choices] if stream else [chunks.choices[0]]):
        text += choice.text or ""
        if choice.logprobs:
            for token, logprob, top in zip(choice.logprobs.tokens, choice.logprobs.token_logprobs,
                                           choice.logprobs.top_logprobs):
                entries.append((token, logprob, sorted(top.items(), key=lambda kv: -kv[1])))
    return text, entries


def _assert_same_openai(spec: tuple[str, list], base: tuple[str, list], what: str) -> None:
    assert spec[0] == base[0], what
    assert [e[0] for e in spec[1]] == [e[0] for e in base[1]], what
    assert len(spec[1]) > 0, what
    for i, (s, b) in enumerate(zip(spec[1], base[1])):
        _assert_close(s[1], b[1], f"{what}[{i}]")
        _assert_same_top([(v, t) for t, v in s[2]], [(v, t) for t, v in b[2]], f"{what}[{i}] top")


# ---------------------------------------------------------------------------------------------------------
def test_generate_logprobs_match_the_plain_server(plain_server, dflash_server):
    for prompt in PROMPTS[:2]:
        body = _generate_body(prompt, logprob_start_len=0)  # prompt logprobs too
        spec, base = dflash_server.generate(body), cached_generate(plain_server, body)
        assert spec["output_ids"] == base["output_ids"], prompt
        assert len(spec["meta_info"]["output_token_logprobs"]) == len(spec["output_ids"])
        assert len(spec["meta_info"]["input_token_logprobs"]) == spec["meta_info"]["prompt_tokens"]
        _assert_same_generate_meta(spec["meta_info"], base["meta_info"], prompt)
    if dflash_server.drafter == "drafter-agree":
        assert spec["meta_info"]["spec_accept_length"] > 2, "several tokens per block carry logprobs"


def test_streamed_generate_logprobs_match_the_plain_server(plain_server, dflash_server):
    body = _generate_body(PROMPTS[2], top=2)
    spec, base = _generate_stream(dflash_server, body), cached_generate(plain_server, body)
    assert spec["output_ids"] == base["output_ids"]
    _assert_same_generate_meta(spec["meta_info"], base["meta_info"], "stream")


@pytest.mark.parametrize("kind", ["chat", "completion"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_openai_logprobs_match_the_plain_server(plain_server, dflash_server, kind, stream):
    prompt = PROMPTS[1]
    expected = cached_answer(plain_server, ["logprobs", kind, prompt],
                             lambda: _openai_logprobs(plain_server, kind, prompt, False))
    _assert_same_openai(_openai_logprobs(dflash_server, kind, prompt, stream), expected, f"{kind} stream={stream}")


def _mixed_bodies() -> list[dict]:
    """Requests with and without logprobs, some with token_ids_logprob: they share prefill and decode batches
    (upstream SGLang's scheduler died on such a mix; ``patches.algorithm.patch_token_ids_logprobs``)."""
    return [_generate_body(p, top=k, token_ids_logprob=ids) if k is not None else
            {"text": p, "sampling_params": {"max_new_tokens": MAX_TOKENS, "temperature": 0}}
            for p in PROMPTS for k, ids in ((None, None), (4, None), (2, TOKEN_IDS))]


def test_concurrent_requests_with_and_without_logprobs(plain_server, dflash_server):
    bodies = _mixed_bodies()
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        spec = list(pool.map(dflash_server.generate, bodies))
    for body, result in zip(bodies, spec):
        base = cached_generate(plain_server, body)
        assert result["output_ids"] == base["output_ids"], body
        if body.get("return_logprob"):
            _assert_same_generate_meta(result["meta_info"], base["meta_info"], body["text"])
        else:
            assert not result["meta_info"].get("output_token_logprobs")


def test_plain_server_survives_a_mix_of_token_ids_logprob_requests(plain_server):
    """The plain server, sent the same mix at once, answers every request as it answers them one at a time, and
    keeps serving."""
    bodies = _mixed_bodies()
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(plain_server.generate, bodies))
    for body, result in zip(bodies, together):
        alone = cached_generate(plain_server, body)
        assert result["output_ids"] == alone["output_ids"], body
        if body.get("token_ids_logprob"):
            assert len(result["meta_info"]["output_token_ids_logprobs"]) == len(result["output_ids"])
    assert plain_server.healthy()


def test_sampled_request_gets_a_logprob_per_token(dflash_server):
    """Sampling (temperature 0.7): one logprob per emitted token, for that token, from the temperature-scaled
    distribution (SGLang's convention). The values themselves are not compared: the plain server samples
    other tokens."""
    body = _generate_body(PROMPTS[0], top=3, token_ids_logprob=None)
    body["sampling_params"] = {"max_new_tokens": MAX_TOKENS, "temperature": 0.7, "top_p": 0.9}
    result = dflash_server.generate(body)
    entries = result["meta_info"]["output_token_logprobs"]
    assert [e[1] for e in entries] == result["output_ids"]
    assert all(e[0] <= 0 for e in entries)
    tops = result["meta_info"]["output_top_logprobs"]
    assert len(tops) == len(entries) and all(len(t) == 3 and t[0][0] >= e[0] for t, e in zip(tops, entries))
