# SPDX-License-Identifier: Apache-2.0
"""What one DFLASH decode step costs against one plain decoding step of the same target, at real sizes.

    python scripts/bench_step.py --out bench/results/step-h100.json [--pairs qwen3-8b qwen3-4b]
                                 [--concurrency 1 8 32] [--no-torch-path]

Each pair is a target and its DFlash drafter at their published shapes, served by SGLang with
``--load-format dummy`` (random weights, so nothing is downloaded) and CUDA graphs on. For each pair the
script starts, one after another: the target alone (AR), the target with DFLASH using the CUDA extension
(once per ``--draft-attention-backends`` entry; SGLang's overlap scheduler on, as for AR; none with
``--ar-only``), with ``--ar-kv-splits N ...`` the target alone again at each of those
``--triton-attention-num-kv-splits`` and with ``--ar-env NAME=VALUE ...`` under each of those environment
settings (both reported against the first AR run), with
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
the step's cost does not depend on that (the block is always drafted and verified in full). Every server runs
with ``DFLASH_BENCH_DUMMY_SCALES=neutral`` (``serving/patches/dummy_weights.py``; ``--upstream-dummy-weights``
for SGLang's fill): norm weights and scalars at 1, so a mixture-of-experts target's tokens route to different
experts, as real ones do (on upstream's fill every token of a Gemma 4 step chose the same 8 experts).

Reported: step_DFLASH / step_AR per concurrency, and the projected speedup tau * step_AR / step_DFLASH
for acceptance lengths tau next to the speedups the paper publishes for the pair.

Shapes. Qwen3-8B and Qwen3-4B are their published config.json values. The drafters
(z-lab/Qwen3-8B-DFlash-b16, z-lab/Qwen3-4B-DFlash-b16) are 5 Qwen3 layers at the target's hidden size,
heads and head_dim (bench_kernels.py records the source); their intermediate size is taken equal to the
target's and their target_layer_ids follow the reference's default rule (5 ids evenly spaced over
[1, num_layers - 3]): both ASSUMED, as their config.json files were not readable offline.

Gemma 4 targets (google/gemma-4-31B-it, google/gemma-4-26B-A4B-it) are their released text_configs (the
values tests/test_gemma4_config.py pins) inside the released multimodal config.json. Their drafters
(z-lab/gemma-4-31B-it-DFlash, z-lab/gemma-4-26B-A4B-it-DFlash) follow the best public evidence, a GGUF
conversion's card of the 31B drafter (https://huggingface.co/Lucebox/gemma-4-31B-it-DFlash-GGUF): 5 layers,
hidden 5376, 64 query / 8 KV heads of 128, intermediate 10752 (2 x hidden), rope_theta 1e6, sliding window
2048, final_logit_softcapping 30, target_layer_ids [1, 12, 23, 35, 46, 57] (the reference rule with 6 ids),
block 16, mask token 4; 1.63 GB at Q8_0, which those shapes give to the MB. Layer types: 4 sliding + 1 full,
from a conversion of the 26B-A4B drafter
(https://huggingface.co/ji-farthing/gemma-4-26B-A4B-it-DFlash-SWA-ik-llama-GGUF), ASSUMED the same for 31B.
The 26B-A4B drafter: hidden 2816 and the same layout scaled (32 query / 8 KV heads of 128, intermediate 5632,
6 target layer ids by the reference rule): ASSUMED, consistent with that conversion's 450.5 MB at Q8_0 (these
shapes give 0.43 B parameters, ~456 MB).
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

from dflash_sglang.core.config import default_target_layer_ids  # noqa: E402
from dflash_sglang.bench.floor import measure_copy_bandwidth_gbs, weight_bytes_per_step  # noqa: E402
from dflash_sglang.bench.trace import load_events, profile_decode_steps, summarize_trace  # noqa: E402
from dflash_sglang.deploy.launch import ServerProcess  # noqa: E402
from dflash_sglang.bench.provenance import provenance, write_report  # noqa: E402


@dataclass(frozen=True)
class Pair:
    target: dict  # config.json
    drafter: dict  # config.json in the released DFlash format
    published_speedups: dict[str, float]  # source: benchmark -> speedup over AR (greedy)
    taus: tuple[float, ...]  # acceptance lengths to project speedups at (the published ones where known)


BLOCK_SIZE = 16
TAUS = (4.0, 6.5, 8.0)
NOISY_SPREAD = 0.1  # (max - min) / median of a concurrency's samples above which the run says so


def qwen3_config(hidden: int, layers: int, intermediate: int, tie: bool) -> dict:
    return {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": hidden,
            "num_hidden_layers": layers, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
            "intermediate_size": intermediate, "vocab_size": 151936, "max_position_embeddings": 40960,
            "rms_norm_eps": 1e-6, "rope_theta": 1000000, "rope_scaling": None, "hidden_act": "silu",
            "attention_bias": False, "tie_word_embeddings": tie, "torch_dtype": "bfloat16",
            "bos_token_id": 151643, "eos_token_id": 151645}


def drafter_config(*, target_layers: int, hidden: int, heads: int, kv_heads: int, head_dim: int,
                   intermediate: int, vocab: int, rope_theta: float, max_positions: int, num_target_ids: int,
                   mask_token_id: int, layer_types: list[str], sliding_window: int | None = None,
                   **dflash_extras) -> dict:
    """A DFlash drafter's config.json (released format: a qwen3-type stack plus ``dflash_config``)."""
    config = {"architectures": ["DFlashDraftModel"], "model_type": "qwen3", "hidden_size": hidden,
              "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
              "intermediate_size": intermediate, "vocab_size": vocab, "max_position_embeddings": max_positions,
              "rms_norm_eps": 1e-6, "rope_theta": rope_theta, "hidden_act": "silu", "attention_bias": False,
              "num_hidden_layers": len(layer_types), "layer_types": layer_types, "block_size": BLOCK_SIZE,
              "num_target_layers": target_layers, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
              "dflash_config": {"block_size": BLOCK_SIZE, "mask_token_id": mask_token_id,
                                "target_layer_ids": default_target_layer_ids(target_layers, num_target_ids),
                                **dflash_extras}}
    if sliding_window is not None:
        config["sliding_window"] = sliding_window
    return config


