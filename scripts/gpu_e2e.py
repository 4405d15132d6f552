# SPDX-License-Identifier: Apache-2.0
"""GPU end-to-end check: serve the tiny checkpoints with and without DFLASH on a GPU and compare greedy
outputs over a batch of concurrent prompts, for each requested draft attention backend and drafter.

    python scripts/gpu_e2e.py --out results.json [--draft-backends triton flashinfer] [--cuda-graph]
                              [--dtype float32|bfloat16] [--target qwen3|gemma4-dense|gemma4-moe]
                              [--page-size 16] [--disable-overlap-schedule] [--request-options regex ...]
                              [--block-size 4] [--commit SHA]

``--target gemma4-*``: a tiny Gemma 4 (dense, or with the 26B-A4B MoE block) with sliding layers of head size
64 and a 32-token window (shorter than prompt + output, so both passes' windows act) and full layers of 128
(GQA 4:1), and a random drafter with sliding layers of the same window.

``--request-options``: sampling options added to every request (``REQUEST_OPTIONS``: penalties, logit bias,
min_new_tokens, a regex grammar), served on the GPU by ``serving/block_logit_processing.py`` and
``serving/block_grammar.py``. The baseline then runs without the overlap scheduler (SGLang's overlap loop counts
penalties one token late) and with xgrammar; a parting is not explained by margins (the scoring request cannot
carry a grammar's or a penalty's state), so every parting counts.

Writes a JSON report (provenance, settings; per case: identical, mismatches with both outputs' token ids,
acceptance length, wall time of both servers).

Where an output differs one request at a time, the report says why, for every token of it: at the
position where the two outputs part, the baseline server scores both tokens (``top_logprobs``: the served
target's log-probability margin) and the same target checkpoint, evaluated in float32 on the CPU
(transformers), gives the exact-arithmetic logit margin between them; then the baseline continues greedily
from DFLASH's tokens up to that one, and the next parting (if any) is examined the same way. A parting
whose float32 margin is within TIE_TOLERANCE (four rounding steps of a logit in [16, 32) in the served
dtype) is a near-tie that the verify pass's kernels (a block of tokens) and the baseline's decode kernels
(one token) may round either way -- the baseline alone flips such tokens between batched and one-at-a-time
runs; anything else (a larger margin, an output that stops early) is a real divergence. The script exits
non-zero on a real divergence; near-ties are reported (``identical_prompts`` is the strict count), not
hidden.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dflash_sglang.deploy.launch import ServerProcess  # noqa: E402
from dflash_sglang.bench.provenance import provenance, write_report  # noqa: E402
from dflash_sglang.testing.tiny import write_tiny_checkpoints  # noqa: E402
from dflash_sglang.testing.tiny_gemma4 import write_tiny_gemma4  # noqa: E402

TARGETS = ("qwen3", "gemma4-dense", "gemma4-moe")
GEMMA4_SHAPES = {"head_dim": 64, "global_head_dim": 128, "sliding_window": 32}

# Four rounding steps of a logit in [16, 32) (the tiny target's top logits): float16 4 x 2^-6, bfloat16 4 x 2^-3.
TIE_TOLERANCE = {"float16": 2 ** -4, "bfloat16": 2 ** -1}
MAX_PARTINGS = 8
# drafter-agree proposes what the repeat-prone tiny target mostly picks: ~6 of 8 tokens per step on the CPU
# and on the H100 with triton. A lossless run far below that is a broken drafter pass (wrong attention, lost
# context), which output equality alone cannot see.
MIN_AGREEING_ACCEPTANCE = 4.0
REQUEST_OPTIONS = {
    "frequency_penalty": {"frequency_penalty": 0.8},
    "presence_penalty": {"presence_penalty": 1.0},
    "logit_bias": {"logit_bias": {"42": 4.0, "7": -4.0}},
    "min_new_tokens": {"min_new_tokens": 24},
    "regex": {"regex": "[a-z ]{8,60}"},
}
PENALTIES = ("frequency_penalty", "presence_penalty")
PROMPTS = [f"{'one two three ' * (i % 5)}Tell me about item number {i} and why it" for i in range(16)]


def run_batch(server: ServerProcess, prompts: list[list[int]], max_new_tokens: int, concurrent_requests: bool = True,
              options: dict | None = None) -> tuple[list[list[int]], list[dict], float]:
    """All prompts at once (one batch) or one after another (batch size 1); greedy, with ``options`` added to
    every request's sampling parameters."""
    def one(prompt: list[int]) -> dict:
        return server.generate({"input_ids": prompt, "sampling_params": {
            "max_new_tokens": max_new_tokens, "temperature": 0, **(options or {})}})

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(prompts) if concurrent_requests else 1) as pool:
        results = list(pool.map(one, prompts))
    return [r["output_ids"] for r in results], [r["meta_info"] for r in results], time.perf_counter() - start


