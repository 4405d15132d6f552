# SPDX-License-Identifier: Apache-2.0
"""What one DFLASH decode step costs against one plain decoding step of the same target, at real sizes.

    python scripts/bench_step.py --out bench/results/step-h100.json [--pairs qwen3-8b qwen3-4b]
                                 [--concurrency 1 8 32] [--no-torch-path]

Each pair is a target and its DFlash drafter at their published shapes, served by SGLang with
``--load-format dummy`` (random weights, so nothing is downloaded) and CUDA graphs on. For each pair the
script starts, one after another: the target alone (AR), the target with DFLASH using the CUDA extension
(once per ``--draft-attention-backends`` entry; SGLang's overlap scheduler on, as for AR), with
``--v1-loop`` DFLASH's host-committed loop (``--disable-overlap-schedule``), and (unless ``--no-torch-path``)
DFLASH with ``DFLASH_KERNELS=off`` (the PyTorch path). At every
concurrency c it sends c requests of ``--input-len`` random tokens twice, with ``--short`` and ``--long``
new tokens (``ignore_eos``), and takes

    step time = (wall(long) - wall(short)) / (steps(long) - steps(short)),

where steps are decode steps (AR: output tokens - 1; DFLASH: SGLang's ``spec_verify_ct``). The difference
cancels prefill, request set-up and HTTP. It is the whole scheduler loop, host work included. DFLASH runs
with ``DFLASH_STEP_PROFILE`` set, so the worker also reports where its step goes (prepare, drafter pass,
target verify pass, accept, KV injection, commit, and the scheduler's time between steps): medians of
its records for that batch size. With ``--trace-steps N`` each server also records a torch.profiler trace
of N steps (``--trace-concurrency``) through SGLang's /start_profile: GPU busy vs idle time per step, each
CUDA graph's GPU span, eager kernels and host synchronizations (dflash_sglang.bench.trace).
Random weights accept ~nothing, so each DFLASH step emits ~1 token;
the step's cost does not depend on that (the block is always drafted and verified in full).

Reported: step_DFLASH / step_AR per concurrency, and the projected speedup tau * step_AR / step_DFLASH
for acceptance lengths tau next to the speedups the paper publishes for the pair.

Shapes. Qwen3-8B and Qwen3-4B are their published config.json values. The drafters
(z-lab/Qwen3-8B-DFlash-b16, z-lab/Qwen3-4B-DFlash-b16) are 5 Qwen3 layers at the target's hidden size,
heads and head_dim (bench_kernels.py records the source); their intermediate size is taken equal to the
target's and their target_layer_ids follow the reference's default rule (5 ids evenly spaced over
[1, num_layers - 3]): both ASSUMED, as their config.json files were not readable offline.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dflash_sglang.bench.trace import load_events, summarize_trace  # noqa: E402
from dflash_sglang.deploy.launch import ServerProcess  # noqa: E402
from dflash_sglang.bench.provenance import provenance, write_report  # noqa: E402


@dataclass(frozen=True)
class Pair:
    target: dict
    drafter_layers: int
    published_speedups: dict[str, float]  # benchmark -> speedup over AR (paper, greedy)


def qwen3_config(hidden: int, layers: int, intermediate: int, tie: bool) -> dict:
    return {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": hidden,
            "num_hidden_layers": layers, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
            "intermediate_size": intermediate, "vocab_size": 151936, "max_position_embeddings": 40960,
            "rms_norm_eps": 1e-6, "rope_theta": 1000000, "rope_scaling": None, "hidden_act": "silu",
            "attention_bias": False, "tie_word_embeddings": tie, "torch_dtype": "bfloat16",
            "bos_token_id": 151643, "eos_token_id": 151645}


PAIRS = {
    "qwen3-8b": Pair(qwen3_config(4096, 36, 12288, tie=False), 5,
                     {"gsm8k": 5.20, "math500": 6.17, "aime24": 5.91, "aime25": 5.85, "humaneval": 5.20,
                      "mbpp": 4.75}),
    "qwen3-4b": Pair(qwen3_config(2560, 36, 9728, tie=True), 5, {}),
}
BLOCK_SIZE = 16
MASK_TOKEN_ID = 151669
TAUS = (4.0, 6.5, 8.0)
NOISY_SPREAD = 0.1  # (max - min) / median of a concurrency's samples above which the run says so


def default_target_layer_ids(num_target_layers: int, num_draft_layers: int) -> list[int]:
    """The reference's default: ids evenly spaced (rounded) over [1, num_target_layers - 3]."""
    low, high = 1, num_target_layers - 3
    return [round(low + i * (high - low) / (num_draft_layers - 1)) for i in range(num_draft_layers)]


