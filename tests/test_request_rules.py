# SPDX-License-Identifier: Apache-2.0
"""request_rules: what a DFLASH server serves (penalties, min_p, min_new_tokens, logit_bias, stop ids, grammars on
backends that roll back) and what it refuses by name (grammars on outlines, custom logit processors)."""

import pytest

from dflash_sglang.serving.request_rules import check_request, unsupported_features

SERVED = {"frequency_penalty": 0.5, "presence_penalty": -1.0, "repetition_penalty": 1.2, "min_p": 0.1,
          "min_new_tokens": 8, "logit_bias": {"5": -2.0}, "stop_token_ids": [3], "temperature": 0.7, "top_p": 0.9,
          "top_k": 20}


def test_penalties_logit_processing_and_grammars_are_served():
    grammar = {**SERVED, "json_schema": "{}", "regex": "a+"}
    assert unsupported_features(SERVED) == []
    assert unsupported_features(grammar, None, "xgrammar") == unsupported_features(grammar, None, "llguidance") == []
    check_request(SERVED)
    check_request(None)


@pytest.mark.parametrize("params, processor, named", [
    ({"json_schema": "{}"}, None, "structured output (json_schema) with --grammar-backend outlines"),
    ({"regex": "a+"}, None, "structured output (regex) with --grammar-backend outlines"),
    ({"custom_params": {"x": 1}}, None, "custom logit processors"),
    ({}, "serialized-processor", "custom logit processors"),
])
def test_refused_options_are_named(params, processor, named):
    assert unsupported_features({**SERVED, **params}, processor, "outlines") == [named + (
        " (use xgrammar or llguidance: DFLASH rolls grammars back over rejected drafts)" if "grammar" in named else "")]
    with pytest.raises(ValueError, match="DFLASH") as error:
        check_request(params, processor, "outlines")
    assert named in str(error.value)
