# SPDX-License-Identifier: Apache-2.0
"""GPU end-to-end check: serve the tiny checkpoints with and without DFLASH on a GPU and compare greedy
outputs over a batch of concurrent prompts, for each requested draft attention backend and drafter.

    python scripts/gpu_e2e.py --out results.json [--draft-backends triton flashinfer] [--cuda-graph]

Writes a JSON report (device, versions, commit, settings; per case: identical, mismatches, acceptance
length, wall time of both servers) and exits non-zero if any greedy output differs.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dflash_sglang.launch import ServerProcess  # noqa: E402
from dflash_sglang.tiny import write_tiny_checkpoints  # noqa: E402

PROMPTS = [f"{'one two three ' * (i % 5)}Tell me about item number {i} and why it" for i in range(16)]


def run_batch(server: ServerProcess, max_new_tokens: int, concurrent_requests: bool = True
              ) -> tuple[list[list[int]], list[dict], float]:
    """All prompts at once (one batch) or one after another (batch size 1)."""
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS) if concurrent_requests else 1) as pool:
        results = list(pool.map(lambda p: server.generate_greedy(p, max_new_tokens), PROMPTS))
    return [r[0] for r in results], [r[1] for r in results], time.perf_counter() - start


def mismatches(a: list[list[int]], b: list[list[int]]) -> list[int]:
    return [i for i, (x, y) in enumerate(zip(a, b)) if x != y]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--draft-backends", nargs="+", default=["triton"])
    parser.add_argument("--drafters", nargs="+", default=["drafter", "drafter-agree"])
    parser.add_argument("--target-backend", default="triton")
    parser.add_argument("--cuda-graph", action="store_true", help="leave SGLang's CUDA graphs on")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--logs", default=None, help="folder for server logs (default: a temp folder)")
    args = parser.parse_args()

    import torch

    work = tempfile.mkdtemp(prefix="dflash-gpu-e2e-")
    logs = args.logs or work
    os.makedirs(logs, exist_ok=True)
    checkpoints = write_tiny_checkpoints(os.path.join(work, "tiny"), block_size=8)
    common = ["--model-path", checkpoints["target"], "--device", "cuda", "--attention-backend", args.target_backend,
              "--dtype", "bfloat16", "--mem-fraction-static", "0.15", "--max-total-tokens", "32768",
              "--grammar-backend", "none", "--skip-server-warmup", "--disable-piecewise-cuda-graph",
              "--cuda-graph-max-bs", "16", "--random-seed", "0"]
    if not args.cuda_graph:
        common.append("--disable-cuda-graph")
    report = {
        "device": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
        "python": platform.python_version(), "commit": _commit(), "settings": vars(args), "cases": [],
    }
    failed = False
    with ServerProcess(common, log_path=os.path.join(logs, "baseline.log")) as baseline:
        base_ids, _, base_time = run_batch(baseline, args.max_new_tokens)
        base_ids_again, _, base_time = run_batch(baseline, args.max_new_tokens)  # warm timing
        base_seq, _, base_seq_time = run_batch(baseline, args.max_new_tokens, concurrent_requests=False)
        # Batched GPU kernels round differently with the batch's composition: near-tied logits of a random
        # tiny model can flip. Record how stable the baseline itself is next to DFLASH's agreement with it.
        report["baseline_batch_vs_batch_mismatches"] = mismatches(base_ids, base_ids_again)
        report["baseline_batch_vs_sequential_mismatches"] = mismatches(base_ids, base_seq)
        for backend in args.draft_backends:
            for drafter in args.drafters:
                extra = ["--speculative-algorithm", "DFLASH", "--speculative-draft-model-path", checkpoints[drafter],
                         "--speculative-draft-attention-backend", backend]
                name = f"dflash-{backend}-{drafter}"
                case = {"draft_backend": backend, "drafter": drafter}
                try:
                    with ServerProcess(common + extra, log_path=os.path.join(logs, f"{name}.log")) as server:
                        run_batch(server, args.max_new_tokens)  # warm-up
                        spec_ids, metas, spec_time = run_batch(server, args.max_new_tokens)
                        spec_seq, _, spec_seq_time = run_batch(server, args.max_new_tokens, concurrent_requests=False)
                except Exception as error:  # a server that fails to start is a failed case, reported
                    case.update(identical=False, error=str(error)[-4000:])
                    report["cases"].append(case)
                    failed = True
                    continue
                batch_diff = mismatches(spec_ids, base_ids)
                sequential_diff = mismatches(spec_seq, base_seq)
                accept = [m.get("spec_accept_length", 0.0) for m in metas]
                # Exact check: one request at a time (no batch-composition rounding). Batched outputs are
                # reported next to the baseline's own batch-to-batch instability.
                case.update(identical=not sequential_diff, batch_mismatches=batch_diff,
                            sequential_mismatches=sequential_diff, mean_accept_length=sum(accept) / len(accept),
                            baseline_batch_wall_s=base_time, dflash_batch_wall_s=spec_time,
                            baseline_sequential_wall_s=base_seq_time, dflash_sequential_wall_s=spec_seq_time)
                report["cases"].append(case)
                failed |= bool(sequential_diff)
                print(json.dumps(case), flush=True)
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
    print(f"{'FAILED' if failed else 'OK'}: {len(report['cases'])} cases -> {args.out}")
    return 1 if failed else 0


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
