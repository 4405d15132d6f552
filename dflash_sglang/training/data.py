# SPDX-License-Identifier: Apache-2.0
"""Training data: prompts from packaged sets or a user's JSONL, answered by the target itself, cached as tokens.

A drafter learns to predict its target, so the responses are the target's own (greedy or sampled), as the
DFlash paper and SpecForge's ``scripts/train_dflash.py`` do: here with transformers' ``generate``
(:func:`regenerate`), or with SGLang's offline engine (``regenerate_sglang``), both through :class:`CacheWriter`.
The cache is a JSONL file, one ``{"source", "index", "prompt_ids", "response_ids"}`` per line, in prompt order;
a response ends with the first stop token the target produced (included), or at ``max_new_tokens``. A partly
written cache is extended, not restarted.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from typing import Sequence

import torch

from dflash_sglang.bench.prompts import Prompt, load_jsonl_prompts, load_prompt_set


@dataclass(frozen=True)
class TrainingSequence:
    """One training sequence: ``tokens = prompt_ids + response_ids``; the response starts at ``prompt_len``."""

    tokens: torch.Tensor  # [S] int64
    prompt_len: int


def load_prompts(sources: Sequence[str], limit: int | None = None) -> list[Prompt]:
    """Prompts of each source: a packaged set of ``bench.prompts`` (``humaneval``, ``mt-bench``, ``aime``,
    ``sharegpt``: first turns) or a JSONL file path (``{"prompt": ...}`` per line). ``limit`` caps each source.
    An unknown name or a set whose package is missing raises ``PromptSetError`` saying what to pass or install."""
    prompts: list[Prompt] = []
    for source in sources:
        prompts += load_jsonl_prompts(source, limit) if os.path.exists(source) else load_prompt_set(source, limit)
    return prompts


def encode_prompt(tokenizer, text: str) -> list[int]:
    """The chat-formatted prompt (generation prompt added) when the tokenizer has a template, else raw text."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return tokenizer(text)["input_ids"]


def stop_token_ids(tokenizer, *configs) -> set[int]:
    """The ids that end a response: the ``eos_token_id`` (one or a list) of each config given (the model's
    config, its generation config) and the tokenizer's eos token."""
    stops = set()
    for source in configs:
        eos = getattr(source, "eos_token_id", None)
        stops |= set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        stops.add(tokenizer.eos_token_id)
    return stops


def target_stop_ids(target_path: str, tokenizer) -> set[int]:
    """:func:`stop_token_ids` of a target folder's config and generation config, without loading its weights
    (the set the transformers path gets from the loaded model)."""
    from transformers import AutoConfig, GenerationConfig

    configs = [AutoConfig.from_pretrained(target_path)]
    with contextlib.suppress(OSError):  # no generation_config.json: transformers derives it from the config
        configs.append(GenerationConfig.from_pretrained(target_path))
    return stop_token_ids(tokenizer, *configs)


def cut_at_stop(tokens: Sequence[int], stops: set[int]) -> list[int]:
    """``tokens`` up to and including the first stop token (all of them when none is there)."""
    response = []
    for token in tokens:
        response.append(token)
        if token in stops:
            break
    return response


class CacheWriter:
    """Appends rows to a token cache, skipping prompts it already holds.

    ``todo`` is the prompts of ``prompts`` whose (source, index) is not in the cache yet, in their order;
    :meth:`write` appends one answered prompt and flushes it, so an interrupted run leaves only whole rows.
    """

    def __init__(self, out_path: str, prompts: Sequence[Prompt], tokenizer, max_prompt_tokens: int) -> None:
        done = set()
        if os.path.exists(out_path):
            done = {(row["source"], row["index"]) for row in _read_rows(out_path)}
        self.todo = [p for p in prompts if (p.dataset, p.index) not in done]
        self.tokenizer, self.max_prompt_tokens = tokenizer, max_prompt_tokens
        self.out_path = out_path
        self.written = 0
        self.response_tokens = 0
        self._handle = None

    def encode(self, prompt: Prompt) -> list[int]:
        """The prompt's token ids as cached: chat-formatted, the last ``max_prompt_tokens`` kept."""
        return encode_prompt(self.tokenizer, prompt.text)[-self.max_prompt_tokens:]

    def write(self, prompt: Prompt, prompt_ids: list[int], response_ids: list[int]) -> None:
        if self._handle is None:
            os.makedirs(os.path.dirname(os.path.abspath(self.out_path)), exist_ok=True)
            self._handle = open(self.out_path, "a", encoding="utf-8")
        self._handle.write(json.dumps({"source": prompt.dataset, "index": prompt.index, "prompt_ids": prompt_ids,
                                       "response_ids": response_ids}) + "\n")
        self._handle.flush()
        self.written += 1
        self.response_tokens += len(response_ids)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@torch.inference_mode()
def regenerate(target, tokenizer, prompts: Sequence[Prompt], out_path: str, *, max_new_tokens: int,
               batch_size: int = 16, temperature: float = 0.0, max_prompt_tokens: int = 1024,
               seed: int = 0, progress: bool = True) -> tuple[int, int]:
    """Answers ``prompts`` with ``target`` (batched, left-padded transformers ``generate``) and appends the
    token sequences to ``out_path``; prompts already in the file (same source and index) are skipped. Returns
    the rows and response tokens written."""
    device = next(target.parameters()).device
    stops = stop_token_ids(tokenizer, getattr(target, "generation_config", None), target.config)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stops) if stops else 0
    torch.manual_seed(seed)
    with CacheWriter(out_path, prompts, tokenizer, max_prompt_tokens) as cache:
        bar = progress_bar(len(cache.todo), "regenerate", progress)
        for start in range(0, len(cache.todo), batch_size):
            batch = cache.todo[start:start + batch_size]
            encoded = [cache.encode(p) for p in batch]
            width = max(map(len, encoded))
            input_ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=device)
            attention = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=device)
            sample = temperature > 0
            out = target.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens,
                                  do_sample=sample, temperature=temperature if sample else None,
                                  top_p=None, top_k=None, pad_token_id=pad, eos_token_id=sorted(stops) or None)
            for prompt, ids, row in zip(batch, encoded, out[:, width:].tolist()):
                cache.write(prompt, ids, cut_at_stop(row, stops))
            bar.update(len(batch))
        bar.close()
    return cache.written, cache.response_tokens


def _read_rows(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def load_sequences(path: str, max_seq_len: int | None = None) -> list[tuple[dict, TrainingSequence]]:
    """(row, sequence) per cached line; sequences are cut to ``max_seq_len`` tokens; rows without a response
    token to predict after the first are dropped."""
    out = []
    for row in _read_rows(path):
        tokens = (row["prompt_ids"] + row["response_ids"])[:max_seq_len]
        if len(tokens) - len(row["prompt_ids"]) >= 2:
            out.append((row, TrainingSequence(torch.tensor(tokens, dtype=torch.int64), len(row["prompt_ids"]))))
    if not out:
        raise ValueError(f"{path}: no usable sequences (each needs a prompt and at least 2 response tokens)")
    return out


def progress_bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True)
