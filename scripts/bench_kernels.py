# SPDX-License-Identifier: Apache-2.0
"""Times the dflash CUDA kernels against the PyTorch paths they replace, at real drafter shapes.

* ``inject_kv`` vs ``ops.reference.inject_kv_ref`` and vs the "realistic unfused torch" path an engine would
  run without the fused kernel (per layer: RMSNorm, rotate-half RoPE, cast, ``index_put`` into the cache), at
  decode sizes (batch 1..256 x block 16 context tokens) and a prefill of 8192 tokens.
* ``verify_block`` vs ``ops.reference.verify_block_ref`` (on the same GPU tensors), greedy and sampling
  (vocab 151936 and 262144), batch 1..256, block 16.
* ``ops.argmax`` (Triton, ``ops/argmax_kernel.py``) vs ``torch.argmax``: the greedy choices of a step, 15 (drafts) and
  16 (target) rows per request over vocab 151936, batch 1..256.

Times are CUDA-event medians of many repetitions after warm-up, with L2 flushed between repetitions (a
256 MiB write outside the timed region). The card's device-to-device copy bandwidth (bytes read + written)
is measured in the same run, and each kernel's achieved GB/s (its minimum bytes moved over its time) is
printed against it. A table goes to stdout and everything to JSON (``--out``). Without CUDA it says so
and exits 0.

Drafter shapes:

* Qwen3-8B DFlash-b16 drafter (z-lab/Qwen3-8B-DFlash-b16): hidden 4096, 5 layers, 32 heads, 8 kv heads,
  head_dim 128, vocab 151936 (the target's).
* Gemma-4-26B-A4B drafter (z-lab/gemma-4-26B-A4B-it-DFlash): its config.json was NOT in the searchable
  corpus (searched 2026-11: docs/pages/code corpora and the repo index for the model id; no file of the
  repo is indexed). What was found: a survey in the code corpus says every z-lab drafter, the Gemma-4
  ones included, is a qwen3-architecture 5-layer decoder; ji-farthing/gemma-4-26B-A4B-it-DFlash-SWA-ik-llama
  -GGUF's model card (graysoft.dev) gives 5 layers, 4 sliding (window 2048) + 1 full attention; the target
  google/gemma-4-26B-A4B-it has hidden 2816, 16 heads, 8 kv heads, head_dim 256 on its sliding layers and
  vocab 262144 (several configs in the code corpus). ASSUMED here: hidden 2816, 5 layers, 16 heads, 8 kv
  heads, head_dim 256. TODO(kernels): replace with the real config.json values when available.

Usage: ``python scripts/bench_kernels.py [--out PATH] [--quick]``
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from dflash_sglang.bench.provenance import git_commit  # noqa: E402


@dataclass(frozen=True)
class DrafterShape:
    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int


DRAFTERS = (
    DrafterShape("qwen3-8b-dflash-b16", 4096, 5, 32, 8, 128, 151936),
    DrafterShape("gemma-4-26b-a4b-dflash (assumed)", 2816, 5, 16, 8, 256, 262144),
)
BLOCK_SIZE = 16
DECODE_BATCHES = (1, 4, 16, 64, 256)
PREFILL_TOKENS = 8192
EPS = 1e-6


class Timer:
    """Median CUDA-event time of fn(), L2 flushed before each repetition."""

    def __init__(self, warmup: int, reps: int, max_seconds: float):
        self.warmup, self.reps, self.max_seconds = warmup, reps, max_seconds
        self.flush_buffer = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device="cuda")

    def __call__(self, fn) -> float:
        """Median microseconds."""
        began = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        if time.perf_counter() - began < 0.05:  # slow paths (the Python references) need no more warm-up
            for _ in range(self.warmup - 1):
                fn()
            torch.cuda.synchronize()
        times, began = [], time.perf_counter()
        for _ in range(self.reps):
            self.flush_buffer.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
            if len(times) >= 3 and time.perf_counter() - began > self.max_seconds:
                break
        return statistics.median(times)


def copy_bandwidth(timer: Timer) -> float:
    """Device-to-device copy GB/s, counting bytes read plus bytes written."""
    src = torch.randn(256 * 1024 * 1024, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    us = timer(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (us * 1e-6) / 1e9


# ------------------------------------------------------------------------------------------------------
# inject_kv


def cos_sin_cache(max_position: int, head_dim: int) -> torch.Tensor:
    inv_freq = 1.0 / 1e6 ** (torch.arange(0, head_dim, 2, device="cuda", dtype=torch.float32) / head_dim)
    angles = torch.arange(max_position, device="cuda", dtype=torch.float32)[:, None] * inv_freq
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def unfused_inject_kv(kv, positions, slots, k_norm_weight, cos_sin, k_cache, v_cache, eps) -> None:
    """What an engine runs without the fused kernel: per layer RMSNorm, RoPE, cast, index_put (no padding)."""
    half = kv.shape[-1] // 2
    cos_sin_rows = cos_sin[positions]  # [N, D]
    cos, sin = cos_sin_rows[:, None, :half], cos_sin_rows[:, None, half:]
    for layer in range(kv.shape[1]):
        k = kv[:, layer, 0].float()  # [N, H, D]
        k = (k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + eps)).to(kv.dtype) * k_norm_weight[layer]
        k1, k2 = k[..., :half].float(), k[..., half:].float()
        k = torch.cat([k1 * cos - k2 * sin, k2 * cos + k1 * sin], dim=-1)
        k_cache[layer][slots] = k.to(k_cache.dtype)
        v_cache[layer][slots] = kv[:, layer, 1].to(v_cache.dtype)


def bench_inject_kv(timer: Timer, drafter: DrafterShape, num_tokens: int, label: str, copy_gbs: float) -> dict:
    from dflash_sglang.ops.reference import inject_kv_ref

    L, H, D = drafter.num_layers, drafter.num_kv_heads, drafter.head_dim
    dtype = torch.bfloat16
    num_slots = max(4 * num_tokens, 65536)
    kv = torch.randn(num_tokens, L, 2, H, D, device="cuda").to(dtype)
    positions = torch.randint(0, 32768, (num_tokens,), device="cuda")
    slots = torch.randperm(num_slots, device="cuda")[:num_tokens]
    weight = (1 + 0.1 * torch.randn(L, D, device="cuda")).to(dtype)
    cos_sin = cos_sin_cache(32768, D)
    k_cache = torch.randn(L, num_slots, H, D, device="cuda").to(dtype)
    v_cache = torch.randn_like(k_cache)
    args = (kv, positions, slots, weight, cos_sin, k_cache, v_cache, EPS)
    kernel_us = timer(lambda: torch.ops.dflash.inject_kv(*args))
    ref_us = timer(lambda: inject_kv_ref(*args))
    unfused_us = timer(lambda: unfused_inject_kv(*args))
    elem = kv.element_size()
    bytes_moved = num_tokens * (L * 2 * H * D * (elem + k_cache.element_size()) + D * 4 + 16)
    gbs = bytes_moved / (kernel_us * 1e-6) / 1e9
    return dict(op="inject_kv", drafter=drafter.name, case=label, num_tokens=num_tokens, layers=L, kv_heads=H,
                head_dim=D, dtype=str(dtype), kernel_us=kernel_us, reference_us=ref_us, unfused_us=unfused_us,
                speedup_vs_reference=ref_us / kernel_us, speedup_vs_unfused=unfused_us / kernel_us,
                bytes=bytes_moved, kernel_gbs=gbs, fraction_of_copy_bw=gbs / copy_gbs)


# ------------------------------------------------------------------------------------------------------
# verify_block


def bench_verify_block(timer: Timer, bs: int, vocab: int | None, copy_gbs: float, label: str) -> dict:
    from dflash_sglang.ops.reference import verify_block_ref

    B = BLOCK_SIZE
    gen = torch.Generator(device="cuda").manual_seed(bs)
    block_slots = torch.randperm(bs * B * 4, device="cuda")[:bs * B].view(bs, B)
    prefix_lens = torch.randint(0, 32768, (bs,), device="cuda")
    stop_ids = torch.tensor([[1, 106, -1]], device="cuda").expand(bs, 3).contiguous()
    budgets = torch.full((bs,), 1024, dtype=torch.int64, device="cuda")
    empty_long, empty_float = torch.empty(0, dtype=torch.int64, device="cuda"), torch.empty(0, device="cuda")
    if vocab is None:  # greedy: about half the drafts accepted
        vocab_ids = 151936
        target_ids = torch.randint(2, vocab_ids, (bs, B), device="cuda", generator=gen)
        block_tokens = torch.randint(2, vocab_ids, (bs, B), device="cuda", generator=gen)
        keep = torch.rand(bs, B - 1, device="cuda", generator=gen) < 0.85
        block_tokens[:, 1:] = torch.where(keep, target_ids[:, :-1], block_tokens[:, 1:])
        op_args = (block_tokens, target_ids, empty_float, empty_float, empty_float, block_slots, prefix_lens,
                   stop_ids, budgets)
        ref_args = (block_tokens, target_ids, None, None, None, block_slots, prefix_lens, stop_ids, budgets)
    else:
        target_probs = torch.softmax(torch.randn(bs, B, vocab, device="cuda", generator=gen) * 3, dim=-1)
        draft_probs = torch.softmax(torch.randn(bs, B - 1, vocab, device="cuda", generator=gen) * 3, dim=-1)
        # Drafts from a mixture leaning on the target, so that blocks are partly accepted.
        draft_probs = 0.2 * draft_probs + 0.8 * target_probs[:, :-1]
        block_tokens = torch.randint(2, vocab, (bs, B), device="cuda", generator=gen)
        block_tokens[:, 1:] = torch.multinomial(draft_probs.view(-1, vocab), 1, generator=gen).view(bs, B - 1)
        uniforms = torch.rand(bs, B, device="cuda", generator=gen)
        op_args = (block_tokens, empty_long, target_probs, draft_probs, uniforms, block_slots, prefix_lens, stop_ids,
                   budgets)
        ref_args = (block_tokens, None, target_probs, draft_probs, uniforms, block_slots, prefix_lens, stop_ids,
                    budgets)
    kernel_us = timer(lambda: torch.ops.dflash.verify_block(*op_args))
    ref_us = timer(lambda: verify_block_ref(*ref_args))
    num_accepted = torch.ops.dflash.verify_block(*op_args)[0]
    row = dict(op="verify_block", case=label, batch=bs, block_size=B, vocab=vocab, kernel_us=kernel_us,
               reference_us=ref_us, speedup_vs_reference=ref_us / kernel_us,
               mean_accepted=float(num_accepted.float().mean()))
    if vocab is not None:
        # Minimum bytes: the accept look-ups plus one pass over the bonus row(s) (p, and q when rejected).
        rejected = int((num_accepted < B - 1).sum())
        bytes_moved = (bs + rejected) * vocab * 4 + bs * B * 8 * 6
        gbs = bytes_moved / (kernel_us * 1e-6) / 1e9
        row.update(bytes=bytes_moved, kernel_gbs=gbs, fraction_of_copy_bw=gbs / copy_gbs)
    return row


# ------------------------------------------------------------------------------------------------------


def bench_argmax(timer: Timer, rows: int, vocab: int, copy_gbs: float, label: str) -> dict:
    from dflash_sglang.ops import argmax_kernel as triton_argmax

    logits = torch.randn(rows, vocab, device="cuda")
    assert torch.equal(triton_argmax.argmax(logits), logits.argmax(-1))
    kernel_us = timer(lambda: triton_argmax.argmax(logits))
    torch_us = timer(lambda: logits.argmax(-1))
    gbs = logits.numel() * 4 / (kernel_us * 1e-6) / 1e9
    return {"op": "argmax", "mode": "argmax_ref = torch.argmax", "case": label, "kernel_us": kernel_us,
            "reference_us": torch_us, "speedup_vs_reference": torch_us / kernel_us, "kernel_gbs": gbs,
            "fraction_of_copy_bw": gbs / copy_gbs}


def print_table(rows: list[dict], copy_gbs: float) -> None:
    print(f"\ndevice-to-device copy: {copy_gbs:.0f} GB/s (read + write)\n")
    header = (f"{'op':<13}{'drafter / mode':<34}{'case':<18}{'kernel us':>10}{'ref us':>12}{'unfused us':>12}"
              f"{'x ref':>9}{'x unfused':>10}{'GB/s':>8}{'% copy':>8}")
    print(header)
    print("-" * len(header))
    for r in rows:
        unfused = r.get("unfused_us")
        unfused_us = f"{unfused:.1f}" if unfused else "-"
        x_unfused = f"{r['speedup_vs_unfused']:.1f}" if unfused else "-"
        gbs = f"{r['kernel_gbs']:.0f}" if "kernel_gbs" in r else "-"
        pct = f"{100 * r['fraction_of_copy_bw']:.0f}" if "kernel_gbs" in r else "-"
        name = r.get("drafter", r.get("mode", ""))
        print(f"{r['op']:<13}{name:<34}{r['case']:<18}{r['kernel_us']:>10.1f}{r['reference_us']:>12.1f}"
              f"{unfused_us:>12}{r['speedup_vs_reference']:>9.1f}{x_unfused:>10}{gbs:>8}{pct:>8}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="JSON path (default bench/results/kernels-<device>.json)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--reps", type=int, default=100)
    parser.add_argument("--max-seconds", type=float, default=2.0, help="per measurement, stops repeating after")
    parser.add_argument("--quick", action="store_true", help="fewer sizes (batch 1, 16, 256)")
    parser.add_argument("--commit", help="git commit to record (default: git rev-parse HEAD)")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA device visible to torch; nothing to benchmark (run on an sm_90 GPU).")
        return 0
    from dflash_sglang.ops._load import ExtensionUnavailable, load_ext

    try:
        load_ext()
    except ExtensionUnavailable as error:
        print(f"bench_kernels: the dflash CUDA extension is unavailable: {error}")
        return 0

    device_name = torch.cuda.get_device_name()
    timer = Timer(args.warmup, args.reps, args.max_seconds)
    copy_gbs = copy_bandwidth(timer)
    batches = (1, 16, 256) if args.quick else DECODE_BATCHES
    rows = []
    for drafter in DRAFTERS:
        for bs in batches:
            rows.append(bench_inject_kv(timer, drafter, bs * BLOCK_SIZE, f"decode bs={bs}", copy_gbs))
            print(f"inject_kv {drafter.name} bs={bs}: {rows[-1]['kernel_us']:.1f} us", flush=True)
        rows.append(bench_inject_kv(timer, drafter, PREFILL_TOKENS, f"prefill N={PREFILL_TOKENS}", copy_gbs))
    for mode, vocab in (("greedy", None), ("sampling V=151936", 151936), ("sampling V=262144", 262144)):
        for bs in batches:
            row = bench_verify_block(timer, bs, vocab, copy_gbs, f"bs={bs} B={BLOCK_SIZE}")
            row["mode"] = mode
            rows.append(row)
            print(f"verify_block {mode} bs={bs}: {row['kernel_us']:.1f} us", flush=True)
            torch.cuda.empty_cache()
    for bs in batches:
        for per_request in (BLOCK_SIZE - 1, BLOCK_SIZE):
            rows.append(bench_argmax(timer, bs * per_request, 151936, copy_gbs, f"rows={bs}x{per_request} V=151936"))
            print(f"argmax rows={bs}x{per_request}: {rows[-1]['kernel_us']:.1f} us "
                  f"(torch {rows[-1]['reference_us']:.1f} us)", flush=True)
    print_table(rows, copy_gbs)

    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    out = args.out or os.path.join(REPO, "bench", "results", f"kernels-{slug}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    result = dict(device=device_name, capability=list(torch.cuda.get_device_capability()), torch=torch.__version__,
                  cuda=torch.version.cuda, git_commit=git_commit(args.commit),
                  settings=dict(warmup=args.warmup, reps=args.reps, max_seconds=args.max_seconds, l2_flush_mib=256,
                                block_size=BLOCK_SIZE, batches=list(batches), prefill_tokens=PREFILL_TOKENS,
                                drafters=[d.__dict__ for d in DRAFTERS], dtype="bfloat16"),
                  copy_bandwidth_gbs=copy_gbs, cases=rows)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
