# SPDX-License-Identifier: Apache-2.0
"""Streaming benchmark clients for one endpoint, and the concurrency driver.

Two APIs, chosen per endpoint by :func:`probe_endpoint`:

* ``sglang``: SGLang's native ``/generate`` (aiohttp, streamed). Its ``meta_info`` carries the per-request
  acceptance statistics (``spec_verify_ct``) and the output token ids, which the OpenAI-compatible routes of
  SGLang 0.5.10 do not return. The chat template is applied here, exactly as SGLang's chat route does
  (``apply_chat_template(tokenize=True, add_generation_prompt=True, **chat_template_kwargs)`` with the
  tokenizer at the server's ``tokenizer_path``), so the server sees the same token ids as from
  ``/v1/chat/completions``.
* ``openai``: ``/v1/chat/completions`` of any OpenAI-compatible server, through the ``openai`` client,
  streamed with usage; acceptance is unavailable and outputs are compared as text.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Sequence

import aiohttp
import openai
from tqdm.asyncio import tqdm

from dflash_sglang.bench.stats import RequestResult

APIS = ("auto", "sglang", "openai")
Sender = Callable[[int], Awaitable[RequestResult]]


class EndpointError(RuntimeError):
    """An endpoint cannot be reached or does not speak the requested API."""


@dataclass(frozen=True)
class EndpointInfo:
    """What :func:`probe_endpoint` learned: ``api`` is "sglang" or "openai"."""

    base_url: str
    api: str
    model: str
    tokenizer_path: str | None = None


async def probe_endpoint(base_url: str, api: str = "auto", timeout_s: float = 30.0) -> EndpointInfo:
    """Finds out which API ``base_url`` serves (SGLang's ``/model_info``, else OpenAI's ``/v1/models``).

    Raises:
        EndpointError: unreachable, or ``api`` was forced and the endpoint does not serve it.
    """
    base_url = base_url.rstrip("/")
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            if api in ("auto", "sglang"):
                async with session.get(f"{base_url}/model_info") as response:
                    if response.status == 200:
                        info = await response.json()
                        return EndpointInfo(base_url, "sglang", info["model_path"], info.get("tokenizer_path"))
                if api == "sglang":
                    raise EndpointError(f"{base_url}/model_info answered HTTP {response.status}: not an SGLang "
                                        "server; use --api openai")
            async with session.get(f"{base_url}/v1/models") as response:
                if response.status != 200:
                    raise EndpointError(f"{base_url}/v1/models answered HTTP {response.status}: not an "
                                        "OpenAI-compatible server")
                models = (await response.json()).get("data") or [{"id": "default"}]
                return EndpointInfo(base_url, "openai", models[0]["id"])
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as error:
        raise EndpointError(f"cannot reach {base_url} ({error or type(error).__name__}); is the server up? "
                            "(or use --launch CONFIG)") from None


def chat_input_ids(tokenizer_path: str, prompts: Sequence[str], chat_template_kwargs: dict) -> list[list[int]]:
    """Token ids of each prompt as one user message, through the target's chat template (see module doc)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, trust_remote_code=True)
    except (OSError, ValueError) as error:
        raise EndpointError(f"cannot load the server's tokenizer from {tokenizer_path} ({error}); the native "
                            "SGLang API needs it on this machine: pass --tokenizer PATH, or use --api openai "
                            "(no acceptance statistics)") from None
    return [list(tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True,
                                               add_generation_prompt=True, return_dict=False,
                                               **chat_template_kwargs))
            for text in prompts]


