# SPDX-License-Identifier: Apache-2.0
"""Which per-request options a DFLASH server serves, checked when a request arrives (HTTP 400 otherwise).

Speculative verification here is exact for greedy decoding and for temperature / top-p / top-k / min-p
sampling; output logprobs come from the target's verify pass (``logprobs.py``); frequency / presence /
repetition penalties, ``min_new_tokens`` and ``logit_bias`` are applied to every block row as SGLang applies
them token by token (``block_logit_processing.py``). Options that would still change the target's
distribution inside a block in a way the verifier cannot reproduce -- grammars, and custom logit
processors (arbitrary code that may read the request's host-side output, which lags the block) -- are
refused with a message naming them, rather than served approximately.
"""

from __future__ import annotations

from typing import Any, Mapping


def unsupported_features(sampling_params: Mapping[str, Any] | None, custom_logit_processor: Any = None) -> list[str]:
    params = dict(sampling_params or {})
    found = []
    for key in ("json_schema", "regex", "ebnf", "structural_tag"):
        if params.get(key):
            found.append(f"structured output ({key})")
    if custom_logit_processor or params.get("custom_params"):
        found.append("custom logit processors")
    return found


def check_request(sampling_params: Mapping[str, Any] | None, custom_logit_processor: Any = None) -> None:
    """Raises ValueError naming every option of this request that DFLASH does not serve yet."""
    found = unsupported_features(sampling_params, custom_logit_processor)
    if found:
        raise ValueError(f"this DFLASH server does not support {', '.join(found)} yet; drop "
                         f"{'it' if len(found) == 1 else 'them'} from the request, or serve the model without "
                         "--speculative-algorithm DFLASH")
