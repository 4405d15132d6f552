# SPDX-License-Identifier: Apache-2.0
"""Regenerating the training data with SGLang's offline engine (``sglang.Engine``) instead of transformers'
``generate``: the target runs with SGLang's continuous batching, paged KV cache and CUDA graphs.

Token ids in and out (``skip_tokenizer_init``): prompts are encoded here exactly as the transformers path encodes
them (``data.CacheWriter.encode``), all of them are submitted at once and SGLang batches them itself. Rows are
appended in prompt order, each as soon as every earlier prompt is answered, through the same ``CacheWriter`` as
the transformers path, so a stopped run resumes the same way. Stops: the same id set as the transformers path
(``data.target_stop_ids``) goes in ``stop_token_ids``; a request that stops on one finishes with reason
``{"type": "stop", "matched": id}`` and its ``output_ids`` end with that id, as transformers' rows do (and
``data.cut_at_stop`` is applied to both). Sampling parameters not given here (top-p, top-k, repetition penalty)
come from the target's ``generation_config.json`` in both paths (SGLang's ``sampling_defaults="model"``).

The engine's scheduler and detokenizer are children of this process: they are shut down and waited for before
:func:`regenerate_with_sglang` returns, also on errors and Ctrl-C, so their GPU memory is free for training (and
SGLang makes them die with this process, ``PR_SET_PDEATHSIG``, should it be killed).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Sequence

import torch

from dflash_sglang.bench.prompts import Prompt
from dflash_sglang.training.data import CacheWriter, cut_at_stop, progress_bar, target_stop_ids


def sglang_can_run(device: torch.device) -> bool:
    """Whether ``--regenerate-with auto`` picks SGLang: on a CUDA device with SGLang installed. On the CPU it
    runs too (asked for explicitly), but its start-up (~30 s) outweighs its speed there."""
    import importlib.util

    return device.type == "cuda" and importlib.util.find_spec("sglang") is not None


def engine_kwargs(target_path: str, device: torch.device, dtype: torch.dtype, seed: int,
                  extra: dict | None = None) -> dict:
    """``sglang.Engine`` arguments (ServerArgs fields) for serving ``target_path`` on ``device``; ``extra``
    overrides or adds fields (e.g. ``{"cuda_graph_max_bs": 512}``)."""
    kwargs = {"model_path": target_path, "skip_tokenizer_init": True, "dtype": str(dtype).removeprefix("torch."),
              "random_seed": seed}
    if device.type == "cpu":
        # NOTE: SGLang's CPU engine runs torch_native attention only and no CUDA graphs; its static memory
        # fraction is of the host's memory.
        kwargs.update(device="cpu", attention_backend="torch_native", disable_cuda_graph=True,
                      mem_fraction_static=0.1)
    elif device.type == "cuda":
        from dflash_sglang.deploy.deployment import backend_problem, cuda_capability

        kwargs.update(device="cuda", base_gpu_id=device.index or 0)
        capability = cuda_capability()
        if capability == (9, 0) and backend_problem("fa3", "cuda", capability) is not None:
            # NOTE: SGLang's default on Hopper is fa3; an sgl_kernel without it (this project's GPU kit) gets the
            # deployment's fallback instead.
            kwargs["attention_backend"] = "triton"
    else:
        raise ValueError(f"--regenerate-with sglang runs on cpu or cuda devices, not {device}; pass "
                         "--regenerate-with transformers")
    kwargs.update(extra or {})
    return kwargs


@contextlib.contextmanager
def running_engine(kwargs: dict):
    """``sglang.Engine(**kwargs)``, shut down on exit with its processes waited for (GPU memory freed)."""
    import psutil

    if kwargs.get("device") == "cpu":
        from dflash_sglang.deploy.cpu_stub import driver_present, prepare_cpu_engine_process

        if not driver_present():
            prepare_cpu_engine_process()
    import sglang

    engine = None
    try:
        engine = sglang.Engine(**kwargs)
        yield engine
    finally:
        # NOTE: this process starts no other children: all of them are the engine's (also when it failed to start).
        children = psutil.Process().children(recursive=True)
        if engine is not None:
            engine.shutdown()
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        psutil.wait_procs(children, timeout=60)


def regenerate_with_sglang(target_path: str, tokenizer, prompts: Sequence[Prompt], out_path: str, *,
                           max_new_tokens: int, temperature: float = 0.0, max_prompt_tokens: int = 1024,
                           seed: int = 0, device: torch.device = torch.device("cuda"),
                           dtype: torch.dtype = torch.bfloat16, engine_args: dict | None = None,
                           progress: bool = True) -> tuple[int, int]:
    """Answers ``prompts`` with the target at ``target_path`` served by ``sglang.Engine`` and appends the token
    sequences to ``out_path`` (rows as :func:`data.regenerate` writes them); prompts already in the file are
    skipped and no engine starts when none is left. Returns the rows and response tokens written.

    Args:
        device, dtype: where and in what precision SGLang runs the target (as the transformers path would).
        engine_args: extra ``sglang.Engine`` fields (:func:`engine_kwargs`).
    """
    stops = target_stop_ids(target_path, tokenizer)
    params = {"max_new_tokens": max_new_tokens, "temperature": temperature, "stop_token_ids": sorted(stops)}
    with CacheWriter(out_path, prompts, tokenizer, max_prompt_tokens) as cache:
        if not cache.todo:
            return 0, 0
        encoded = [cache.encode(p) for p in cache.todo]
        answered: dict[int, list[int]] = {}
        next_row = 0
        bar = progress_bar(len(encoded), "regenerate (sglang)", progress)

        def on_answer(i: int, output: dict) -> None:
            nonlocal next_row
            reason = (output["meta_info"].get("finish_reason") or {}).get("type")
            if reason not in ("stop", "length"):
                raise RuntimeError(f"SGLang did not finish prompt {cache.todo[i].dataset}#{cache.todo[i].index} "
                                   f"({len(encoded[i])} tokens): {output['meta_info'].get('finish_reason')}")
            answered[i] = cut_at_stop(output["output_ids"], stops)
            bar.update(1)
            while next_row in answered:
                cache.write(cache.todo[next_row], encoded[next_row], answered.pop(next_row))
                next_row += 1

        with running_engine(engine_kwargs(target_path, device, dtype, seed, engine_args)) as engine:
            engine.loop.run_until_complete(_answer_all(engine, encoded, params, on_answer))
        bar.close()
    return cache.written, cache.response_tokens


async def _answer_all(engine, encoded: list[list[int]], params: dict, on_answer) -> None:
    async def answer(i: int) -> tuple[int, dict]:
        return i, await engine.async_generate(input_ids=encoded[i], sampling_params=params)

    for next_done in asyncio.as_completed([answer(i) for i in range(len(encoded))]):
        on_answer(*await next_done)
