# SPDX-License-Identifier: Apache-2.0
"""Request checks that keep one request from bringing an SGLang 0.5.10 server down (HTTP 400 instead),
applied by the package's hook to every server, DFLASH or not (``patches.algorithm``).

SGLang validates a request's length and most sampling parameters before the scheduler sees it, but not:

* its prompt token ids: an id outside the vocabulary (``"prompt": [1, 2, 99999999]`` on /v1/completions,
  ``input_ids`` on /generate, or -1) reaches the embedding, whose IndexError kills the scheduler process
  and with it the server;
* values its range checks let through: a NaN temperature (``temperature < 0`` is False for NaN), a
  repetition penalty of 0 or a logit bias of 1e39 make the sampler's probabilities NaN (RuntimeError);
  a ``top_k`` beyond int32 overflows the batch's tensor; a fractional ``max_new_tokens`` reaches a slice
  (TypeError); a ``top_logprobs_num`` above the vocabulary size, a ``token_ids_logprob`` id outside it or a
  ``logprob_start_len`` below -1 fail in the scheduler's logprob path;
* ``n``: SGLang copies a request n times without a bound (10**9 copies of the prompt list in the HTTP process).

Every function raises ValueError, which SGLang's HTTP layer answers with 400 and the message. Where a value
has an exact meaning SGLang cannot hold (``top_k`` 10**20 = the whole vocabulary; ``8.0`` tokens) it is
normalized in place instead of refused.
"""

from __future__ import annotations

import math
from numbers import Integral
from typing import Any, Sequence

TOP_K_ALL = 1 << 30  # sglang.srt.sampling.sampling_params.TOP_K_ALL: the whole vocabulary (what -1 becomes)
# A logit plus a bias up to this, divided by the smallest sampling temperature (1e-6; below it SGLang decodes
# greedily), stays far inside float32 (3.4e38); 1e39 is inf in float32.
LOGIT_BIAS_LIMIT = 1e30
# SGLang divides positive logits by the repetition penalty (it accepts [0, 2]): 0 gives inf, then NaN.
MIN_REPETITION_PENALTY = 0.01
# OpenAI's API allows n <= 128; this leaves room for SGLang users' larger best-of-n requests.
MAX_PARALLEL_SAMPLES = 1024
INT_SAMPLING_PARAMS = ("max_new_tokens", "min_new_tokens", "top_k", "n", "stream_interval", "sampling_seed")
FLOAT_SAMPLING_PARAMS = ("temperature", "top_p", "min_p", "frequency_penalty", "presence_penalty",
                         "repetition_penalty")


def check_token_ids(input_ids: Sequence | None, vocab_size: int) -> None:
    """Raises ValueError naming the first entry of ``input_ids`` that is not a token id in ``[0, vocab_size)``.

    Args:
        input_ids: one request's prompt token ids (client-given or tokenized).
        vocab_size: the target's vocabulary size (the rows of its embedding).
    """
    if not input_ids:
        return
    if set(map(type, input_ids)) <= {int} and min(input_ids) >= 0 and max(input_ids) < vocab_size:
        return  # the common case, in C loops (a 100k-token prompt: ~6 ms instead of ~50)
    for position, token in enumerate(input_ids):
        if not _is_int(token) or not 0 <= token < vocab_size:
            raise ValueError(f"token id {token!r} at prompt position {position} is outside the model's vocabulary "
                             f"of {vocab_size} tokens (ids 0..{vocab_size - 1}); send token ids of this model's "
                             "tokenizer, or the text")