def qwen3_drafter(target: dict) -> dict:
    return drafter_config(target_layers=target["num_hidden_layers"], hidden=target["hidden_size"], heads=32,
                          kv_heads=8, head_dim=128, intermediate=target["intermediate_size"], vocab=151936,
                          rope_theta=1000000, max_positions=40960, num_target_ids=5, mask_token_id=151669,
                          layer_types=["full_attention"] * 5)


GEMMA4_LAYER_TYPES = (["sliding_attention"] * 5 + ["full_attention"]) * 10
GEMMA4_ROPE = {"full_attention": {"partial_rotary_factor": 0.25, "rope_theta": 1000000.0,
                                  "rope_type": "proportional"},
               "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"}}


def gemma4_config(layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, global_kv_heads: int,
                  **moe) -> dict:
    """A released Gemma 4 config.json (multimodal wrapper, text_config as google/gemma-4-*-it publish it)."""
    text = {"model_type": "gemma4_text", "hidden_size": hidden, "num_hidden_layers": layers,
            "intermediate_size": intermediate, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "num_global_key_value_heads": global_kv_heads, "head_dim": 256, "global_head_dim": 512,
            "vocab_size": 262144, "rms_norm_eps": 1e-6, "max_position_embeddings": 262144, "sliding_window": 1024,
            "final_logit_softcapping": 30.0, "use_double_wide_mlp": False, "num_kv_shared_layers": 0,
            "hidden_size_per_layer_input": 0, "attention_k_eq_v": True, "enable_moe_block": bool(moe),
            "tie_word_embeddings": True, "layer_types": GEMMA4_LAYER_TYPES[:layers], "rope_parameters": GEMMA4_ROPE,
            "hidden_activation": "gelu_pytorch_tanh", "torch_dtype": "bfloat16", **moe}
    return {"architectures": ["Gemma4ForConditionalGeneration"], "model_type": "gemma4", "text_config": text,
            "vision_config": {"model_type": "gemma4_vision", "hidden_size": 1152}, "tie_word_embeddings": True,
            "torch_dtype": "bfloat16", "bos_token_id": 2, "eos_token_id": [1, 106], "pad_token_id": 0}


def gemma4_drafter(target: dict, heads: int, intermediate: int) -> dict:
    text = target["text_config"]
    return drafter_config(target_layers=text["num_hidden_layers"], hidden=text["hidden_size"], heads=heads,
                          kv_heads=8, head_dim=128, intermediate=intermediate, vocab=262144, rope_theta=1000000.0,
                          max_positions=262144, num_target_ids=6, mask_token_id=4,
                          layer_types=["sliding_attention"] * 4 + ["full_attention"], sliding_window=2048,
                          final_logit_softcapping=30.0)


