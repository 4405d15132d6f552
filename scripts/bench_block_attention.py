# SPDX-License-Identifier: Apache-2.0
"""Times DFLASH's block attention (``ops/block_attention.py``) against SGLang's triton extend kernel, the one
the triton backend runs for a mask-free TARGET_VERIFY pass without this package, on the same inputs.

Shapes: the Qwen3-8B target's attention (32 query heads, 8 KV heads, head_dim 128), one block of 16 query
tokens per request, causal (the verify pass) and non-causal (the drafter's layers), prefixes of 512 and
4096 tokens at shuffled cache slots, batch 1, 8 and 32; bfloat16. CUDA-event medians with L2 flushed
(``bench_kernels.Timer``); both outputs are checked against each other before timing. Prints a table and
writes JSON (``--out``) with the device, commit and settings. Without CUDA it says so and exits 0.

With ``--graph`` it times instead what a model's CUDA graph sees: ``LAYERS`` calls, each over its own layer's
KV cache, captured in one graph and replayed (per-call time = replay time / LAYERS, launch gaps included), for
the verify pass's causal block attention at several split counts (``auto``: ``split_count``) and, as the plain
decoding step's counterpart, SGLang's triton decode attention (one query token per request,
``triton_attention_num_kv_splits`` default 8) over the same caches.

Usage: ``python scripts/bench_block_attention.py [--out PATH] [--commit SHA] [--graph]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_kernels import Timer  # noqa: E402  (scripts/ is on sys.path when this runs as a script)
from dflash_sglang.bench.provenance import provenance, write_report  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16
PREFIXES = (512, 4096)
BATCHES = (1, 8, 32)
LAYERS = 36
SPLITS = (None, 1, 2, 4, 8, 16)  # None: split_count's choice
DECODE_KV_SPLITS = 8


def case_inputs(batch: int, prefix: int) -> dict:
    tokens = batch * BLOCK
    slots = batch * (prefix + BLOCK) + 64
    qkv = torch.randn(tokens, HEADS + 2 * KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    return {"q": qkv[:, :HEADS].contiguous(), "k_block": qkv[:, HEADS:HEADS + KV_HEADS].contiguous(),
            "v_block": qkv[:, HEADS + KV_HEADS:].contiguous(),
            "k_cache": torch.randn(slots, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16),
            "v_cache": torch.randn(slots, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16),
            "kv_indptr": torch.arange(0, (batch + 1) * prefix, prefix, device="cuda", dtype=torch.int32),
            "kv_indices": torch.randperm(slots, device="cuda")[:batch * prefix]}


def sglang_extend(args: dict, causal: bool, out: torch.Tensor) -> None:
    from sglang.srt.layers.attention.triton_ops.extend_attention import extend_attention_fwd

    batch = args["kv_indptr"].numel() - 1
    qo_indptr = torch.arange(0, (batch + 1) * BLOCK, BLOCK, device="cuda", dtype=torch.int32)
    extend_attention_fwd(args["q"], args["k_block"], args["v_block"], out, args["k_cache"], args["v_cache"], qo_indptr,
                         args["kv_indptr"], args["kv_indices"], None, causal, None, BLOCK, 1.0, 1.0,
                         sm_scale=HEAD_DIM ** -0.5)


def graph_us(calls, reps: int = 20) -> float:
    """Median microseconds per call of ``calls`` (a list of closures) captured in one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:  # compile and warm up outside the capture
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    return statistics.median(times)


def labels_of(splits: tuple) -> list[str]:
    return ["auto" if count is None else f"S={count}" for count in splits]


