# SPDX-License-Identifier: Apache-2.0
"""Runs the benchmark matrix (prompt set x concurrency) on one endpoint, and assembles the runs of the
speculative and the baseline endpoint into the result's ``runs`` (statistics, speedup, lossless check)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import aiohttp
import openai

from dflash_sglang.bench.client import (EndpointInfo, Sender, chat_input_ids, openai_sender, run_concurrency,
                                        sglang_sender)
from dflash_sglang.bench.prompts import Prompt
from dflash_sglang.bench.stats import RequestResult, compare_outputs, summarize

WARMUP_TOKENS = 16
Runs = dict[tuple[str, int], tuple[list[RequestResult], float]]


@dataclass
class Matrix:
    """What to run: prompts per set, concurrency levels, and the request settings shared by both endpoints."""

    prompt_sets: dict[str, list[Prompt]]
    concurrency: Sequence[int]
    max_tokens: int
    chat_template_kwargs: dict
    tokenizer: str | None = None  # for the native SGLang API; default: the server's tokenizer_path
    api: str = "auto"  # the API the endpoints were found to serve (set after probing)
    _input_ids: dict[str, list[list[int]]] = field(default_factory=dict, repr=False)

    def input_ids(self, info: EndpointInfo) -> dict[str, list[list[int]]]:
        """Chat-templated token ids per set, computed once (both endpoints serve the same target)."""
        if not self._input_ids:
            path = self.tokenizer or info.tokenizer_path or info.model
            for name, prompts in self.prompt_sets.items():
                self._input_ids[name] = chat_input_ids(path, [p.text for p in prompts], self.chat_template_kwargs)
        return self._input_ids


async def run_endpoint(info: EndpointInfo, matrix: Matrix, label: str) -> Runs:
    """Every (set, concurrency) run on one endpoint, after one short warm-up request; on SGLang the prefix
    cache is flushed before each run, so no run reuses another's prompts."""
    timeout = aiohttp.ClientTimeout(total=None, sock_read=3600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        client = openai.AsyncOpenAI(base_url=f"{info.base_url}/v1", api_key="none", timeout=3600, max_retries=0)
        ids = matrix.input_ids(info) if info.api == "sglang" else {}

        def sender(name: str, max_tokens: int) -> Sender:
            if info.api == "sglang":
                return sglang_sender(session, info.base_url, ids[name], max_tokens)
            texts = [p.text for p in matrix.prompt_sets[name]]
            return openai_sender(client, info.model, texts, max_tokens, matrix.chat_template_kwargs)

        first = next(iter(matrix.prompt_sets))
        warmup = await sender(first, WARMUP_TOKENS)(0)
        if warmup.error:
            raise RuntimeError(f"{label}: the warm-up request to {info.base_url} failed: {warmup.error}")
        runs: Runs = {}
        for name, prompts in matrix.prompt_sets.items():
            send = sender(name, matrix.max_tokens)
            for concurrency in matrix.concurrency:
                if info.api == "sglang":  # every run starts from an empty prefix cache, as the first one does
                    await _flush_cache(session, info.base_url)
                runs[name, concurrency] = await run_concurrency(send, range(len(prompts)), concurrency,
                                                                f"{label} {name} c={concurrency}")
        await client.close()
    return runs


async def _flush_cache(session: aiohttp.ClientSession, base_url: str) -> None:
    # SGLang flushes only when idle; `timeout` lets it wait for the last request's batch to be retired
    async with session.post(f"{base_url}/flush_cache", params={"timeout": "60"}) as response:
        if response.status != 200:
            raise RuntimeError(f"{base_url}/flush_cache answered HTTP {response.status}: "
                               f"{(await response.text())[:200]}")


def assemble(speculative: Runs, baseline: Runs | None) -> tuple[list[dict], dict]:
    """The result's ``runs`` (one entry per set and concurrency) and its overall ``lossless`` verdict."""
    entries, mismatched, all_compared = [], 0, True
    for (name, concurrency), (spec_results, spec_wall) in speculative.items():
        entry = {"dataset": name, "concurrency": concurrency, "num_prompts": len(spec_results),
                 "speculative": summarize(spec_results, spec_wall), "baseline": None, "speedup": None,
                 "lossless": None,
                 "requests": {"speculative": [r.record() for r in spec_results], "baseline": None}}
        if baseline is not None:
            base_results, base_wall = baseline[name, concurrency]
            entry["baseline"] = summarize(base_results, base_wall)
            entry["requests"]["baseline"] = [r.record() for r in base_results]
            spec_tput, base_tput = entry["speculative"]["throughput_tok_s"], entry["baseline"]["throughput_tok_s"]
            entry["speedup"] = spec_tput / base_tput if spec_tput and base_tput else None
            entry["lossless"] = compare_outputs(spec_results, base_results)
            mismatched += len(entry["lossless"]["mismatches"])
            all_compared = all_compared and entry["lossless"]["compared"] > 0
        entries.append(entry)
    passed = baseline is not None and all_compared and mismatched == 0
    return entries, {"checked": baseline is not None, "passed": passed, "mismatched": mismatched}
