# SPDX-License-Identifier: Apache-2.0
"""Penalties and logit processing end to end on the CPU: frequency / presence / repetition penalties,
min_tokens (min_new_tokens), logit_bias and min_p on a DFLASH server against the plain SGLang server started
from the same tiny float32 checkpoint, in both DFLASH loops (overlap, the default, and the host-committed loop
of ``--disable-overlap-schedule``), with a drafter that agrees with the target (the penalties act inside
accepted blocks) and a random one; /generate, chat and completions, streaming and not, alone and 16 at once;
logprobs of the processed rows; and the sampling distribution under a penalty and min_p.

The plain server runs with ``--disable-overlap-schedule``: SGLang 0.5.10's overlap scheduler counts a decode
step's penalties one token late (``ScheduleBatch.prepare_for_decode`` feeds its penalizers the previous step's
input token, the prompt's last token at the first step), so its frequency / presence / repetition outputs
differ from its own non-overlap loop's; DFLASH gives the non-overlap loop's, which counts every output token
before the one being chosen (both loops agree on the other options).
"""

from __future__ import annotations

import collections
import concurrent.futures

import pytest
from scipy import stats

from openai_client import client as _client
from tiny_servers import cached_answer, cached_generate, dflash_args, tiny_server

from dflash_sglang.deploy.launch import ServerProcess

pytestmark = pytest.mark.slow

MAX_TOKENS = 24
PROMPTS = ["the quick brown fox", "Speculative decoding drafts a block of tokens and", "hello"]
EOS = 402  # the tiny tokenizer's <|im_end|>
# Each changes the tiny target's greedy output for PROMPTS[0] (the repeat-prone target repeats tokens, so the
# penalties bite inside blocks); min_new_tokens is seen through a logit_bias that makes EOS the favourite.
OPTIONS = {
    "frequency_penalty": {"frequency_penalty": 0.8},
    "presence_penalty": {"presence_penalty": 2.0},
    "repetition_penalty": {"repetition_penalty": 1.3},
    "min_new_tokens": {"min_new_tokens": 12, "logit_bias": {str(EOS): 30.0}},
    "logit_bias": {"logit_bias": {"227": -8.0, "132": 3.0}},
    "min_p": {"min_p": 0.3},
    "combined": {"frequency_penalty": 0.3, "min_new_tokens": 5, "logit_bias": {"227": -2.0}, "min_p": 0.2},
    # A grammar too: its mask and the penalty act on the same verify rows (block_grammar + block_logit_processing).
    "with_grammar": {"frequency_penalty": 0.8, "regex": r"(cat|dog)( (cat|dog)){0,5} [0-9]{2}\."},
}
# NOTE: no request combines two of frequency / presence / repetition: SGLang's loop without overlap applies its
# penalizers in the iteration order of a set of classes, which varies between server processes.


def _body(prompt: str, options: dict, max_tokens: int = MAX_TOKENS) -> dict:
    return {"text": prompt, "sampling_params": {"max_new_tokens": max_tokens, "temperature": 0, **options}}


# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("option", list(OPTIONS))
def test_each_option_greedy_matches_the_plain_server(plain_server_no_overlap, dflash_server, option):
    body = _body(PROMPTS[0], OPTIONS[option])
    spec, base = dflash_server.generate(body), cached_generate(plain_server_no_overlap, body)
    assert spec["output_ids"] == base["output_ids"], option
    if option == "min_new_tokens":
        assert base["output_ids"][-1] == EOS and len(base["output_ids"]) == 13, "EOS right after min_new_tokens"
    penalized = option in ("frequency_penalty", "repetition_penalty", "min_new_tokens")
    if penalized and dflash_server.drafter == "drafter-agree":
        assert spec["meta_info"]["spec_accept_length"] > 1.5, "penalized tokens were accepted inside blocks"


def test_logprobs_are_those_of_the_processed_logits(plain_server_no_overlap, dflash_server):
    """With a penalty and a logit bias, each token's logprob and top alternatives come from the processed row, as
    SGLang's sampler returns them (fp32 on the CPU: equal within 1e-4, as in test_logprobs_e2e)."""
    body = _body(PROMPTS[0], {"frequency_penalty": 0.8, "logit_bias": {"132": 3.0}})
    body.update(return_logprob=True, top_logprobs_num=3)
    spec, base = dflash_server.generate(body), cached_generate(plain_server_no_overlap, body)
    assert spec["output_ids"] == base["output_ids"]
    spec_meta, base_meta = spec["meta_info"], base["meta_info"]
    assert len(spec_meta["output_token_logprobs"]) == len(spec["output_ids"])
    pairs = [(a[0], b[0]) for a, b in zip(spec_meta["output_token_logprobs"], base_meta["output_token_logprobs"])]
    pairs += [(a[0], b[0]) for spec_row, base_row in zip(spec_meta["output_top_logprobs"],
                                                         base_meta["output_top_logprobs"])
              for a, b in zip(spec_row, base_row)]
    assert all(abs(a - b) <= 1e-4 for a, b in pairs), pairs