def drafter_config(pair: Pair) -> dict:
    target = pair.target
    config = {key: target[key] for key in ("model_type", "hidden_size", "num_attention_heads", "num_key_value_heads",
                                           "head_dim", "intermediate_size", "vocab_size", "max_position_embeddings",
                                           "rms_norm_eps", "rope_theta", "hidden_act", "attention_bias")}
    layer_ids = default_target_layer_ids(target["num_hidden_layers"], pair.drafter_layers)
    config.update(architectures=["DFlashDraftModel"], num_hidden_layers=pair.drafter_layers, block_size=BLOCK_SIZE,
                  num_target_layers=target["num_hidden_layers"], tie_word_embeddings=False,
                  layer_types=["full_attention"] * pair.drafter_layers, torch_dtype="bfloat16",
                  dflash_config={"block_size": BLOCK_SIZE, "mask_token_id": MASK_TOKEN_ID,
                                 "target_layer_ids": layer_ids})
    return config


def write_model_dir(path: str, config: dict) -> str:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2)
    return path


@dataclass
class Run:
    wall_s: float
    steps: float  # mean decode steps per request
    tokens: int


def run_requests(server: ServerProcess, prompts: list[list[int]], new_tokens: int, speculative: bool) -> Run:
    def one(prompt: list[int]) -> dict:
        return server.generate({"input_ids": prompt, "sampling_params": {
            "max_new_tokens": new_tokens, "temperature": 0, "ignore_eos": True}})

    start = time.perf_counter()
    with ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(one, prompts))
    wall = time.perf_counter() - start
    metas = [r["meta_info"] for r in results]
    tokens = sum(m["completion_tokens"] for m in metas)
    if speculative:
        steps = statistics.mean(m["spec_verify_ct"] for m in metas)
    else:
        steps = statistics.mean(m["completion_tokens"] - 1 for m in metas)
    return Run(wall, steps, tokens)


def random_prompts(count: int, length: int, rng: random.Random) -> list[list[int]]:
    """``count`` prompts of ``length`` random token ids (random weights: their content does not matter)."""
    return [[rng.randrange(1000, 150000) for _ in range(length)] for _ in range(count)]


def measure_step_ms(server: ServerProcess, concurrency: int, args, speculative: bool, rng: random.Random) -> dict:
    prompts = random_prompts(concurrency, args.input_len, rng)
    run_requests(server, prompts, args.short, speculative)  # warm-up (graphs, allocator)
    samples = []
    for _ in range(args.repeats):
        short = run_requests(server, prompts, args.short, speculative)
        long = run_requests(server, prompts, args.long, speculative)
        samples.append((long.wall_s - short.wall_s) / (long.steps - short.steps) * 1e3)
    step_ms = statistics.median(samples)
    spread = (max(samples) - min(samples)) / step_ms
    if spread > NOISY_SPREAD:
        print(f"  note: c={concurrency} samples {[round(x, 3) for x in samples]} ms differ by {100 * spread:.0f}%: "
              "more --repeats or a longer --long", flush=True)
    return {"step_ms": step_ms, "step_ms_samples": samples, "step_ms_spread": spread,
            "tokens_per_step": (long.tokens - short.tokens) / concurrency / (long.steps - short.steps)}


