# SPDX-License-Identifier: Apache-2.0
"""Structured output end to end on the CPU: a DFLASH server's constrained answers against the plain SGLang
server's (xgrammar, SGLang's default grammar backend), both started from the same tiny float32 checkpoint,
in both DFLASH loops (overlap, the default, and the host-committed loop of ``--disable-overlap-schedule``),
with a drafter that agrees with the target (the grammar acts inside accepted blocks) and a random one.

Every kind of grammar a client reaches (and their output logprobs): response_format json_schema (strict and
not), json_object and structural_tag on chat, regex and ebnf on completions, tool calling with tool_choice
"required" and a named function; streaming and not, alone and concurrently with an unconstrained request. Greedy
answers must be identical; the JSON answers parse and validate against their schema; a sampled json_schema
answer validates. The plain server's answers also check the CPU patch (``patches/cpu.py``: upstream dies on the
first grammar on a CPU). The tiny model's text is noise, so the grammars are small and bounded (enums, short regexes);
``--constrained-json-disable-any-whitespace`` keeps the repeat-prone model from filling JSON with blanks.
"""

from __future__ import annotations

import concurrent.futures
import json
import re

import jsonschema
import openai
import pytest

from openai_client import client as _client
from tiny_servers import GRAMMAR_ARGS, assert_no_leak, cached_answer, dflash_args, tiny_server

pytestmark = pytest.mark.slow

MAX_TOKENS = 64
PROMPT = "Speculative decoding drafts a block of tokens and"
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["color", "size", "ok"],
          "properties": {"color": {"enum": ["red", "green", "blue"]}, "size": {"enum": ["S", "M", "L"]},
                         "ok": {"type": "boolean"}}}
REGEX = r"(cat|dog)( (cat|dog)){0,5} [0-9]{2}\."
EBNF = 'root ::= answer ", " answer ", " answer\nanswer ::= "yes" | "no" | "maybe"'
STRUCTURAL_TAG = {"type": "structural_tag", "format": {
    "type": "tag", "begin": "<answer>", "end": "</answer>",
    "content": {"type": "json_schema", "json_schema": {"enum": ["yes", "no", "maybe"]}}}}
TOOLS = [{"type": "function", "function": {"name": name, "parameters": {
    "type": "object", "required": [key], "properties": {key: {"enum": values}}}}}
    for name, key, values in (("set_color", "color", ["red", "green"]), ("set_size", "size", ["S", "M", "L"]))]


def _json_schema(strict: bool) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": strict}}


# name -> (API, request options): every grammar kind, each answered greedily.
CASES = {
    "json_schema_strict": ("chat", {"response_format": _json_schema(True)}),
    "json_schema": ("chat", {"response_format": _json_schema(False)}),
    "json_object": ("chat", {"response_format": {"type": "json_object"}}),
    "structural_tag": ("chat", {"response_format": STRUCTURAL_TAG}),
    "tool_required": ("chat", {"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False}),
    "tool_named": ("chat", {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "set_size"}},
                            "parallel_tool_calls": False}),
    "regex": ("completion", {"extra_body": {"regex": REGEX}}),
    "ebnf": ("completion", {"extra_body": {"ebnf": EBNF}}),
    "unconstrained": ("completion", {}),
}


def _ask(server, case: str, stream: bool = False, temperature: float = 0.0) -> tuple[str, str]:
    """(text, finish reason) of one request of ``CASES[case]``."""
    api, options = CASES[case]
    client = _client(server)
    if api == "chat":
        response = client.chat.completions.create(model="default", messages=[{"role": "user", "content": PROMPT}],
                                                  max_tokens=MAX_TOKENS, temperature=temperature, stream=stream,
                                                  **options)
    else:
        response = client.completions.create(model="default", prompt=PROMPT, max_tokens=MAX_TOKENS,
                                             temperature=temperature, stream=stream, **options)
    if not stream:
        choice = response.choices[0]
        return (choice.message.content if api == "chat" else choice.text), choice.finish_reason
    text, finish = "", None
    for chunk in response:
        for choice in chunk.choices:
            text += (choice.delta.content if api == "chat" else choice.text) or ""
            finish = choice.finish_reason or finish
    return text, finish


_BASELINE: dict[tuple, tuple[str, str]] = {}


def _base(plain_server, case: str, stream: bool = False) -> tuple[str, str]:
    """The plain server's answer, asked once for every DFLASH server it is compared with."""
    return cached_answer(plain_server, ("grammar", case, stream), lambda: _ask(plain_server, case, stream))


def _assert_valid(case: str, text: str) -> None:
    """The answer is what the grammar allows (every case here ends within MAX_TOKENS)."""
    if case.startswith("json_schema"):
        jsonschema.validate(json.loads(text), SCHEMA)
    elif case.startswith("tool"):
        calls = json.loads(text)
        assert len(calls) == 1 and calls[0]["name"] in ("set_color", "set_size"), text
        assert case != "tool_named" or calls[0]["name"] == "set_size", text
        jsonschema.validate(calls[0]["parameters"], next(
            tool["function"]["parameters"] for tool in TOOLS if tool["function"]["name"] == calls[0]["name"]))
    elif case == "structural_tag":
        assert re.fullmatch(r'<answer>"(yes|no|maybe)"</answer>', text), text
    elif case == "regex":
        assert re.fullmatch(REGEX, text), text
    elif case == "ebnf":
        assert re.fullmatch(r"(yes|no|maybe), (yes|no|maybe), (yes|no|maybe)", text), text