def bench_in_graphs(report: dict) -> None:
    from sglang.srt.layers.attention.triton_ops.decode_attention import decode_attention_fwd

    from dflash_sglang.ops.block_attention import block_attention

    labels = labels_of(SPLITS)
    print(f"{'batch':>5} {'prefix':>6} " + " ".join(f"{label:>8}" for label in labels)
          + f" {'decode':>9}   (us per layer, {LAYERS} layers in one graph)")
    for prefix in PREFIXES:
        for batch in BATCHES:
            layers = [case_inputs(batch, prefix) for _ in range(LAYERS)]
            outs = [torch.empty_like(layer["q"]) for layer in layers]
            row = {"batch": batch, "prefix": prefix, "layers": LAYERS, "block_us": {}}
            for splits, label in zip(SPLITS, labels):
                row["block_us"][label] = graph_us([
                    (lambda layer=layer, out=out: block_attention(**layer, block_size=BLOCK, causal=True,
                                                                  sm_scale=HEAD_DIM ** -0.5, out=out,
                                                                  splits=splits))
                    for layer, out in zip(layers, outs)])
            # The decode step's attention: each request's last query token over the same prefix.
            q1 = [layer["q"].view(batch, BLOCK, HEADS, HEAD_DIM)[:, -1].contiguous() for layer in layers]
            o1 = [torch.empty_like(q) for q in q1]
            logits = torch.empty(batch, HEADS, DECODE_KV_SPLITS, HEAD_DIM, dtype=torch.float32, device="cuda")
            lse = torch.empty(batch, HEADS, DECODE_KV_SPLITS, dtype=torch.float32, device="cuda")
            splits = torch.full((batch,), DECODE_KV_SPLITS, dtype=torch.int32, device="cuda")
            row["decode_us"] = graph_us([
                (lambda layer=layer, q=q, o=o: decode_attention_fwd(
                    q, layer["k_cache"], layer["v_cache"], o, layer["kv_indptr"], layer["kv_indices"], logits, lse,
                    splits, DECODE_KV_SPLITS, HEAD_DIM ** -0.5, 1.0, 1.0))
                for layer, q, o in zip(layers, q1, o1)])
            report["graph_cases"].append(row)
            print(f"{batch:>5} {prefix:>6} " + " ".join(f"{row['block_us'][label]:>8.1f}" for label in labels)
                  + f" {row['decode_us']:>9.1f}", flush=True)
            del layers, outs, q1, o1
            torch.cuda.empty_cache()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="block-attention.json")
    parser.add_argument("--commit", help="commit to record where the tree has no .git (the device machine)")
    parser.add_argument("--graph", action="store_true", help="per-layer times inside a captured CUDA graph")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_block_attention: no CUDA device; nothing to time")
        return 0
    if args.graph:
        report = {**provenance(args.commit), "settings": {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
                                                          "block": BLOCK, "dtype": "bfloat16", "layers": LAYERS,
                                                          "splits": labels_of(SPLITS),
                                                          "decode_kv_splits": DECODE_KV_SPLITS},
                  "graph_cases": []}
        bench_in_graphs(report)
        write_report(report, args.out)
        return 0
    from dflash_sglang.ops.block_attention import block_attention

    timer = Timer(warmup=5, reps=100, max_seconds=2.0)
    report = {**provenance(args.commit), "settings": {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
                                                      "block": BLOCK, "dtype": "bfloat16"}, "cases": []}
    print(f"{'batch':>5} {'prefix':>6} {'mask':>6} {'dflash us':>10} {'sglang us':>10} {'speedup':>8}")
    for causal in (True, False):
        for prefix in PREFIXES:
            for batch in BATCHES:
                inputs = case_inputs(batch, prefix)
                ours, theirs = torch.empty_like(inputs["q"]), torch.empty_like(inputs["q"])

                def run_ours() -> None:
                    block_attention(**inputs, block_size=BLOCK, causal=causal, sm_scale=HEAD_DIM ** -0.5, out=ours)

                run_ours()
                sglang_extend(inputs, causal, theirs)
                torch.testing.assert_close(ours, theirs, rtol=2e-2, atol=2e-2)
                ours_us, theirs_us = timer(run_ours), timer(lambda: sglang_extend(inputs, causal, theirs))
                case = {"batch": batch, "prefix": prefix, "causal": causal, "dflash_us": ours_us,
                        "sglang_extend_us": theirs_us, "speedup": theirs_us / ours_us}
                report["cases"].append(case)
                print(f"{batch:>5} {prefix:>6} {'causal' if causal else 'full':>6} {ours_us:>10.1f} "
                      f"{theirs_us:>10.1f} {theirs_us / ours_us:>7.1f}x", flush=True)
                write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
