# SPDX-License-Identifier: Apache-2.0
"""Tunes SGLang's Triton fused-MoE kernel for one expert shape at the token counts DFLASH runs, on this GPU, and
writes the result where ``serving/patches/moe.py`` finds it (``dflash_sglang/serving/moe_configs/``).

    python scripts/tune_moe.py [--experts 128 --intermediate 704 --hidden 2816 --top-k 8]  # Gemma-4-26B-A4B
                               [--tokens 1 2 4 8 16 32 64 128 256 512] [--report tune.json] [--commit SHA]

Token counts: a decode step of ``b`` requests runs ``b`` tokens, a DFLASH verify pass ``16 b`` (the block).
For each count the script times SGLang's own ``fused_experts`` (bf16, the model's GELU-gated experts, random
weights and routing; medians of ``triton.testing.do_bench_cudagraph``) under every config of a pruned search space
(``override_config``), keeps the fastest, and reports it against SGLang's default config for the shape,
measured in the same run. The output file has SGLang's name for the shape and device
(``E=128,N=704,device_name=NVIDIA_H200.json``) under ``triton_<version>/``.

With ``--decode-mlp``, each count up to ``ops/decode_mlp_kernel.MAX_TOKENS`` also times the decode path of
``ops.decode_mlp`` (routing from the logits and the experts, two kernels) under each of its launch settings,
against SGLang's top-k (``fused_topk``) plus ``fused_experts`` at the count's best config, and on a dense MLP
(``--dense-intermediate``) against cuBLAS; the weight bytes read, at the device's copy bandwidth, are the floor
both are reported against (``--decode-mlp-only``: against SGLang's default config, tuning and writing nothing).
Reported, not written: the kernel's launch defaults live in ``ops/decode_mlp_kernel.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dflash_sglang.bench.provenance import provenance, write_report  # noqa: E402
from dflash_sglang.serving.patches.moe import PACKAGED_MOE_CONFIGS, triton_version_folder  # noqa: E402

# DFLASH's verify counts (16 x batch) and decode counts first, so a time-limited run tunes what it serves most
DEFAULT_TOKENS = [16, 128, 1, 8, 32, 512, 2, 4, 64, 256, 24, 48, 96]


def search_space(tokens: int, experts: int, top_k: int) -> list[dict]:
    """Kernel configs worth timing at ``tokens`` tokens. Block rows: up to twice the rows an expert gets on average
    (``tokens * top_k / experts``, at least 16), so small counts share one set of compiled kernels (the Triton
    compile, about a second a config, is what a tuning run spends most on: M is not a compile-time constant)."""
    rows_per_expert = -(-tokens * top_k // experts)
    rows = [m for m in (16, 32, 64, 128) if m <= max(16, 2 * rows_per_expert)]
    space = []
    for block_m, block_n, block_k, warps, stages in itertools.product(rows, (32, 64, 128), (64, 128, 256), (4, 8),
                                                                      (2, 3, 4)):
        space.append({"BLOCK_SIZE_M": block_m, "BLOCK_SIZE_N": block_n, "BLOCK_SIZE_K": block_k,
                      "GROUP_SIZE_M": 1 if tokens < 256 else 16, "num_warps": warps, "num_stages": stages})
    return space


def use_default_server_args() -> None:
    """SGLang's MoE code reads the server's arguments (deterministic inference, ...): outside a server, the
    defaults of ``ServerArgs``."""
    import dataclasses
    import types

    from sglang.srt.server_args import ServerArgs, set_global_server_args_for_scheduler

    defaults = {field.name: field.default for field in dataclasses.fields(ServerArgs)
                if field.default is not dataclasses.MISSING}
    set_global_server_args_for_scheduler(types.SimpleNamespace(**defaults))


def time_launches(x, w13, w2, logits, top_k: int, tanh_gelu: bool) -> tuple[list[dict], dict]:
    """Every launch setting of ``ops.decode_mlp``'s kernels on these inputs, timed in CUDA graphs with its largest
    error against ``decode_mlp_ref``, fastest first; and the entry of ``DEFAULT_LAUNCH``."""
    import triton

    from dflash_sglang.ops import decode_mlp_kernel
    from dflash_sglang.ops.reference import decode_mlp_ref

    expected = decode_mlp_ref(x.cpu(), w13.cpu(), w2.cpu(), None if logits is None else logits.cpu(), top_k,
                              tanh_gelu)
    launches = []
    for block_k, warps, per_sm in itertools.product((256, 512, 1024), (4, 8), (2, 4, 8)):
        launch = decode_mlp_kernel.Launch(block_k=block_k, num_warps=warps, programs_per_sm=per_sm)
        run = lambda: decode_mlp_kernel.decode_mlp(x, w13, w2, logits, top_k, tanh_gelu, launch)  # noqa: E731
        error = (run().float().cpu() - expected.float()).abs().max().item()
        microseconds = 1e3 * triton.testing.do_bench_cudagraph(run, rep=20, return_mode="median")
        launches.append({**dataclasses.asdict(launch), "us": microseconds, "max_abs_error": error})
    launches.sort(key=lambda entry: entry["us"])
    default = dataclasses.asdict(decode_mlp_kernel.DEFAULT_LAUNCH)
    return launches, next(entry for entry in launches if all(entry[k] == v for k, v in default.items()))


def time_decode_mlp(x, logits, w1, w2, top_k: int, runner, fused_config: dict, bandwidth_gbs: float) -> dict | None:
    """ops.decode_mlp's launch settings against SGLang's top-k + fused_experts (at ``fused_config``), in CUDA graphs,
    with the experts' weight-read floor at the copy bandwidth; None above the kernels' token count."""
    import triton
    from sglang.srt.layers.moe.fused_moe_triton import override_config
    from sglang.srt.layers.moe.fused_moe_triton.fused_moe import fused_experts
    from sglang.srt.layers.moe.topk import StandardTopKOutput, fused_topk

    from dflash_sglang.ops import decode_mlp_kernel

    if x.shape[0] > decode_mlp_kernel.MAX_TOKENS:
        return None
    logits = logits.to(x.dtype)

    def fused():
        weights, ids = fused_topk(x, logits, top_k, renormalize=True)
        return fused_experts(x, w1, w2, StandardTopKOutput(weights, ids, logits), runner)

    with override_config(fused_config):
        fused_us = 1e3 * triton.testing.do_bench_cudagraph(fused, rep=20, return_mode="median")
    expert_bytes = (w1[0].numel() + w2[0].numel()) * w1.element_size()
    unique_experts = logits.topk(top_k, dim=-1).indices.unique().numel()
    floor_us = unique_experts * expert_bytes / bandwidth_gbs / 1e3
    launches, default = time_launches(x, w1, w2, logits, top_k, tanh_gelu=False)
    print(f"  decode_mlp: best {launches[0]['us']:.1f} us {launches[0]}, default {default['us']:.1f} us; top-k + "
          f"fused_experts {fused_us:.1f} us; floor {floor_us:.1f} us ({unique_experts} experts)", flush=True)
    return {"fused_with_topk_us": fused_us, "floor_us": floor_us, "unique_experts": unique_experts,
            "default": default, "launches": launches}


def time_dense_mlp(x, inter: int, bandwidth_gbs: float) -> dict | None:
    """ops.decode_mlp's launch settings on a dense GELU(tanh)-gated MLP against cuBLAS's two GEMMs and SGLang's
    activation kernel, in CUDA graphs, with the weight-read floor; None above the kernels' token count."""
    import torch
    import torch.nn.functional as F
    import triton
    from sglang.srt.layers.activation import GeluAndMul

    from dflash_sglang.ops import decode_mlp_kernel

    if x.shape[0] > decode_mlp_kernel.MAX_TOKENS:
        return None
    hidden = x.shape[1]
    w13 = torch.randn(1, 2 * inter, hidden, device=x.device, dtype=x.dtype) * hidden ** -0.5
    w2 = torch.randn(1, hidden, inter, device=x.device, dtype=x.dtype) * inter ** -0.5
    act = GeluAndMul(approximate="tanh")
    gemms_us = 1e3 * triton.testing.do_bench_cudagraph(lambda: F.linear(act(F.linear(x, w13[0])), w2[0]), rep=20,
                                                       return_mode="median")
    floor_us = (w13.numel() + w2.numel()) * x.element_size() / bandwidth_gbs / 1e3
    launches, default = time_launches(x, w13, w2, None, 1, tanh_gelu=True)
    print(f"  dense {hidden}x{inter}: decode_mlp best {launches[0]['us']:.1f} us {launches[0]}, default "
          f"{default['us']:.1f} us; cuBLAS + act {gemms_us:.1f} us; floor {floor_us:.1f} us", flush=True)
    return {"gemms_us": gemms_us, "floor_us": floor_us, "default": default, "launches": launches}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--intermediate", type=int, default=704, help="per-expert intermediate size (N)")
    parser.add_argument("--hidden", type=int, default=2816)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--activation", default="gelu")
    parser.add_argument("--tokens", type=int, nargs="+", default=DEFAULT_TOKENS)
    parser.add_argument("--out-dir", default=PACKAGED_MOE_CONFIGS)
    parser.add_argument("--report", default=None, help="JSON with every count's best and default times")
    parser.add_argument("--commit", help="commit to record where the tree has no .git (the device machine)")
    parser.add_argument("--decode-mlp", action="store_true",
                        help="also time ops.decode_mlp's launch settings against top-k + fused_experts at decode "
                             "counts")
    parser.add_argument("--decode-mlp-only", action="store_true",
                        help="--decode-mlp against fused_experts at SGLang's default config, tuning nothing")
    parser.add_argument("--dense-intermediate", type=int, default=2112,
                        help="with --decode-mlp: the dense MLP's width (Gemma-4-26B-A4B's), timed against cuBLAS")
    parser.add_argument("--time-limit-s", type=float,
                        help="stop starting new token counts after this long (the file keeps the counts done)")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("tune_moe.py tunes a GPU kernel; no CUDA device here")
        return 0
    import triton
    from sglang.srt.layers.moe.fused_moe_triton import override_config
    from sglang.srt.layers.moe.fused_moe_triton.fused_moe import fused_experts
    from sglang.srt.layers.moe.fused_moe_triton.fused_moe_triton_config import (get_config_file_name,
                                                                                get_default_config)
    from sglang.srt.layers.moe.moe_runner import MoeRunnerConfig
    from sglang.srt.layers.moe.topk import StandardTopKOutput

    use_default_server_args()
    if args.decode_mlp or args.decode_mlp_only:  # the floors' bandwidth, measured once
        from dflash_sglang.bench.floor import measure_copy_bandwidth_gbs

        bandwidth_gbs = measure_copy_bandwidth_gbs()
    e, n, hidden, top_k = args.experts, args.intermediate, args.hidden, args.top_k
    generator = torch.Generator(device="cuda").manual_seed(0)
    w1 = torch.randn(e, 2 * n, hidden, device="cuda", dtype=torch.bfloat16, generator=generator) * hidden ** -0.5
    w2 = torch.randn(e, hidden, n, device="cuda", dtype=torch.bfloat16, generator=generator) * n ** -0.5
    runner = MoeRunnerConfig(num_experts=e, num_local_experts=e, hidden_size=hidden,
                             intermediate_size_per_partition=n, top_k=top_k, activation=args.activation,
                             inplace=False)
    best: dict[str, dict] = {}
    report = {**provenance(args.commit), "settings": vars(args), "tokens": {}}
    folder = os.path.join(args.out_dir, triton_version_folder(triton.__version__))
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, get_config_file_name(e, n, None))
    deadline = time.monotonic() + args.time_limit_s if args.time_limit_s else None
    for tokens in args.tokens:
        if deadline is not None and time.monotonic() > deadline:
            print(f"time limit: token counts from {tokens} on are not tuned", flush=True)
            break
        x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16, generator=generator)
        logits = torch.randn(tokens, e, device="cuda", dtype=torch.float32, generator=generator)
        weights, ids = torch.softmax(logits, dim=-1).topk(top_k, dim=-1)
        routing = StandardTopKOutput(weights / weights.sum(-1, keepdim=True), ids.to(torch.int32), logits)

        def time_config(config: dict) -> float:
            with override_config(config):  # in a CUDA graph, as the server runs it: timed eagerly, a few-token
                return triton.testing.do_bench_cudagraph(  # call is the CPU's launches (~200 us), not the GPU's
                    lambda: fused_experts(x, w1, w2, routing, runner), rep=20, return_mode="median")

        default = get_default_config(tokens, e, n, hidden, top_k, None, False, None)
        default_ms = time_config(default)
        timings = [(default_ms, default)]
        for config in [] if args.decode_mlp_only else search_space(tokens, e, top_k):
            try:
                timings.append((time_config(config), config))
            except (triton.runtime.errors.OutOfResources, RuntimeError):  # too much shared memory or registers
                continue
        best_ms, best_config = min(timings, key=lambda pair: pair[0])
        best[str(tokens)] = best_config
        report["tokens"][str(tokens)] = {"best_us": 1e3 * best_ms, "default_us": 1e3 * default_ms,
                                         "speedup_over_default": default_ms / best_ms, "best": best_config,
                                         "default": default, "configs_timed": len(timings)}
        print(f"tokens {tokens:4d}: best {1e3 * best_ms:8.1f} us, default {1e3 * default_ms:8.1f} us "
              f"({default_ms / best_ms:.2f}x) {best_config}", flush=True)
        if not args.decode_mlp_only:  # after every count, before the decode-MLP timings: a cut run keeps it
            with open(path, "w", encoding="utf-8") as handle:
                json.dump(best, handle, indent=2)
        if args.decode_mlp or args.decode_mlp_only:
            report["tokens"][str(tokens)]["decode_mlp"] = time_decode_mlp(x, logits, w1, w2, top_k, runner,
                                                                          best_config, bandwidth_gbs)
            report["tokens"][str(tokens)]["decode_mlp_dense"] = time_dense_mlp(x, args.dense_intermediate,
                                                                               bandwidth_gbs)
        if args.report:
            write_report(report, args.report)
    print("tuned nothing (--decode-mlp-only)" if args.decode_mlp_only else f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
