# SPDX-License-Identifier: Apache-2.0
"""The Gemma 4 golden check: a server's full log-probability vectors for the committed tiny checkpoints
(``tests/fixtures/gemma4``, made by ``scripts/make_gemma4_golden.py``) against transformers' fp32 reference
-- a 24-token prefill, 7 greedy decode steps, and the same decode again over a radix-cached prompt. Shared by
the CPU golden tests (``tests/test_gemma4.py``) and the GPU ones (``tests/test_gemma4_gpu.py``)."""

from __future__ import annotations

import json
import os
import shutil
import urllib.request
from dataclasses import dataclass

import torch
from safetensors.torch import load_file

from dflash_sglang.testing.tiny_gemma4 import write_gemma4_tokenizer

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                        "tests", "fixtures", "gemma4")
HEAD_LOGPROB = -8.0  # compare where the reference gives a token more than e^-8 of the mass


@dataclass(frozen=True)
class GoldenErrors:
    """Max |log-prob - reference| over the compared tokens of each phase."""

    prefill: float
    decode: float
    cached_decode: float

    def worst(self) -> float:
        return max(self.prefill, self.decode, self.cached_decode)


def write_golden_checkpoint(variant: str, folder: str) -> str:
    """The committed ``variant`` ("dense" or "moe") fixture plus the tiny Gemma tokenizer, servable at ``folder``."""
    shutil.copytree(os.path.join(FIXTURES, variant), folder)
    write_gemma4_tokenizer(folder)
    return folder


def _generate(base_url: str, body: dict) -> dict:
    request = urllib.request.Request(f"{base_url}/generate", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.load(response)


def _rows(entries: list, vocab_size: int) -> torch.Tensor:
    """SGLang's per-position [(logprob, token id, text), ...] lists -> [positions, vocab] log-probs."""
    rows = torch.full((len(entries), vocab_size), float("nan"))
    for i, entry in enumerate(entries):
        for logprob, token_id, *_ in entry:
            rows[i, token_id] = logprob
    return rows


def _max_error(served: torch.Tensor, reference: torch.Tensor) -> float:
    head = reference > HEAD_LOGPROB
    assert not torch.isnan(served[head]).any(), "SGLang returned no log-prob for some compared tokens"
    return float((served[head] - reference[head]).abs().max())


def golden_errors(base_url: str, variant: str) -> GoldenErrors:
    """Serves the fixture's prompt on the server at ``base_url`` (which serves ``variant``), asserts the greedy
    tokens equal the reference's, and returns the log-prob errors."""
    ref = load_file(os.path.join(FIXTURES, f"reference-{variant}.safetensors"))
    prompt, vocab_size = ref["prompt_ids"].tolist(), ref["prefill_logprobs"].shape[1]
    expected_ids = ref["output_ids"].tolist()
    body = {"input_ids": prompt, "return_logprob": True, "logprob_start_len": 0,
            "token_ids_logprob": list(range(vocab_size)),
            "sampling_params": {"temperature": 0, "max_new_tokens": len(expected_ids)}}
    result = _generate(base_url, body)
    meta = result["meta_info"]
    assert result["output_ids"] == expected_ids, (result["output_ids"], expected_ids)
    # input row i is the distribution of prompt token i given tokens < i (row 0 has none)
    prefill = _max_error(_rows(meta["input_token_ids_logprobs"][1:], vocab_size), ref["prefill_logprobs"][:-1])
    decode = _max_error(_rows(meta["output_token_ids_logprobs"], vocab_size), ref["decode_logprobs"])
    # again without input log-probs: the prompt's KV now comes from the radix cache
    cached = _generate(base_url, {**body, "logprob_start_len": -1})
    assert cached["meta_info"]["cached_tokens"] > 0 and cached["output_ids"] == expected_ids
    cached_decode = _max_error(_rows(cached["meta_info"]["output_token_ids_logprobs"], vocab_size),
                               ref["decode_logprobs"])
    return GoldenErrors(prefill, decode, cached_decode)