def divergence(baseline: ServerProcess, prompt: list[int], expected: list[int], got: list[int]) -> dict:
    """Where two greedy outputs part, and the target's log-probability margin there (baseline scoring)."""
    index = next(i for i, (a, b) in enumerate(zip(expected + [None], got + [None])) if a != b)
    if index >= min(len(expected), len(got)):
        return {"index": index, "kind": "length"}
    scored = baseline.generate({"input_ids": prompt + expected[:index], "return_logprob": True,
                                "top_logprobs_num": 20,
                                "sampling_params": {"max_new_tokens": 1, "temperature": 0}})
    top = {entry[1]: entry[0] for entry in scored["meta_info"]["output_top_logprobs"][0]}
    expected_lp, got_lp = top.get(expected[index]), top.get(got[index])
    margin = None if expected_lp is None or got_lp is None else expected_lp - got_lp
    return {"index": index, "baseline_token": expected[index], "dflash_token": got[index],
            "baseline_logprob": expected_lp, "dflash_token_logprob": got_lp, "logprob_margin": margin}


def partings(baseline: ServerProcess, prompt: list[int], expected: list[int], got: list[int]) -> list[dict]:
    """Every position where DFLASH's output ``got`` leaves the target's greedy continuation of ``got``'s own
    prefix: the first against the baseline's output ``expected``, each next one against the baseline re-run
    from DFLASH's tokens up to and including the previous parting."""
    found: list[dict] = []
    reference = expected
    while reference != got and len(found) < MAX_PARTINGS:
        found.append(divergence(baseline, prompt, reference, got))
        if found[-1].get("kind") == "length":
            break
        kept = got[:found[-1]["index"] + 1]
        follow = baseline.generate({"input_ids": prompt + kept, "sampling_params": {
            "max_new_tokens": len(got) - len(kept), "temperature": 0}})["output_ids"] if len(got) > len(kept) else []
        reference = kept + follow
    if reference != got and found[-1].get("kind") != "length":  # more partings than examined: not a tie
        found.append({"kind": f"more than {MAX_PARTINGS} partings"})
    return found


def add_exact_margins(target_fp32, prompt: list[int], got: list[int], found: list[dict]) -> None:
    """Adds each parting's float32 logit margin (baseline token minus DFLASH token) from the CPU model."""
    import torch

    for parting in found:
        if "dflash_token" not in parting:
            continue
        with torch.no_grad():
            logits = target_fp32(torch.tensor([prompt + got[:parting["index"]]])).logits[0, -1]
        parting["fp32_logit_margin"] = float(logits[parting["baseline_token"]] - logits[parting["dflash_token"]])


def is_tie(parting: dict, tolerance: float) -> bool:
    margin = parting.get("fp32_logit_margin")
    return margin is not None and abs(margin) <= tolerance


