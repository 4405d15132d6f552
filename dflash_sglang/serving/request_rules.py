# SPDX-License-Identifier: Apache-2.0
"""Which per-request options a DFLASH server serves, checked when a request arrives (HTTP 400 otherwise).

Speculative verification here is exact for greedy decoding and for temperature / top-p / top-k sampling,
and output logprobs come from the target's verify pass (``logprobs.py``). Options that change the target's
distribution token by token inside a block (penalties, min-p, logit bias, grammars, custom logit
processors) are refused with a message naming them, rather than served approximately.
"""

from __future__ import annotations

from typing import Any, Mapping


def unsupported_features(sampling_params: Mapping[str, Any] | None, custom_logit_processor: Any = None) -> list[str]:
    params = dict(sampling_params or {})
    found = []
    for key in ("json_schema", "regex", "ebnf", "structural_tag"):
        if params.get(key):
            found.append(f"structured output ({key})")
    for key, neutral in (("frequency_penalty", 0.0), ("presence_penalty", 0.0), ("repetition_penalty", 1.0),
                         ("min_p", 0.0), ("min_new_tokens", 0)):
        value = params.get(key)
        if value is not None and float(value) != neutral:
            found.append(key)
    if params.get("logit_bias"):
        found.append("logit_bias")
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
