# SPDX-License-Identifier: Apache-2.0
"""What one DFLASH decode step costs against one plain decoding step on the CPU, for a CPU deployment file.

    python scripts/bench_step_cpu.py --launch configs/smollm2-cpu.yaml --out bench/results/smollm2-cpu/step.json
                                     [--input-len 192] [--new-tokens 48] [--repeats 3] [--trace-steps 8]

Starts, one after the other, the deployment's DFLASH server, the same with ``DFLASH_BLOCK_ATTENTION=off``
(SGLang's own torch_native attention loop for the block passes: the step as it was), and the deployment
without speculation (as ``scripts/bench_serving.py --launch`` does). Each gets ``--repeats`` streamed
requests at concurrency 1: one prompt of ``--input-len`` random token ids, ``--new-tokens`` greedy tokens,
``ignore_eos``. SGLang streams once per decode step, so the gaps between chunks are step times; the step is
their MEDIAN (a 2-core host shared with other work preempts the server now and then, which drags a mean).
The DFLASH servers run with ``DFLASH_STEP_PROFILE``: their step is also split into parts (prepare, drafter
pass, verify pass, KV injection, accept, and the scheduler's time between steps), medians per step. With
``--trace-steps N`` each server also records a CPU torch.profiler trace (record_shapes) of N decode steps
through SGLang's ``/start_profile``, summarized as the ops with the most self time per step
(``bench.trace.summarize_cpu_trace``).

Each server's scheduler CPU time per step is measured too: (CPU of a ``--new-tokens`` request - CPU of a
``--short-tokens`` one) / (their step difference), from ``/proc`` (psutil). With ``OMP_NUM_THREADS=1`` that is
the step's work, which other processes' load barely changes, where wall times on a shared host vary 2x.

Reported: the step times, the ratios DFLASH / plain (= the acceptance length, tokens per step, that a trained
drafter needs for a speedup > 1), the DFLASH parts and the top ops of each trace. Prints and writes the JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import sys
import tempfile
import time
import urllib.request

import psutil

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dflash_sglang.bench.provenance import provenance, write_report  # noqa: E402
from dflash_sglang.bench.trace import load_events, profile_decode_steps, summarize_cpu_trace  # noqa: E402
from dflash_sglang.deploy.deployment import (launch_env, load_deploy_config, resolve_backends,  # noqa: E402
                                             to_launch_args)
from dflash_sglang.deploy.launch import ServerProcess, free_port  # noqa: E402


# name -> (speculative, extra environment)
RUNS = {"dflash": (True, {}), "dflash_sglang_attention": (True, {"DFLASH_BLOCK_ATTENTION": "off"}),
        "plain": (False, {})}


def record_cpu_trace(server: ServerProcess, args, name: str) -> dict:
    """A CPU torch.profiler trace of ``--trace-steps`` decode steps at concurrency 1, summarized."""
    directory = os.path.abspath(os.path.join(args.work, f"trace-{name}"))
    # Random drafts are ~never accepted: a step emits ~1 token, and the request outlives the traced steps.
    path = profile_decode_steps(server, directory, name, args.trace_steps,
                                lambda: stream_steps(server, _prompt(args, seed=7), args.trace_steps + 8),
                                activities=["CPU"], record_shapes=True, wait_s=120, settle_s=3.0)
    if path is None:
        return {"error": f"no decode trace written under {directory}"}
    try:
        return summarize_cpu_trace(load_events(path), args.trace_steps)
    except (ValueError, OSError, EOFError) as error:
        return {"file": path, "error": str(error)}


def _prompt(args, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000, args.vocab_limit) for _ in range(args.input_len)]


def stream_steps(server: ServerProcess, prompt: list[int], new_tokens: int) -> list[tuple[float, int]]:
    """Streams one greedy request; returns (seconds since the previous chunk, tokens in the chunk) per decode
    chunk (the first chunk, which ends the prefill, is left out)."""
    body = {"input_ids": prompt, "stream": True,
            "sampling_params": {"max_new_tokens": new_tokens, "temperature": 0, "ignore_eos": True}}
    request = urllib.request.Request(f"{server.base_url}/generate", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    chunks, last_time, last_tokens = [], None, 0
    with urllib.request.urlopen(request, timeout=600) as response:
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            now, tokens = time.perf_counter(), json.loads(line[5:])["meta_info"]["completion_tokens"]
            if last_time is not None and tokens > last_tokens:
                chunks.append((now - last_time, tokens - last_tokens))
            last_time, last_tokens = now, tokens
    return chunks


def read_profile(path: str) -> dict | None:
    """The worker's step profile (``DFLASH_STEP_PROFILE``) at batch size 1: per part, the median over records of
    each record's per-step median."""
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as handle:
        records = [r for r in map(json.loads, handle) if r["batch_size"] == 1 and "parts_ms_median" in r]
    if not records:
        return None
    parts = {part: statistics.median(r["parts_ms_median"][part] for r in records)
             for part in records[-1]["parts_ms_median"]}
    cpu_parts = {part: statistics.median(r["parts_cpu_ms_median"][part] for r in records)
                 for part in records[-1].get("parts_cpu_ms_median", {})}
    return {"records": len(records), "steps": sum(r["steps"] for r in records), "parts_ms_median": parts,
            "parts_cpu_ms_median": cpu_parts,
            "step_wall_ms_median": statistics.median(r["step_wall_ms_median"] for r in records),
            "between_steps_ms_median": statistics.median(r["between_steps_ms_median"] for r in records),
            "step_wall_ms_mean": statistics.mean(r["step_wall_ms"] for r in records)}