def mismatches(a: list[list[int]], b: list[list[int]]) -> list[int]:
    return [i for i, (x, y) in enumerate(zip(a, b)) if x != y]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--draft-backends", nargs="+", default=["triton"])
    parser.add_argument("--target", default="qwen3", choices=TARGETS)
    parser.add_argument("--drafters", nargs="+", default=None,
                        help="default: drafter and drafter-agree for qwen3, drafter for Gemma 4")
    parser.add_argument("--target-backend", default="triton")
    parser.add_argument("--cuda-graph", action="store_true", help="leave SGLang's CUDA graphs on")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(TIE_TOLERANCE))
    parser.add_argument("--head-dim", type=int, default=64,
                        help="tiny checkpoints' head size (FlashInfer's prefill and the fused KV injection need 64+)")
    parser.add_argument("--page-size", type=int, default=1, help="SGLang's --page-size, for both servers")
    parser.add_argument("--block-size", type=int, default=None,
                        help="DFLASH's --speculative-num-draft-tokens (a block shorter than the drafter's)")
    parser.add_argument("--disable-overlap-schedule", action="store_true",
                        help="DFLASH's host-committed loop instead of the overlap scheduler (both servers)")
    parser.add_argument("--request-options", nargs="+", default=[], choices=sorted(REQUEST_OPTIONS),
                        help="sampling options added to every request (penalties, logit bias, a regex grammar)")
    parser.add_argument("--logs", default=None, help="folder for server logs (default: a temp folder)")
    parser.add_argument("--commit", help="commit to record where the tree has no .git (the device machine)")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    work = tempfile.mkdtemp(prefix="dflash-gpu-e2e-")
    logs = args.logs or work
    os.makedirs(logs, exist_ok=True)
    if args.target == "qwen3":
        checkpoints = write_tiny_checkpoints(os.path.join(work, "tiny"), block_size=8, head_dim=args.head_dim)
        target_class = AutoModelForCausalLM
        args.drafters = args.drafters or ["drafter", "drafter-agree"]
    else:
        from transformers import Gemma4ForConditionalGeneration

        checkpoints = write_tiny_gemma4(os.path.join(work, "tiny"), args.target.split("-")[1], **GEMMA4_SHAPES)
        target_class = Gemma4ForConditionalGeneration
        args.drafters = args.drafters or ["drafter"]
    tokenizer = AutoTokenizer.from_pretrained(checkpoints["target"])
    target_fp32 = target_class.from_pretrained(checkpoints["target"], dtype=torch.float32).eval()
    prompts = [tokenizer.encode(text) for text in PROMPTS]
    common = ["--model-path", checkpoints["target"], "--device", "cuda", "--attention-backend", args.target_backend,
              "--dtype", args.dtype, "--mem-fraction-static", "0.15", "--max-total-tokens", "32768",
              "--grammar-backend", "xgrammar" if "regex" in args.request_options else "none",
              "--skip-server-warmup", "--disable-piecewise-cuda-graph",
              "--cuda-graph-max-bs", "16", "--random-seed", "0"]
    if not args.cuda_graph:
        common.append("--disable-cuda-graph")
    if args.page_size > 1:
        common += ["--page-size", str(args.page_size)]
    if args.disable_overlap_schedule:
        common.append("--disable-overlap-schedule")
    options = {key: value for name in args.request_options for key, value in REQUEST_OPTIONS[name].items()}
    penalized = any(name in PENALTIES for name in args.request_options)
    baseline_args = common + (["--disable-overlap-schedule"] if penalized and not args.disable_overlap_schedule else [])
    # A shorter block caps the tokens a step: the agreeing drafter must then reach 60% of it.
    min_agreeing_acceptance = (min(MIN_AGREEING_ACCEPTANCE, 0.6 * args.block_size) if args.block_size
                               else MIN_AGREEING_ACCEPTANCE)
    report = {**provenance(args.commit), "settings": vars(args), "request_options": options, "cases": []}
    failed = False
    with ServerProcess(baseline_args, log_path=os.path.join(logs, "baseline.log")) as baseline:
        base_ids, _, base_time = run_batch(baseline, prompts, args.max_new_tokens, options=options)
        base_ids_again, _, base_time = run_batch(baseline, prompts, args.max_new_tokens, options=options)  # warm
        base_seq, _, base_seq_time = run_batch(baseline, prompts, args.max_new_tokens, concurrent_requests=False,
                                               options=options)
        # Batched GPU kernels round differently with the batch's composition: near-tied logits of a random
        # tiny model can flip. Record how stable the baseline itself is next to DFLASH's agreement with it.
        report["baseline_batch_vs_batch_mismatches"] = mismatches(base_ids, base_ids_again)
        report["baseline_batch_vs_sequential_mismatches"] = mismatches(base_ids, base_seq)
        write_report(report, args.out)  # a run cut later still returns its settings and the baseline's stability
        for backend in args.draft_backends:
            for drafter in args.drafters:
                extra = ["--speculative-algorithm", "DFLASH", "--speculative-draft-model-path", checkpoints[drafter],
                         "--speculative-draft-attention-backend", backend]
                if args.block_size:
                    extra += ["--speculative-num-draft-tokens", str(args.block_size)]
                name = f"dflash-{backend}-{drafter}"
                case = {"draft_backend": backend, "drafter": drafter}
                try:
                    with ServerProcess(common + extra, log_path=os.path.join(logs, f"{name}.log")) as server:
                        run_batch(server, prompts, args.max_new_tokens, options=options)  # warm-up
                        spec_ids, metas, spec_time = run_batch(server, prompts, args.max_new_tokens, options=options)
                        spec_seq, _, spec_seq_time = run_batch(server, prompts, args.max_new_tokens,
                                                               concurrent_requests=False, options=options)
                except Exception as error:  # a server that fails to start is a failed case, reported
                    case.update(identical=False, error=str(error)[-4000:])
                    report["cases"].append(case)
                    failed = True
                    write_report(report, args.out)
                    continue
                batch_diff = mismatches(spec_ids, base_ids)
                sequential_diff = mismatches(spec_seq, base_seq)
                accept = [m.get("spec_accept_length", 0.0) for m in metas]
                # Exact check: one request at a time (no batch-composition rounding). Batched outputs are
                # reported next to the baseline's own batch-to-batch instability.
                explained = {} if options else {i: partings(baseline, prompts[i], base_seq[i], spec_seq[i])
                                                    for i in sequential_diff}
                for i, found in explained.items():
                    add_exact_margins(target_fp32, prompts[i], spec_seq[i], found)
                real = sequential_diff if options else [
                    i for i, found in explained.items() if not all(is_tie(p, TIE_TOLERANCE[args.dtype]) for p in found)]
                mean_accept = sum(accept) / len(accept)
                drafter_works = drafter != "drafter-agree" or mean_accept >= min_agreeing_acceptance
                case.update(identical=not sequential_diff, drafter_works=drafter_works,
                            identical_prompts=len(prompts) - len(sequential_diff),
                            lossless_up_to_ties=not real, real_divergences=real,
                            batch_mismatches=batch_diff, sequential_mismatches=sequential_diff,
                            partings=explained, mean_accept_length=mean_accept,
                            outputs={i: {"prompt": prompts[i], "baseline": base_seq[i], "dflash": spec_seq[i]}
                                     for i in sequential_diff},
                            baseline_batch_wall_s=base_time, dflash_batch_wall_s=spec_time,
                            baseline_sequential_wall_s=base_seq_time, dflash_sequential_wall_s=spec_seq_time)
                report["cases"].append(case)
                failed |= bool(real) or not drafter_works
                print(json.dumps(case), flush=True)
                write_report(report, args.out)
    write_report(report, args.out)
    print(f"{'FAILED' if failed else 'OK'}: {len(report['cases'])} cases -> {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