QWEN3_8B = qwen3_config(4096, 36, 12288, tie=False)
QWEN3_4B = qwen3_config(2560, 36, 9728, tie=True)
GEMMA4_31B = gemma4_config(60, 5376, 21504, 32, 16, 4)
GEMMA4_26B_A4B = gemma4_config(30, 2816, 2112, 16, 8, 2, num_experts=128, top_k_experts=8, moe_intermediate_size=704)
PAIRS = {
    "qwen3-8b": Pair(QWEN3_8B, qwen3_drafter(QWEN3_8B),
                     {"paper: gsm8k": 5.20, "paper: math500": 6.17, "paper: aime24": 5.91, "paper: aime25": 5.85,
                      "paper: humaneval": 5.20, "paper: mbpp": 4.75}, TAUS),
    "qwen3-4b": Pair(QWEN3_4B, qwen3_drafter(QWEN3_4B), {}, TAUS),
    # z-lab/gemma-4-31B-it-DFlash card: B300, Math500 c1 77 -> 447 tok/s ("up to 5.8x"), acceptance 6-8.
    "gemma-4-31b": Pair(GEMMA4_31B, gemma4_drafter(GEMMA4_31B, heads=64, intermediate=10752),
                        {"card B300 math500 c1": 5.8}, (6.0, 7.0, 8.0)),
    # z-lab/gemma-4-26B-A4B-it-DFlash card: one H100 (vLLM) 222.3 tok/s at tau 7.8, ~3.4x; B300 Math500
    # 259 -> 925 tok/s at c1 (tau 8.61), 1296 -> 4837 at c8.
    "gemma-4-26b-a4b": Pair(GEMMA4_26B_A4B, gemma4_drafter(GEMMA4_26B_A4B, heads=32, intermediate=5632),
                            {"card H100 c1 (tau 7.8)": 3.4, "card B300 math500 c1 (tau 8.61)": 3.57,
                             "card B300 math500 c8": 3.73}, (7.8, 8.61)),
}


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
    # Enough tokens that the batch outlives the profiled steps even if every draft is accepted.
    path = profile_decode_steps(
        server, directory, name, args.trace_steps,
        lambda: run_requests(server, prompts, max(args.long, 2 * args.trace_steps * 16), speculative),
        activities=["CPU", "GPU"], record_shapes=False)
    if path is None:
        return {"error": f"no decode trace written under {directory}"}
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
        info = server.server_info()
        results["kv_pool_tokens"] = info.get("max_total_num_tokens")  # at --mem-fraction-static
        print(f"{name:>16} KV pool {results['kv_pool_tokens']} tokens", flush=True)
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
    parser.add_argument("--mem-fraction-static", type=float, default=0.7,
                        help="SGLang's static memory share (the KV pool's tokens are reported at it); a 31B "
                             "target's 61 GB of bf16 weights need ~0.85 on an 80 GB card")
    parser.add_argument("--draft-attention-backends", nargs="+", default=["triton"],
                        help="one DFLASH run per drafter attention backend (the first also runs --torch-path)")
    parser.add_argument("--no-torch-path", action="store_true", help="skip the DFLASH_KERNELS=off run")
    parser.add_argument("--v1-loop", action="store_true",
                        help="also run DFLASH without the overlap scheduler (--disable-overlap-schedule: the "
                             "host-committed v1 loop), with the first drafter backend")
    parser.add_argument("--ar-kv-splits", nargs="+", type=int, default=[],
                        help="also serve AR with these --triton-attention-num-kv-splits (the decode attention's "
                             "most KV splits; SGLang's default 8 leaves most SMs idle at small batches)")
    parser.add_argument("--ar-env", nargs="+", default=[], metavar="NAME=VALUE",
                        help="also serve AR with each of these environment settings (e.g. "
                             "DFLASH_DECODE_ATTENTION=block: decode steps on the block kernel), one run each")
    parser.add_argument("--ar-only", action="store_true", help="serve no DFLASH server (AR variants only)")
    parser.add_argument("--upstream-dummy-weights", action="store_true",
                        help="SGLang's dummy fill as it is (norm weights and scalars too: MoE routing collapses)")
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
    bandwidth = measure_copy_bandwidth_gbs()
    print(f"device-to-device copy: {bandwidth:.0f} GB/s (read + write)", flush=True)
    report = {**provenance(args.commit), "settings": vars(args), "copy_bandwidth_gbs": bandwidth, "pairs": {}}
    for pair_name in args.pairs:
        pair = PAIRS[pair_name]
        target = write_model_dir(os.path.join(work, pair_name, "target"), pair.target)
        drafter = write_model_dir(os.path.join(work, pair_name, "drafter"), pair.drafter)
        common = ["--model-path", target, "--load-format", "dummy", "--skip-tokenizer-init", "--dtype", "bfloat16",
                  "--attention-backend", args.attention_backend,
                  "--mem-fraction-static", str(args.mem_fraction_static),
                  "--cuda-graph-max-bs", str(max(args.concurrency)), "--max-running-requests",
                  str(max(args.concurrency)), "--context-length", "4096", "--skip-server-warmup",
                  "--random-seed", "0",
                  # Prefill is not measured: its piecewise graphs took 214 s of a 31B server's start on an H200.
                  "--disable-piecewise-cuda-graph"]
        runs = {"ar": (common, {}, False)}
        for splits in args.ar_kv_splits:  # SGLang's default is 8: the AR runs this option adds beside "ar"
            runs[f"ar_kv_splits_{splits}"] = (common + ["--triton-attention-num-kv-splits", str(splits)], {}, False)
        for setting in args.ar_env:
            name, _, value = setting.partition("=")
            runs[f"ar_{name.lower()}_{value.lower()}"] = (common, {name: value}, False)
        for i, backend in enumerate([] if args.ar_only else args.draft_attention_backends):
            dflash = common + ["--speculative-algorithm", "DFLASH", "--speculative-draft-model-path", drafter,
                               "--speculative-draft-attention-backend", backend]
            suffix = "" if i == 0 else f"_{backend}_draft"
            runs[f"dflash{suffix}"] = (dflash, {"DFLASH_KERNELS": "on"}, True)
            if i == 0 and args.v1_loop:
                runs["dflash_v1_loop"] = (dflash + ["--disable-overlap-schedule"], {"DFLASH_KERNELS": "on"}, True)
            if i == 0 and not args.no_torch_path:
                runs["dflash_torch_path"] = (dflash, {"DFLASH_KERNELS": "off"}, True)
        results: dict = {}
        report["pairs"][pair_name] = {"results": results, "target_config": pair.target,
                                      "drafter_config": pair.drafter}
        dummy = {"DFLASH_BENCH_DUMMY_SCALES": "upstream" if args.upstream_dummy_weights else "neutral"}
        for mode, (server_args, env, speculative) in runs.items():
            results[mode] = serve_and_measure(f"{pair_name}-{mode}", server_args, {**os.environ, **dummy, **env},
                                              args.concurrency, args, work, speculative)
            report["pairs"][pair_name]["summary"] = summarize(results, pair, bandwidth)
            write_report(report, args.out)
        print(json.dumps(report["pairs"][pair_name]["summary"], indent=1), flush=True)
    print(f"wrote {args.out}")
    return 0