def _openai_text(server: ServerProcess, kind: str, prompt: str, stream: bool) -> str:
    """A greedy chat or completion with a frequency penalty, a logit bias and min_tokens through the openai client."""
    kwargs = dict(model="default", max_tokens=MAX_TOKENS, temperature=0, frequency_penalty=0.6,
                  logit_bias={"227": -3.0}, extra_body={"min_tokens": 4}, stream=stream)
    if kind == "chat":
        reply = _client(server).chat.completions.create(messages=[{"role": "user", "content": prompt}], **kwargs)
        if stream:
            return "".join(chunk.choices[0].delta.content or "" for chunk in reply if chunk.choices)
        return reply.choices[0].message.content
    reply = _client(server).completions.create(prompt=prompt, **kwargs)
    if stream:
        return "".join(chunk.choices[0].text or "" for chunk in reply if chunk.choices)
    return reply.choices[0].text


@pytest.mark.parametrize("kind", ["chat", "completion"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_openai_chat_and_completion_match_the_plain_server(plain_server_no_overlap, dflash_server, kind, stream):
    prompt = PROMPTS[1]
    expected = cached_answer(plain_server_no_overlap, ["text", kind, prompt],
                             lambda: _openai_text(plain_server_no_overlap, kind, prompt, False))
    assert expected
    assert _openai_text(dflash_server, kind, prompt, stream) == expected


def test_sixteen_concurrent_requests_with_mixed_options(plain_server_no_overlap, dflash_server):
    """Requests with different options (and none) in the same batches, of different lengths: each request's
    rows are processed with its own options and counts."""
    names = [None, *OPTIONS]
    bodies = [_body(PROMPTS[i % len(PROMPTS)], OPTIONS[names[i % len(names)]] if names[i % len(names)] else {},
                    max_tokens=8 + 2 * i) for i in range(16)]
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        spec = list(pool.map(dflash_server.generate, bodies))
    for body, result in zip(bodies, spec):
        expected = cached_generate(plain_server_no_overlap, body)
        assert result["output_ids"] == expected["output_ids"], body


def test_retracted_requests_keep_their_penalties(plain_server_no_overlap, tiny_checkpoints, tmp_path_factory):
    """SGLang's retraction test mode (every 3rd step retracts running requests, prefilled again later): each
    request's output is the plain server's without retraction (SGLang itself restarts its penalizers then)."""
    prompts = PROMPTS + [" ".join([PROMPTS[1]] * 6)]  # the last one prefilled in 32-token chunks
    bodies = [{"text": prompts, "sampling_params": {"max_new_tokens": 40, "temperature": 0, **OPTIONS[name]}}
              for name in ("frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens")]
    extra = dflash_args(tiny_checkpoints, "drafter-agree")
    with tiny_server(tiny_checkpoints, tmp_path_factory, "dflash-retracting", extra,
                     {"SGLANG_TEST_RETRACT": "1", "SGLANG_TEST_RETRACT_INTERVAL": "3"}) as server:
        spec = [server.generate(body) for body in bodies]
        retracted = sum(int(line.split("#retracted_reqs: ")[1].split(",")[0])
                        for line in server.log_text().splitlines() if "#retracted_reqs: " in line)
    assert retracted > 0, "SGLang's test mode retracted no request"
    for body, results in zip(bodies, spec):
        expected = cached_generate(plain_server_no_overlap, body)
        assert [r["output_ids"] for r in results] == [r["output_ids"] for r in expected], body["sampling_params"]


def _sampled_triples(server: ServerProcess, count: int) -> collections.Counter:
    """The first three tokens of ``count`` independent sampled requests with a frequency penalty and min_p."""
    result = server.generate({"text": [PROMPTS[1]] * count, "sampling_params": {
        "max_new_tokens": 3, "temperature": 1.0, "top_k": 3, "frequency_penalty": 1.5, "min_p": 0.1,
        "ignore_eos": True}})
    return collections.Counter(tuple(r["output_ids"][:3]) for r in result)


def test_sampling_with_penalties_follows_the_target_distribution(plain_server_no_overlap, dflash_server):
    """Tokens 2 and 3 come from one speculative step (the agreeing drafter's drafts, rejection sampling), token 3
    penalized for token 2 inside the block: the joint law of the three must match the plain server's sampling
    (a two-sample chi-square test over the cells)."""
    if dflash_server.drafter != "drafter-agree":
        pytest.skip("the agreeing drafter puts the penalized tokens inside accepted blocks")
    count = 400
    spec = _sampled_triples(dflash_server, count)
    base = cached_answer(plain_server_no_overlap, ["triples", count],
                         lambda: _sampled_triples(plain_server_no_overlap, count))
    cells = sorted(set(spec) | set(base), key=lambda cell: -(spec[cell] + base[cell]))
    frequent = [cell for cell in cells if spec[cell] + base[cell] >= 10]
    table = [[spec[cell] for cell in frequent] + [sum(spec[c] for c in cells if c not in frequent)],
             [base[cell] for cell in frequent] + [sum(base[c] for c in cells if c not in frequent)]]
    if table[0][-1] + table[1][-1] == 0:
        table = [row[:-1] for row in table]
    assert len(table[0]) >= 4, f"too few outcomes to test: {table}"
    _, p_value, _, _ = stats.chi2_contingency(table)
    assert p_value > 1e-3, f"DFLASH's sampled triples differ from the target's: p={p_value:.2g}, {table}"