def check_sampling_values(sampling_params: dict[str, Any] | None) -> None:
    """Raises ValueError naming a sampling parameter that would fail inside the scheduler: a NaN or infinite
    float, a non-integer integer parameter, a ``stop_token_ids`` that is not a list of integers, a repetition
    penalty below MIN_REPETITION_PENALTY, a logit bias beyond +-LOGIT_BIAS_LIMIT. Integral floats become
    ints; a ``top_k`` above TOP_K_ALL becomes TOP_K_ALL (both mean the whole vocabulary)."""
    params = sampling_params or {}
    for key in INT_SAMPLING_PARAMS:
        value = params.get(key)
        if value is None:
            continue
        if isinstance(value, float) and value.is_integer():
            value = params[key] = int(value)
        if not _is_int(value):
            raise ValueError(f"{key} must be an integer, got {value!r}")
    if params.get("top_k") is not None and params["top_k"] > TOP_K_ALL:
        params["top_k"] = TOP_K_ALL
    stop_token_ids = params.get("stop_token_ids")
    if stop_token_ids is not None and not (isinstance(stop_token_ids, list) and all(map(_is_int, stop_token_ids))):
        raise ValueError(f"stop_token_ids must be a list of integers, got {stop_token_ids!r}")
    for key in FLOAT_SAMPLING_PARAMS:
        value = params.get(key)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{key} must be a finite number, got {value}")
    penalty = params.get("repetition_penalty")
    if isinstance(penalty, (int, float)) and 0 <= penalty < MIN_REPETITION_PENALTY:
        raise ValueError(f"repetition_penalty must be from {MIN_REPETITION_PENALTY} to 2 (1 = off), got {penalty}")
    for token, bias in (params.get("logit_bias") or {}).items():
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not abs(bias) <= LOGIT_BIAS_LIMIT:
            raise ValueError(f"logit_bias[{token}] must be a number from {-LOGIT_BIAS_LIMIT:g} to "
                             f"{LOGIT_BIAS_LIMIT:g}, got {bias!r}")


def check_logprob_options(return_logprob: Any, logprob_start_len: Any, top_logprobs_num: Any,
                          token_ids_logprob: Any, vocab_size: int) -> None:
    """Raises ValueError for a ``logprob_start_len`` below -1, a ``top_logprobs_num`` above the vocabulary
    size, or a ``token_ids_logprob`` entry that is not a token id (a negative one would silently read another
    token's log-probability). One request's values: the tokenizer manager validates a batch request by request."""
    if not return_logprob:
        return
    if logprob_start_len is not None and not (_is_int(logprob_start_len) and logprob_start_len >= -1):
        raise ValueError(f"logprob_start_len must be -1 (the default) or a prompt position, got {logprob_start_len!r}")
    if _is_int(top_logprobs_num) and top_logprobs_num > vocab_size:
        raise ValueError(f"top_logprobs_num (top_logprobs) must be at most the vocabulary size {vocab_size}, got "
                         f"{top_logprobs_num}")
    for token in token_ids_logprob or ():
        if not _is_int(token) or not 0 <= token < vocab_size:
            raise ValueError(f"token_ids_logprob entry {token!r} is not a token id of this model (0..{vocab_size - 1})")


def check_parallel_samples(sampling_params: dict[str, Any] | list | None) -> None:
    """Raises ValueError unless every ``n`` of a request's sampling parameters (one dict, or one per prompt)
    is an integer from 1 to MAX_PARALLEL_SAMPLES (SGLang serves n <= 0 as one sample); a null ``n`` becomes
    1, SGLang's default (it would compare None with 1: TypeError). Runs before SGLang copies the request."""
    for params in sampling_params if isinstance(sampling_params, list) else [sampling_params]:
        if not isinstance(params, dict) or params.get("n", 1) == 1:
            continue
        n = params["n"]
        if n is None:
            n = params["n"] = 1
        if isinstance(n, float) and n.is_integer():
            n = params["n"] = int(n)
        if not _is_int(n) or not 1 <= n <= MAX_PARALLEL_SAMPLES:
            raise ValueError(f"n (samples per prompt) must be an integer from 1 to {MAX_PARALLEL_SAMPLES}, got "
                             f"{n!r}; send larger sample counts as several requests")


def _is_int(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)