def sglang_sender(session: aiohttp.ClientSession, base_url: str, input_ids: Sequence[list[int]],
                  max_tokens: int) -> Sender:
    """Streams ``/generate`` greedily for prompt ``i``; records token ids and ``spec_verify_ct``."""

    async def send(i: int) -> RequestResult:
        body = {"input_ids": input_ids[i], "stream": True,
                "sampling_params": {"max_new_tokens": max_tokens, "temperature": 0}}
        result, start = RequestResult(i, output=[]), time.perf_counter()
        last = start
        try:
            async with session.post(f"{base_url}/generate", json=body) as response:
                if response.status != 200:
                    result.error = f"HTTP {response.status}: {(await response.text())[:300]}"
                    return result
                async for raw in response.content:
                    line = raw.decode().strip()
                    if not line.startswith("data:") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[len("data:"):])
                    meta = chunk["meta_info"]
                    now = time.perf_counter()
                    new = meta["completion_tokens"] - result.output_tokens
                    if new > 0:
                        _add_chunk(result, start, last, now, new)
                        result.output_tokens, last = meta["completion_tokens"], now
                    ids = chunk.get("output_ids") or []
                    # cumulative ids by default; incremental when the server streams increments
                    result.output = list(ids) if len(ids) == meta["completion_tokens"] else result.output + ids
                    if meta.get("finish_reason"):
                        result.finish_reason = meta["finish_reason"].get("type")
                        result.spec_verify_ct = meta.get("spec_verify_ct")
        except (aiohttp.ClientError, asyncio.TimeoutError) as error:
            result.error = f"{type(error).__name__}: {error}"
        result.latency_s = time.perf_counter() - start
        return result

    return send


def openai_sender(client: openai.AsyncOpenAI, model: str, prompts: Sequence[str], max_tokens: int,
                  chat_template_kwargs: dict) -> Sender:
    """Streams ``/v1/chat/completions`` greedily for prompt ``i``; records the text (answer + reasoning)."""

    async def send(i: int) -> RequestResult:
        result, start = RequestResult(i), time.perf_counter()
        last, text = start, []
        try:
            stream = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": prompts[i]}], max_tokens=max_tokens,
                temperature=0, stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True},
                extra_body={"chat_template_kwargs": chat_template_kwargs} if chat_template_kwargs else None)
            async for chunk in stream:
                now = time.perf_counter()
                delta = chunk.choices[0].delta if chunk.choices else None
                piece = (getattr(delta, "reasoning_content", None) or "") + (delta.content or "") if delta else ""
                counted = chunk.usage.completion_tokens if chunk.usage else None
                if piece:  # without per-chunk usage, a chunk counts as one token
                    text.append(piece)
                    new = max(counted - result.output_tokens, 1) if counted is not None else 1
                    _add_chunk(result, start, last, now, new)
                    result.output_tokens, last = result.output_tokens + new, now
                if counted is not None:  # the final usage chunk has the exact count
                    result.output_tokens = counted
                if chunk.choices and chunk.choices[0].finish_reason:
                    result.finish_reason = chunk.choices[0].finish_reason
        except openai.OpenAIError as error:
            result.error = f"{type(error).__name__}: {error}"
        result.output = "".join(text)
        result.latency_s = time.perf_counter() - start
        return result

    return send


def _add_chunk(result: RequestResult, start: float, last: float, now: float, new_tokens: int) -> None:
    """Times a streamed chunk of ``new_tokens`` tokens arriving at ``now`` (the previous one at ``last``):
    the first chunk gives the TTFT, each later one ``new_tokens`` equal inter-token latencies."""
    if result.ttft_s is None:
        result.ttft_s = now - start
    else:
        result.itl_s.extend([(now - last) / new_tokens] * new_tokens)


async def run_concurrency(send: Sender, indices: Sequence[int], concurrency: int,
                          label: str) -> tuple[list[RequestResult], float]:
    """Sends every prompt in ``indices`` with at most ``concurrency`` in flight, with a progress bar.

    Returns:
        The results in prompt order and the wall time (first request sent to last done), seconds.
    """
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> RequestResult:
        async with gate:
            return await send(i)

    start = time.perf_counter()
    results = await tqdm.gather(*(one(i) for i in indices), desc=label, unit="req", leave=False)
    return list(results), time.perf_counter() - start
