# SPDX-License-Identifier: Apache-2.0
"""Serving benchmark: DFLASH vs the same target without speculation, from a real streaming client.

    # launch both servers from a deployment file (one after the other), run, stop them:
    python scripts/bench_serving.py --launch configs/qwen3-8b.yaml --datasets humaneval mt-bench
    # or measure servers that are already up:
    python scripts/bench_serving.py --url http://127.0.0.1:30000 --baseline-url http://127.0.0.1:30001

Defaults are the DFlash model cards' settings: greedy, thinking enabled, at most 4096 output tokens,
concurrency 1, 8 and 32, every prompt of each set. Writes OUT/bench_serving.json and OUT/bench_serving.png
(see dflash_sglang/bench/report.py) and prints one line per run. Exit status: 0, 2 on bad input or an
unreachable/failed server, 3 when the greedy outputs of the two endpoints differ (results are written first).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from typing import Iterator

from dflash_sglang.bench.client import APIS, EndpointError, probe_endpoint
from dflash_sglang.bench.prompts import PromptSetError, load_jsonl_prompts, load_prompt_set
from dflash_sglang.bench.report import environment, plot
from dflash_sglang.bench.provenance import write_report
from dflash_sglang.bench.runner import Matrix, Runs, assemble, run_endpoint
from dflash_sglang.deploy.deployment import (DeployConfigError, launch_env, load_deploy_config, resolve_backends,
                                             to_launch_args)
from dflash_sglang.deploy.launch import ServerProcess, ServerStartError, free_port

logger = logging.getLogger("bench_serving")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--launch", metavar="CONFIG", help="deployment YAML (configs/*.yaml): start the DFLASH "
                        "server, then the same deployment without speculation, on free ports")
    target.add_argument("--url", help="base URL of a running DFLASH server, e.g. http://127.0.0.1:30000")
    parser.add_argument("--baseline-url", help="base URL of the same target without speculation (with --url)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the --launch config (as dflash-serve --set)")
    parser.add_argument("--datasets", nargs="*", default=["humaneval"], metavar="NAME",
                        help="built-in prompt sets: humaneval, mt-bench, aime, sharegpt (default: humaneval)")
    parser.add_argument("--prompts-jsonl", action="append", default=[], metavar="PATH",
                        help="a prompt set from a JSONL file, one {\"prompt\": ...} per line; repeatable")
    parser.add_argument("--num-prompts", type=int, help="the first N prompts of each set (default: all)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], help="default: 1 8 32")
    parser.add_argument("--max-tokens", type=int, default=4096, help="max output tokens (default 4096)")
    parser.add_argument("--no-thinking", action="store_true", help="chat_template_kwargs enable_thinking=false")
    parser.add_argument("--api", choices=APIS, default="auto",
                        help="sglang: native /generate with acceptance statistics; openai: /v1/chat/completions "
                             "of any server (acceptance unavailable); auto: sglang when the server is SGLang")
    parser.add_argument("--tokenizer", help="tokenizer for the native API's chat template (default: the server's)")
    parser.add_argument("--out", default="bench/results/serving", help="output folder (default: %(default)s)")
    parser.add_argument("--server-timeout", type=float, default=1200.0, help="seconds to wait for a launch")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="bench_serving: %(message)s")
    try:
        matrix = Matrix(_load_prompts(args), args.concurrency, args.max_tokens,
                        {"enable_thinking": not args.no_thinking}, args.tokenizer)
        _check_numbers(args)
        if args.launch:
            speculative, baseline, deployment = _run_launched(args, matrix)
        else:
            speculative, baseline = _run_urls(args, matrix)
            deployment = args.url
    except (PromptSetError, DeployConfigError, EndpointError, ServerStartError, ValueError, RuntimeError) as error:
        print(f"bench_serving: error: {error}", file=sys.stderr)
        return 2
    runs, lossless = assemble(speculative, baseline)
    settings = {"deployment": deployment, "launch_config": args.launch, "overrides": args.overrides,
                "url": args.url, "baseline_url": args.baseline_url, "api": matrix.api,
                "datasets": list(matrix.prompt_sets), "num_prompts": args.num_prompts,
                "concurrency": args.concurrency, "max_tokens": args.max_tokens, "temperature": 0,
                "enable_thinking": not args.no_thinking, "chat_template_kwargs": matrix.chat_template_kwargs}
    result = {"settings": settings, "environment": environment(), "lossless": lossless, "runs": runs}
    json_path, png_path = os.path.join(args.out, "bench_serving.json"), os.path.join(args.out, "bench_serving.png")
    write_report(result, json_path)
    plot(result, png_path)
    _print_table(runs)
    print(f"wrote {json_path} and {png_path}")
    if lossless["checked"] and not lossless["passed"]:
        print(f"bench_serving: LOSSLESS CHECK FAILED: {lossless['mismatched']} greedy output(s) differ from the "
              f"baseline (details under runs[*].lossless in {json_path})", file=sys.stderr)
        return 3
    return 0


def _load_prompts(args: argparse.Namespace) -> dict:
    sets = {name: load_prompt_set(name, args.num_prompts) for name in args.datasets}
    for path in args.prompts_jsonl:
        prompts = load_jsonl_prompts(path, args.num_prompts)
        sets[prompts[0].dataset] = prompts
    if not sets:
        raise PromptSetError("no prompt set: give --datasets NAME ... or --prompts-jsonl PATH")
    return sets


def _check_numbers(args: argparse.Namespace) -> None:
    for flag, values in (("--concurrency", args.concurrency), ("--max-tokens", [args.max_tokens]),
                         ("--num-prompts", [args.num_prompts or 1])):
        if min(values) < 1:
            raise ValueError(f"{flag} must be >= 1, got {values}")
    if args.baseline_url and not args.url:
        raise ValueError("--baseline-url goes with --url")


def _run_urls(args: argparse.Namespace, matrix: Matrix) -> tuple[Runs, Runs | None]:
    info = asyncio.run(probe_endpoint(args.url, args.api))
    matrix.api = info.api
    speculative = asyncio.run(run_endpoint(info, matrix, "DFLASH"))
    if not args.baseline_url:
        logger.warning("no --baseline-url: no speedup and no lossless check")
        return speculative, None
    base_info = asyncio.run(probe_endpoint(args.baseline_url, info.api))
    return speculative, asyncio.run(run_endpoint(base_info, matrix, "baseline"))


def _run_launched(args: argparse.Namespace, matrix: Matrix) -> tuple[Runs, Runs, str]:
    """Starts the deployment, runs, stops it; then the same for the deployment without speculation."""
    cfg = resolve_backends(load_deploy_config(args.launch, args.overrides))
    runs = []
    for speculative, label in ((True, "DFLASH"), (False, "baseline")):
        with _launched(cfg.model_copy(update={"port": free_port()}), speculative, args, label) as base_url:
            info = asyncio.run(probe_endpoint(base_url, args.api))
            matrix.api = info.api
            runs.append(asyncio.run(run_endpoint(info, matrix, label)))
    return runs[0], runs[1], os.path.splitext(os.path.basename(args.launch))[0]


@contextlib.contextmanager
def _launched(cfg, speculative: bool, args: argparse.Namespace, label: str) -> Iterator[str]:
    os.makedirs(args.out, exist_ok=True)
    log_path = os.path.join(args.out, f"server-{label}.log")
    argv = to_launch_args(cfg, speculative=speculative)[3:]  # after `python -m sglang.launch_server`
    server = ServerProcess(argv, log_path=log_path, port=cfg.port, host=cfg.host,
                           env={**os.environ, **launch_env(cfg)})
    logger.info("starting the %s server (log: %s)", label, log_path)
    server.start(timeout_s=args.server_timeout)
    try:
        yield server.base_url
    finally:
        server.stop()


def _print_table(runs: list[dict]) -> None:
    def num(value: float | None, spec: str) -> str:
        return format(value, spec) if value is not None else "n/a"

    print(f"{'dataset':<12} {'conc':>4} {'DFLASH tok/s':>12} {'base tok/s':>10} {'speedup':>7} {'accept':>6} "
          f"{'TTFT p50 ms':>11} {'ITL p50 ms':>10} {'lossless':>8}")
    for run in runs:
        spec, base = run["speculative"], run["baseline"] or {}
        lossless = run["lossless"]
        verdict = "n/a" if lossless is None else "ok" if not lossless["mismatches"] else \
            f"{len(lossless['mismatches'])} diff"
        print(f"{run['dataset']:<12} {run['concurrency']:>4} {num(spec['throughput_tok_s'], '.1f'):>12} "
              f"{num(base.get('throughput_tok_s'), '.1f'):>10} {num(run['speedup'], '.2f'):>7} "
              f"{num(spec['accept_length'], '.2f'):>6} {num(spec['ttft_ms_p50'], '.1f'):>11} "
              f"{num(spec['itl_ms_p50'], '.2f'):>10} {verdict:>8}")


if __name__ == "__main__":
    sys.exit(main())
