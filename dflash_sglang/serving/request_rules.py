# SPDX-License-Identifier: Apache-2.0
"""Which per-request options a DFLASH server serves, checked when a request arrives (HTTP 400 otherwise).

Speculative verification here is exact for greedy decoding and for temperature / top-p / top-k / min-p
sampling; output logprobs come from the target's verify pass (``logprobs.py``); frequency / presence /
repetition penalties, ``min_new_tokens`` and ``logit_bias`` are applied to every block row as SGLang applies
them token by token (``block_logit_processing.py``); structured output (json_schema, regex, ebnf,
structural_tag) masks the drafts and every verify row with the request's grammar (``block_grammar.py``),
which must roll back over the drafts it walks: grammar backends whose grammars cannot (outlines) have those
requests refused. Custom logit processors (arbitrary code that may read the request's host-side output,
which lags the block) are refused with a message naming them, rather than served approximately.
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