def summarize(results: dict, pair: Pair, bandwidth_gbs: float) -> dict:
    """Per concurrency: the AR step against its weight-read floor at the measured copy rate, and each DFLASH
    mode's step, ratio to AR, verify-pass floor (16 tokens per request) and projections."""
    summary = {}
    measured = {c: ar for c, ar in results.get("ar", {}).items() if c.isdigit()}
    for c, ar in measured.items():
        ar_floor_ms = weight_bytes_per_step(pair.target, int(c)) / bandwidth_gbs / 1e6
        verify_floor_ms = weight_bytes_per_step(pair.target, BLOCK_SIZE * int(c)) / bandwidth_gbs / 1e6
        row = {"step_ar_ms": ar["step_ms"], "ar_tok_s_per_request": 1e3 / ar["step_ms"],
               "ar_weight_floor_ms": ar_floor_ms, "ar_over_floor": ar["step_ms"] / ar_floor_ms,
               "verify_weight_floor_ms": verify_floor_ms}
        for mode in results:
            if mode == "ar":
                continue
            ratio = results[mode][c]["step_ms"] / ar["step_ms"]
            row[f"step_{mode}_ms"] = results[mode][c]["step_ms"]
            row[f"ratio_{mode}_over_ar"] = ratio
            if not mode.startswith("ar_"):  # a DFLASH mode (the ar_* modes are AR variants)
                row[f"projected_speedup_{mode}"] = {str(tau): tau / ratio for tau in pair.taus}
                # Per request: tau tokens per DFLASH step.
                row[f"projected_tok_s_per_request_{mode}"] = {
                    str(tau): tau * 1e3 / results[mode][c]["step_ms"] for tau in pair.taus}
                # From the traces (where both were recorded): the ratio if no step waited for the host.
                busy, ar_busy = (r.get("trace", {}).get("gpu_busy_ms") for r in (results[mode][c], ar))
                if busy and ar_busy:
                    row[f"gpu_busy_ratio_{mode}_over_ar"] = busy / ar_busy
        summary[c] = row
    return {"by_concurrency": summary, "published_speedups": pair.published_speedups,
            "kv_pool_tokens": {mode: runs.get("kv_pool_tokens") for mode, runs in results.items()}}


if __name__ == "__main__":
    sys.exit(main())
