# SPDX-License-Identifier: Apache-2.0
"""Which per-request options a DFLASH server serves, checked when a request arrives (HTTP 400 otherwise).

Speculative verification here is exact for greedy decoding and for temperature / top-p / top-k sampling,
output logprobs come from the target's verify pass (``logprobs.py``), and structured output (json_schema,
regex, ebnf, structural_tag) masks the drafts and every verify row with the request's grammar
(``block_grammar.py``), which must roll back over the drafts it walks: grammar backends whose grammars
cannot (outlines) have those requests refused. Options that change the target's distribution token by
token inside a block (penalties, min-p, logit bias, custom logit processors) are refused with a message
naming them, rather than served approximately.
"""

from __future__ import annotations

from typing import Any, Mapping


GRAMMAR_KEYS = ("json_schema", "regex", "ebnf", "structural_tag")
# SGLang's grammar backends whose grammar objects roll back; "none" has SGLang refuse grammars itself.
GRAMMAR_BACKENDS_SERVED = ("xgrammar", "llguidance", "none")


def unsupported_features(sampling_params: Mapping[str, Any] | None, custom_logit_processor: Any = None,
                         grammar_backend: str = "xgrammar") -> list[str]:
    params = dict(sampling_params or {})
    found = []
    if grammar_backend not in GRAMMAR_BACKENDS_SERVED:
        found += [f"structured output ({key}) with --grammar-backend {grammar_backend} (use xgrammar or "
                  "llguidance: DFLASH rolls grammars back over rejected drafts)" for key in GRAMMAR_KEYS
                  if params.get(key)]
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


def check_request(sampling_params: Mapping[str, Any] | None, custom_logit_processor: Any = None,
                  grammar_backend: str = "xgrammar") -> None:
    """Raises ValueError naming every option of this request that DFLASH does not serve yet."""
    found = unsupported_features(sampling_params, custom_logit_processor, grammar_backend)
    if found:
        raise ValueError(f"this DFLASH server does not support {', '.join(found)} yet; drop "
                         f"{'it' if len(found) == 1 else 'them'} from the request, or serve the model without "
                         "--speculative-algorithm DFLASH")
