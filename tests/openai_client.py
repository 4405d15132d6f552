# SPDX-License-Identifier: Apache-2.0
"""The real ``openai`` client against a test's SGLang server, and a greedy completion through it."""

from __future__ import annotations

import openai

from dflash_sglang.deploy.launch import ServerProcess


def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="none", timeout=600, max_retries=0)


def greedy_completion(server: ServerProcess, prompt: str, max_tokens: int, **kwargs) -> tuple[str, str, int]:
    """(text, finish reason, completion tokens) of a greedy completion."""
    response = client(server).completions.create(model="default", prompt=prompt, max_tokens=max_tokens,
                                                 temperature=0, **kwargs)
    return response.choices[0].text, response.choices[0].finish_reason, response.usage.completion_tokens