def record_trace(server: ServerProcess, concurrency: int, args, speculative: bool, rng: random.Random,
                 name: str) -> dict:
    """A torch.profiler trace of the first ``--trace-steps`` decode steps of a batch at this concurrency
    (SGLang's /start_profile by stage: the prefill and the decode steps go to separate files), kept under
    ``--trace-dir`` and summarized (dflash_sglang.bench.trace)."""
    prompts = random_prompts(concurrency, args.input_len, rng)
    directory = os.path.abspath(os.path.join(args.trace_dir, name))
    os.makedirs(directory, exist_ok=True)
    server.post("/start_profile", {"output_dir": directory, "num_steps": args.trace_steps, "with_stack": False,
                                   "record_shapes": False, "activities": ["CPU", "GPU"], "profile_prefix": name,
                                   "profile_by_stage": True})
    # Enough tokens that the batch outlives the profiled steps even if every draft is accepted.
    run_requests(server, prompts, max(args.long, 2 * args.trace_steps * 16), speculative)
    for _ in range(60):  # the scheduler writes the trace after the last profiled step
        traces = [f for f in os.listdir(directory) if f.endswith("-DECODE.trace.json.gz")]
        if traces:
            break
        time.sleep(1.0)
    else:
        return {"error": f"no decode trace written under {directory}"}
    time.sleep(2.0)
    path = os.path.join(directory, sorted(traces)[-1])
    try:
        return {"file": path, **summarize_trace(load_events(path), graphs_per_step=2 if speculative else 1)}
    except (ValueError, OSError, EOFError) as error:
        return {"file": path, "error": str(error)}


def read_profile(path: str) -> dict[int, dict]:
    """Medians, per batch size, of the worker's step-profile records (dflash_sglang.serving.step_profile)."""
    if not os.path.exists(path):
        return {}
    by_bs: dict[int, list[dict]] = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            by_bs.setdefault(record["batch_size"], []).append(record)
    summary = {}
    for bs, records in by_bs.items():
        parts = {part: statistics.median(r["parts_ms"][part] for r in records) for part in records[0]["parts_ms"]}
        summary[bs] = {"records": len(records), "parts_ms": parts,
                       "step_wall_ms": statistics.median(r["step_wall_ms"] for r in records),
                       "between_steps_ms": statistics.median(r["between_steps_ms"] for r in records)}
    return summary