# ---------------------------------------------------------------------------------------------------------
def test_plain_cpu_server_serves_grammars_and_keeps_serving(plain_server):
    for case in ("json_schema_strict", "regex"):
        text, finish = _base(plain_server, case)
        assert finish == "stop", (case, text)
        _assert_valid(case, text)
    assert _base(plain_server, "unconstrained")[0], "the plain server answers after its grammar requests"
    assert plain_server.healthy(), plain_server.log_tail()


@pytest.mark.parametrize("case", [case for case in CASES if case != "unconstrained"])
def test_greedy_identical_to_plain_server(plain_server, dflash_server, case):
    text, finish = _ask(dflash_server, case)
    assert (text, finish) == _base(plain_server, case), case
    if case != "json_object":  # the tiny model's free-form JSON runs past MAX_TOKENS
        assert finish == "stop", (case, text)
        _assert_valid(case, text)


@pytest.mark.parametrize("case", ["json_schema_strict", "regex"])
def test_streaming_identical_to_plain_server(plain_server, dflash_server, case):
    assert _ask(dflash_server, case, stream=True) == _base(plain_server, case, stream=True)


def test_concurrent_with_an_unconstrained_request(plain_server, dflash_server):
    cases = ["json_schema_strict", "regex", "ebnf", "unconstrained", "tool_named"]
    with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
        answers = list(pool.map(lambda case: _ask(dflash_server, case), cases))
    assert answers == [_base(plain_server, case) for case in cases]


def test_sampled_answers_follow_the_grammar(dflash_server):
    for case in ("json_schema_strict", "regex"):
        for _ in range(2):
            text, finish = _ask(dflash_server, case, temperature=1.0)
            assert finish == "stop", (case, text)
            _assert_valid(case, text)


def test_logprobs_read_from_the_masked_rows(plain_server, dflash_server):
    """Output logprobs of a constrained request are the plain server's (SGLang reads them from the masked logits)."""
    body = {"text": PROMPT, "return_logprob": True,
            "sampling_params": {"max_new_tokens": MAX_TOKENS, "temperature": 0, "json_schema": json.dumps(SCHEMA)}}
    result, base = dflash_server.generate(body), plain_server.generate(body)
    spec, plain = result["meta_info"]["output_token_logprobs"], base["meta_info"]["output_token_logprobs"]
    assert [entry[1] for entry in spec] == [entry[1] for entry in plain]
    assert all(abs(a[0] - b[0]) <= 1e-4 for a, b in zip(spec, plain)), (spec, plain)


def test_drafts_accepted_inside_grammars_and_no_leak(plain_server, dflash_server):
    """Native /generate with a regex: the same tokens as the plain server; with the agreeing drafter the
    grammar's rows accept several drafts per step. Then the pools return to idle."""
    body = {"text": PROMPT, "sampling_params": {"max_new_tokens": MAX_TOKENS, "temperature": 0,
                                                "regex": "(cat|dog)( (cat|dog)){0,30}"}}
    result, base = dflash_server.generate(body), plain_server.generate(body)
    assert result["output_ids"] == base["output_ids"]
    if dflash_server.drafter == "drafter-agree":
        assert result["meta_info"]["spec_accept_length"] > 2, result["meta_info"]
    assert_no_leak(dflash_server)


def test_llguidance_backend(tiny_checkpoints, tmp_path_factory):
    """The same greedy answers with ``--grammar-backend llguidance`` (its grammars roll back too; it compiles no
    structural tags of the current format), the plain server first, then DFLASH's overlap loop with the
    agreeing drafter (one server at a time)."""
    cases = ["json_schema_strict", "regex", "ebnf"]
    args = [*GRAMMAR_ARGS, "--grammar-backend", "llguidance"]
    with tiny_server(tiny_checkpoints, tmp_path_factory, "baseline-llguidance", args) as server:
        expected = [_ask(server, case) for case in cases]
    args += dflash_args(tiny_checkpoints, "drafter-agree")
    with tiny_server(tiny_checkpoints, tmp_path_factory, "dflash-llguidance", args) as server:
        assert [_ask(server, case) for case in cases] == expected
        assert_no_leak(server)
    for case, (text, finish) in zip(cases, expected):
        assert finish == "stop", (case, text)
        _assert_valid(case, text)



def test_grammar_backend_without_rollback_is_refused(tiny_checkpoints, tmp_path_factory):
    """outlines' grammars cannot roll back over rejected drafts: a DFLASH server answers its grammar requests
    with HTTP 400 naming the backend, and keeps serving."""
    args = ["--grammar-backend", "outlines", *dflash_args(tiny_checkpoints, "drafter")]
    with tiny_server(tiny_checkpoints, tmp_path_factory, "dflash-outlines", args) as server:
        with pytest.raises(openai.BadRequestError, match="--grammar-backend outlines"):
            _ask(server, "regex")
        assert _ask(server, "unconstrained")[0]
