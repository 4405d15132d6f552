# SPDX-License-Identifier: Apache-2.0
"""Training data: prompts from packaged sets or a user's JSONL, answered by the target itself, cached as tokens.

A drafter learns to predict its target, so the responses are the target's own (regenerated with transformers,
greedy or sampled), as the DFlash paper and SpecForge's ``scripts/train_dflash.py`` do. The cache is a JSONL
file, one ``{"source", "index", "prompt_ids", "response_ids"}`` per line; a partly written cache is extended,
not restarted.
"""

from __future__ import annotations

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


def _stop_ids(target, tokenizer) -> set[int]:
    stops = set()
    for source in (getattr(target, "generation_config", None), target.config):
        eos = getattr(source, "eos_token_id", None)
        stops |= set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        stops.add(tokenizer.eos_token_id)
    return stops


@torch.inference_mode()
def regenerate(target, tokenizer, prompts: Sequence[Prompt], out_path: str, *, max_new_tokens: int,
               batch_size: int = 16, temperature: float = 0.0, max_prompt_tokens: int = 1024,
               seed: int = 0, progress: bool = True) -> int:
    """Answers ``prompts`` with ``target`` (batched, left-padded ``generate``) and appends the token sequences
    to ``out_path``; prompts already in the file (same source and index) are skipped. Returns the count written.
    """
    done = set()
    if os.path.exists(out_path):
        done = {(row["source"], row["index"]) for row in _read_rows(out_path)}
    todo = [p for p in prompts if (p.dataset, p.index) not in done]
    device = next(target.parameters()).device
    stops = _stop_ids(target, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stops) if stops else 0
    torch.manual_seed(seed)
    written = 0
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    bar = _bar(len(todo), "regenerate", progress)
    with open(out_path, "a", encoding="utf-8") as handle:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            encoded = [encode_prompt(tokenizer, p.text)[-max_prompt_tokens:] for p in batch]
            width = max(map(len, encoded))
            input_ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=device)
            attention = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=device)
            sample = temperature > 0
            out = target.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens,
                                  do_sample=sample, temperature=temperature if sample else None,
                                  top_p=None, top_k=None, pad_token_id=pad, eos_token_id=sorted(stops) or None)
            for prompt, ids, row in zip(batch, encoded, out[:, width:].tolist()):
                response = []
                for token in row:
                    response.append(token)
                    if token in stops:
                        break
                handle.write(json.dumps({"source": prompt.dataset, "index": prompt.index, "prompt_ids": ids,
                                         "response_ids": response}) + "\n")
                written += 1
            handle.flush()
            bar.update(len(batch))
    bar.close()
    return written


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


def _bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True)
