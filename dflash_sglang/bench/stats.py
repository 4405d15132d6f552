# SPDX-License-Identifier: Apache-2.0
"""Per-request records, the statistics of one run (one endpoint, one prompt set, one concurrency), and the
lossless check between the speculative and the baseline endpoint.

Definitions (the ones the DFlash model cards and SGLang use):

* throughput: output tokens of all requests / wall time from the first request sent to the last one done;
* acceptance length: tokens emitted per target verify step = sum of output tokens / sum of verify steps
  (SGLang's ``completion_tokens / spec_verify_ct``), None when the endpoint does not report verify steps;
* TTFT: request sent -> first output token; ITL: the time between two streamed chunks divided evenly over the
  tokens the later chunk carries (a speculative step streams several tokens at once), so p50/p99 are per
  token; TPOT: (latency - TTFT) / (output tokens - 1), per request.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np


@dataclass
class RequestResult:
    """One request: ``output`` is the token ids (native SGLang API) or the text (OpenAI API)."""

    prompt_index: int
    output_tokens: int = 0
    ttft_s: float | None = None
    latency_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    spec_verify_ct: int | None = None
    output: list[int] | str = ""
    finish_reason: str | None = None
    error: str | None = None

    @property
    def accept_length(self) -> float | None:
        if not self.spec_verify_ct:
            return None
        return self.output_tokens / self.spec_verify_ct

    def record(self) -> dict:
        """The JSON record (the output itself is summarised by its length)."""
        return {"prompt_index": self.prompt_index, "output_tokens": self.output_tokens,
                "ttft_ms": None if self.ttft_s is None else 1e3 * self.ttft_s, "latency_ms": 1e3 * self.latency_s,
                "tpot_ms": _tpot_ms(self), "itl_ms_p50": _percentile_ms(self.itl_s, 50),
                "spec_verify_ct": self.spec_verify_ct, "accept_length": self.accept_length,
                "finish_reason": self.finish_reason, "error": self.error}


def _percentile_ms(values: Sequence[float], q: float) -> float | None:
    return float(1e3 * np.percentile(values, q)) if len(values) else None


def _tpot_ms(result: RequestResult) -> float | None:
    if result.ttft_s is None or result.output_tokens < 2:
        return None
    return 1e3 * (result.latency_s - result.ttft_s) / (result.output_tokens - 1)


def summarize(results: Sequence[RequestResult], wall_s: float) -> dict:
    """Statistics of one run over its successful requests (see the module docstring)."""
    done = [r for r in results if r.error is None]
    tokens = sum(r.output_tokens for r in done)
    verify_steps = [r.spec_verify_ct for r in done]
    reported = bool(done) and all(steps for steps in verify_steps)
    per_request = [r.accept_length for r in done] if reported else []
    ttfts = [r.ttft_s for r in done if r.ttft_s is not None]
    itls = [gap for r in done for gap in r.itl_s]
    tpots = [t for t in map(_tpot_ms, done) if t is not None]
    return {
        "requests": len(results), "failed": len(results) - len(done), "output_tokens": tokens,
        "wall_s": wall_s, "throughput_tok_s": tokens / wall_s if wall_s > 0 else None,
        "accept_length": tokens / sum(verify_steps) if reported else None,
        "accept_length_per_request_mean": float(np.mean(per_request)) if per_request else None,
        "ttft_ms_p50": _percentile_ms(ttfts, 50), "ttft_ms_p99": _percentile_ms(ttfts, 99),
        "itl_ms_p50": _percentile_ms(itls, 50), "itl_ms_p99": _percentile_ms(itls, 99),
        "tpot_ms_mean": float(np.mean(tpots)) if tpots else None,
    }


def first_difference(a: Sequence, b: Sequence) -> int | None:
    """Index of the first differing element; the shorter length when one is a prefix of the other; None if equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def compare_outputs(speculative: Sequence[RequestResult], baseline: Sequence[RequestResult]) -> dict:
    """The lossless check of one run: every prompt's greedy output must be identical on both endpoints.

    Returns:
        ``{"passed", "compared", "unit", "mismatches": [{prompt_index, first_diff_index, ...}]}``; ``unit`` is
        "token" when outputs are token ids, "char" when only text was available.
    """
    base_by_prompt = {r.prompt_index: r for r in baseline}
    mismatches, compared, unit = [], 0, "token"
    for spec in speculative:
        base = base_by_prompt.get(spec.prompt_index)
        if base is None or spec.error or base.error:
            continue
        compared += 1
        unit = "char" if isinstance(spec.output, str) else "token"
        index = first_difference(spec.output, base.output)
        if index is not None:
            mismatches.append({"prompt_index": spec.prompt_index, "first_diff_index": index,
                               "speculative_length": len(spec.output), "baseline_length": len(base.output),
                               "speculative_next": _window(spec.output, index),
                               "baseline_next": _window(base.output, index)})
    return {"passed": compared > 0 and not mismatches, "compared": compared, "unit": unit, "mismatches": mismatches}


def _window(output: list[int] | str, index: int, width: int = 8) -> list[int] | str:
    return output[index:index + width]