def scheduler_cpu_s(server: ServerProcess) -> float:
    """CPU seconds (user + system, all its threads) that the server's scheduler process has used so far."""
    total = 0.0
    for process in psutil.Process(server.process.pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "scheduler" in (process.name() + " ".join(process.cmdline()[:1])):
                times = process.cpu_times()
                total += times.user + times.system
    return total


def _steps_and_cpu(server: ServerProcess, prompt: list[int], new_tokens: int, keep: bool = False):
    """One streamed request: its decode chunks (or their count) and the scheduler CPU seconds it took."""
    before = scheduler_cpu_s(server)
    chunks = stream_steps(server, prompt, new_tokens)
    used = scheduler_cpu_s(server) - before
    return (chunks if keep else len(chunks)), used


def serve_and_measure(cfg, name: str, speculative: bool, env_extra: dict, args) -> dict:
    env = {**os.environ, **launch_env(cfg), **env_extra}
    profile = os.path.join(args.work, f"{name}.profile.jsonl")
    if speculative:
        env["DFLASH_STEP_PROFILE"] = profile
    cfg = cfg.model_copy(update={"port": free_port()})
    argv = to_launch_args(cfg, speculative=speculative)[3:]  # after `python -m sglang.launch_server`
    server = ServerProcess(argv, log_path=os.path.join(args.work, f"{name}.log"), port=cfg.port, host=cfg.host,
                           env=env)
    server.start(timeout_s=args.server_timeout)
    try:
        stream_steps(server, _prompt(args, seed=0), 8)  # warm-up
        chunks, cpu_per_step = [], []
        for i in range(args.repeats):
            # Another prompt than the long request's: a radix-cache hit would spare the long one its prefill.
            short_steps, short_cpu = _steps_and_cpu(server, _prompt(args, seed=101 + i), args.short_tokens)
            long_chunks, long_cpu = _steps_and_cpu(server, _prompt(args, seed=1 + i), args.new_tokens, keep=True)
            chunks += long_chunks
            cpu_per_step.append(1e3 * (long_cpu - short_cpu) / (len(long_chunks) - short_steps))
        times = sorted(1e3 * dt for dt, _ in chunks)
        result = {"env": env_extra, "step_ms": statistics.median(times), "step_ms_mean": statistics.mean(times),
                  "step_ms_p10_p90": [times[len(times) // 10], times[9 * len(times) // 10]], "steps": len(times),
                  "tokens_per_step": sum(n for _, n in chunks) / len(chunks),
                  "scheduler_cpu_ms_per_step": statistics.median(cpu_per_step),
                  "scheduler_cpu_ms_per_step_samples": cpu_per_step}
        print(f"{name:>14} step {result['step_ms']:.1f} ms median (mean {result['step_ms_mean']:.1f}, p10-p90 "
              f"{result['step_ms_p10_p90'][0]:.1f}-{result['step_ms_p10_p90'][1]:.1f}, {len(times)} steps); "
              f"scheduler CPU {result['scheduler_cpu_ms_per_step']:.1f} ms per step "
              f"{[round(x, 1) for x in cpu_per_step]}", flush=True)
        if args.trace_steps:
            result["trace"] = record_cpu_trace(server, args, name)
            print(f"{name:>14} trace {json.dumps(result['trace'])}", flush=True)
    finally:
        server.stop()
    profiled = read_profile(profile)
    if profiled:
        result["profile"] = profiled
        print(f"{name:>14} parts {json.dumps(profiled)}", flush=True)
    return result


def _cpu_model() -> str | None:
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--launch", required=True, help="a CPU deployment YAML (configs/*-cpu.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", required=True)
    parser.add_argument("--input-len", type=int, default=192)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--short-tokens", type=int, default=8,
                        help="scheduler CPU per step = difference of a --new-tokens and a --short-tokens request")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--trace-steps", type=int, default=0)
    parser.add_argument("--vocab-limit", type=int, default=49000, help="random prompt ids below this")
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--server-timeout", type=float, default=900.0)
    parser.add_argument("--commit")
    args = parser.parse_args()
    args.work = tempfile.mkdtemp(prefix="dflash-bench-step-cpu-")
    cfg = resolve_backends(load_deploy_config(args.launch, args.overrides))
    report = {**provenance(args.commit), "cpu_model": _cpu_model(), "results": {},
              "settings": {**vars(args), "concurrency": 1, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}}
    for name in args.runs:
        speculative, env_extra = RUNS[name]
        report["results"][name] = serve_and_measure(cfg, name, speculative, env_extra, args)
        write_report(report, args.out)
    results, summary = report["results"], {}
    plain = results.get("plain")
    for name in (n for n in args.runs if RUNS[n][0]):
        summary[name] = {"step_ms": results[name]["step_ms"],
                         "scheduler_cpu_ms_per_step": results[name]["scheduler_cpu_ms_per_step"],
                         "parts_ms_median": results[name].get("profile", {}).get("parts_ms_median"),
                         "parts_cpu_ms_median": results[name].get("profile", {}).get("parts_cpu_ms_median"),
                         "between_steps_ms_median": results[name].get("profile", {}).get("between_steps_ms_median")}
        if plain:
            # tokens per DFLASH step needed to match plain decoding's tokens per second
            summary[name]["ratio_over_plain"] = results[name]["step_ms"] / plain["step_ms"]
            summary[name]["cpu_ratio_over_plain"] = (results[name]["scheduler_cpu_ms_per_step"]
                                                     / plain["scheduler_cpu_ms_per_step"])
    if plain:
        summary["plain"] = {key: plain[key] for key in ("step_ms", "scheduler_cpu_ms_per_step")}
    report["summary"] = summary
    write_report(report, args.out)
    print(json.dumps(report["summary"], indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