def serve_and_measure(name: str, args_list: list[str], env: dict, concurrencies: list[int], args, work: str,
                      speculative: bool) -> dict:
    profile = os.path.join(work, f"{name}.profile.jsonl")
    env = {**env, "DFLASH_STEP_PROFILE": profile} if speculative else env
    results: dict = {}
    with ServerProcess(args_list, log_path=os.path.join(args.logs, f"{name}.log"), env=env) as server:
        for c in concurrencies:
            results[str(c)] = measure_step_ms(server, c, args, speculative, random.Random(c))
            print(f"{name:>16} c={c:<3} step {results[str(c)]['step_ms']:.3f} ms", flush=True)
            if args.trace_steps and c in args.trace_concurrency:
                trace = record_trace(server, c, args, speculative, random.Random(c), f"{name}-c{c}")
                results[str(c)]["trace"] = trace
                print(f"{name:>16} c={c:<3} trace {json.dumps(trace)}", flush=True)
    for bs, summary in read_profile(profile).items():
        if str(bs) in results:
            results[str(bs)]["profile"] = summary
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--short", type=int, default=32)
    parser.add_argument("--long", type=int, default=320)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--attention-backend", default="triton")
    parser.add_argument("--draft-attention-backends", nargs="+", default=["triton"],
                        help="one DFLASH run per drafter attention backend (the first also runs --torch-path)")
    parser.add_argument("--no-torch-path", action="store_true", help="skip the DFLASH_KERNELS=off run")
    parser.add_argument("--v1-loop", action="store_true",
                        help="also run DFLASH without the overlap scheduler (--disable-overlap-schedule: the "
                             "host-committed v1 loop), with the first drafter backend")
    parser.add_argument("--logs", default=None)
    parser.add_argument("--trace-steps", type=int, default=0,
                        help="also record a torch.profiler trace of this many decode steps per server and summarize it")
    parser.add_argument("--trace-concurrency", nargs="+", type=int, default=[1])
    parser.add_argument("--trace-dir", default="traces")
    parser.add_argument("--commit", help="commit to record where the tree has no .git (the device machine)")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("bench_step.py measures GPU decode steps; no CUDA device here")
        return 0
    work = tempfile.mkdtemp(prefix="dflash-bench-step-")
    args.logs = args.logs or work
    os.makedirs(args.logs, exist_ok=True)
    report = {**provenance(args.commit), "settings": vars(args), "pairs": {}}
    for pair_name in args.pairs:
        pair = PAIRS[pair_name]
        target = write_model_dir(os.path.join(work, pair_name, "target"), pair.target)
        drafter = write_model_dir(os.path.join(work, pair_name, "drafter"), drafter_config(pair))
        common = ["--model-path", target, "--load-format", "dummy", "--skip-tokenizer-init", "--dtype", "bfloat16",
                  "--attention-backend", args.attention_backend, "--mem-fraction-static", "0.7",
                  "--cuda-graph-max-bs", str(max(args.concurrency)), "--max-running-requests",
                  str(max(args.concurrency)), "--context-length", "4096", "--skip-server-warmup",
                  "--random-seed", "0"]
        runs = {"ar": (common, {}, False)}
        for i, backend in enumerate(args.draft_attention_backends):
            dflash = common + ["--speculative-algorithm", "DFLASH", "--speculative-draft-model-path", drafter,
                               "--speculative-draft-attention-backend", backend]
            suffix = "" if i == 0 else f"_{backend}_draft"
            runs[f"dflash{suffix}"] = (dflash, {"DFLASH_KERNELS": "on"}, True)
            if i == 0 and args.v1_loop:
                runs["dflash_v1_loop"] = (dflash + ["--disable-overlap-schedule"], {"DFLASH_KERNELS": "on"}, True)
            if i == 0 and not args.no_torch_path:
                runs["dflash_torch_path"] = (dflash, {"DFLASH_KERNELS": "off"}, True)
        results: dict = {}
        report["pairs"][pair_name] = {"results": results, "drafter_config": drafter_config(pair)}
        for mode, (server_args, env, speculative) in runs.items():
            results[mode] = serve_and_measure(f"{pair_name}-{mode}", server_args, {**os.environ, **env},
                                              args.concurrency, args, work, speculative)
            report["pairs"][pair_name]["summary"] = summarize(results, pair)
            write_report(report, args.out)
        print(json.dumps(report["pairs"][pair_name]["summary"], indent=1), flush=True)
    print(f"wrote {args.out}")
    return 0


def summarize(results: dict, pair: Pair) -> dict:
    summary = {}
    for c, ar in results.get("ar", {}).items():
        row = {"step_ar_ms": ar["step_ms"]}
        for mode in results:
            if mode != "ar":
                ratio = results[mode][c]["step_ms"] / ar["step_ms"]
                row[f"step_{mode}_ms"] = results[mode][c]["step_ms"]
                row[f"ratio_{mode}_over_ar"] = ratio
                row[f"projected_speedup_{mode}"] = {str(tau): tau / ratio for tau in TAUS}
                # From the traces (where both were recorded): the ratio if no step waited for the host.
                busy, ar_busy = (r.get("trace", {}).get("gpu_busy_ms") for r in (results[mode][c], ar))
                if busy and ar_busy:
                    row[f"gpu_busy_ratio_{mode}_over_ar"] = busy / ar_busy
        summary[c] = row
    return {"by_concurrency": summary, "published_speedups": pair.published_speedups}


if __name__ == "__main__":
    sys.exit(main())
