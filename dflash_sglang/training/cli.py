# SPDX-License-Identifier: Apache-2.0
"""``dflash-train``: regenerate the target's responses, train a DFlash drafter on them, write it in the
released format (``config.json`` with ``dflash_config`` + ``model.safetensors``) and measure its acceptance
length on held-out prompts with the reference decoder.

    dflash-train --target path/to/hf-target --out runs/my-drafter --prompts sharegpt humaneval --num-prompts 2000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import fields

import torch

from dflash_sglang.core.checkpoint import load_drafter
from dflash_sglang.training.data import encode_prompt, load_prompts, load_sequences, regenerate
from dflash_sglang.training.loop import (TrainConfig, Trainer, copy_target_layers, drafter_config_for,
                                         evaluate_acceptance, list_checkpoints, new_drafter, pick_mask_token_id)
from dflash_sglang.training.regenerate_sglang import regenerate_with_sglang, sglang_can_run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dflash-train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--target", required=True, help="Hugging Face folder (or hub id in the cache) of the target")
    p.add_argument("--out", required=True, help="run folder: data, checkpoints/, and the final drafter")
    data = p.add_argument_group("data")
    data.add_argument("--data", help="token cache (JSONL); default <out>/data.jsonl")
    data.add_argument("--prompts", nargs="*", default=[],
                      help="prompt sources to regenerate from: sharegpt, humaneval, mt-bench, aime, or JSONL files")
    data.add_argument("--num-prompts", type=int, help="at most this many prompts per source")
    data.add_argument("--regenerate", action="store_true",
                      help="(re)run the target on --prompts and extend the cache (implied when it does not exist)")
    data.add_argument("--max-new-tokens", type=int, default=512, help="response length cap when regenerating")
    data.add_argument("--regenerate-with", choices=("auto", "sglang", "transformers"), default="auto",
                      help="the engine that answers the prompts: sglang (SGLang's offline engine, all prompts "
                           "batched by SGLang itself; the fast one on a GPU) or transformers (generate in batches of "
                           "--gen-batch-size); auto: sglang on a CUDA device when SGLang is installed, else "
                           "transformers (on the CPU SGLang runs too, but its ~30 s start-up outweighs its speed)")
    data.add_argument("--sglang-args", type=json.loads, default={},
                      help='extra sglang.Engine (ServerArgs) fields as JSON, e.g. \'{"cuda_graph_max_bs": 512}\'')
    data.add_argument("--gen-batch-size", type=int, default=32, help="prompts per generate call (transformers)")
    data.add_argument("--gen-temperature", type=float, default=0.0, help="0 = greedy responses")
    data.add_argument("--max-prompt-tokens", type=int, default=1024)
    data.add_argument("--regenerate-only", action="store_true", help="stop once the token cache is written")
    model = p.add_argument_group("drafter")
    model.add_argument("--num-draft-layers", type=int, default=TrainConfig.num_draft_layers)
    model.add_argument("--block-size", type=int, default=TrainConfig.block_size)
    model.add_argument("--target-layer-ids", type=int, nargs="+")
    model.add_argument("--mask-token-id", type=int)
    model.add_argument("--init-from", help="start from this drafter checkpoint instead of random weights")
    model.add_argument("--init-layers-from-target", action="store_true",
                       help="start the drafter's layers from the target's last ones (Llama / Qwen3 targets; on "
                            "SmolLM2-135M the loss at equal steps was 0.4-0.9 nats lower over 150 CPU steps)")
    train = p.add_argument_group("training")
    for name in ("num_anchors", "gamma", "lr", "warmup_ratio", "weight_decay", "epochs", "max_steps", "batch_size",
                 "max_batch_tokens", "grad_clip", "max_seq_len", "save_every", "keep_checkpoints", "seed"):
        default = getattr(TrainConfig, name)
        kind = int if name in ("max_steps", "max_batch_tokens") else type(default)
        train.add_argument("--" + name.replace("_", "-"), type=kind, default=default)
    train.add_argument("--compile", action="store_true",
                       help="torch.compile the drafter's layer forward (dynamic shapes; the first steps compile)")
    train.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in <out>")
    train.add_argument("--time-limit-min", type=float,
                       help="checkpoint and stop after this many minutes of training (continue with --resume)")
    train.add_argument("--fit-schedule", action="store_true",
                       help="with --time-limit-min: time the first steps and shorten the run (its warmup and "
                            "cosine decay) to end within the limit, so it finishes at a low learning rate")
    train.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1 ...")
    train.add_argument("--no-progress", action="store_true")
    ev = p.add_argument_group("evaluation")
    ev.add_argument("--eval-holdout", type=int, default=8,
                    help="the last N cached sequences are not trained on; their prompts measure acceptance")
    ev.add_argument("--eval-prompts", nargs="*", default=[], help="extra held-out prompt sources")
    ev.add_argument("--eval-num-prompts", type=int, default=16)
    ev.add_argument("--eval-max-new-tokens", type=int, default=128)
    ev.add_argument("--eval-every", type=int, default=0, help="also evaluate every N steps (0: only at the end)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.fit_schedule and not args.time_limit_min:
        raise SystemExit("dflash-train: --fit-schedule fits the run to --time-limit-min: pass both")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    os.makedirs(args.out, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(args.target)
    tokenizer.padding_side = "left"
    progress = not args.no_progress

    def load_target():
        model = AutoModelForCausalLM.from_pretrained(args.target, dtype=dtype).to(device).eval()
        return model.requires_grad_(False)

    target = None
    data_path = args.data or os.path.join(args.out, "data.jsonl")
    if args.regenerate or not os.path.exists(data_path):
        if not args.prompts:
            raise SystemExit(f"dflash-train: no token cache at {data_path}: pass --prompts to regenerate one")
        prompts = load_prompts(args.prompts, args.num_prompts)
        engine = args.regenerate_with
        if engine == "auto":
            engine = "sglang" if sglang_can_run(device) else "transformers"
        print(f"dflash-train: regenerating {len(prompts)} responses with the target ({engine}) -> {data_path}",
              file=sys.stderr)
        start = time.monotonic()
        if engine == "sglang":
            # The engine is shut down (its GPU memory freed) before the target is loaded here for training.
            written = regenerate_with_sglang(args.target, tokenizer, prompts, data_path,
                                             max_new_tokens=args.max_new_tokens, temperature=args.gen_temperature,
                                             max_prompt_tokens=args.max_prompt_tokens, seed=args.seed,
                                             device=device, dtype=dtype, engine_args=args.sglang_args,
                                             progress=progress)
        else:
            target = load_target()
            written = regenerate(target, tokenizer, prompts, data_path, max_new_tokens=args.max_new_tokens,
                                 batch_size=args.gen_batch_size, temperature=args.gen_temperature,
                                 max_prompt_tokens=args.max_prompt_tokens, seed=args.seed, progress=progress)
        seconds = time.monotonic() - start
        print(f"dflash-train: {written[0]} new rows, {written[1]} response tokens in {seconds:.1f} s "
              f"({written[1] / seconds:.0f} tokens/s)", file=sys.stderr)
    if args.regenerate_only:
        return 0
    target = target if target is not None else load_target()
    rows = load_sequences(data_path, args.max_seq_len)
    holdout = min(args.eval_holdout, len(rows) - 1)
    train_rows, held = rows[:len(rows) - holdout], rows[len(rows) - holdout:]
    eval_prompts = [row["prompt_ids"] for row, _ in held]
    if args.eval_prompts:
        eval_prompts += [encode_prompt(tokenizer, p.text)[-args.max_prompt_tokens:]
                         for p in load_prompts(args.eval_prompts, args.eval_num_prompts)]

    train = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)
                           if f.name not in ("extra", "target_layer_ids", "mask_token_id")},
                        target_layer_ids=tuple(args.target_layer_ids) if args.target_layer_ids else None,
                        mask_token_id=args.mask_token_id)
    vocab = target.get_input_embeddings().weight.shape[0]
    mask_id = args.mask_token_id if args.mask_token_id is not None else pick_mask_token_id(tokenizer, vocab)
    resume = args.resume and bool(list_checkpoints(args.out))
    if args.init_from and args.init_layers_from_target:
        raise SystemExit("dflash-train: --init-from and --init-layers-from-target both set the drafter's starting "
                         "weights: pass one")
    if args.init_from:
        drafter = load_drafter(args.init_from).float()
        drafter.config.check_target(target.config)
    else:
        drafter = new_drafter(drafter_config_for(target.config, train, mask_id), args.seed)
        if args.init_layers_from_target and not resume:  # a resumed run takes its checkpoint's weights
            try:
                copied = copy_target_layers(drafter, target)
            except ValueError as error:
                raise SystemExit(f"dflash-train: --init-layers-from-target: {error}") from None
            print(f"dflash-train: drafter layers start from the target's layers {copied}", file=sys.stderr)
    trainer = Trainer(target, drafter, [s for _, s in train_rows], train, args.out, device=device,
                      resume=resume, progress=progress)
    print(f"dflash-train: {len(train_rows)} training sequences, {len(eval_prompts)} held-out prompts, "
          f"{trainer.total_steps} steps ({trainer.steps_per_epoch}/epoch), drafter "
          f"{sum(p.numel() for p in drafter.parameters()) / 1e6:.1f}M parameters, target layers "
          f"{list(drafter.config.target_layer_ids)}, mask token {drafter.config.mask_token_id}, "
          f"{'resumed at step ' + str(trainer.step) if trainer.step else 'from step 0'}, on {device}",
          file=sys.stderr)
    stops = sorted({t for t in ([tokenizer.eos_token_id] + _as_list(target.config.eos_token_id)) if t is not None})

    def measure(tag: str) -> dict:
        result = evaluate_acceptance(target, trainer.drafter, eval_prompts, max_new_tokens=args.eval_max_new_tokens,
                                     stop_token_ids=stops) if eval_prompts else {}
        result["step"] = trainer.step
        print(f"dflash-train: {tag} step {trainer.step}: {json.dumps(result)}", file=sys.stderr)
        return result

    evals = []

    def on_step(record: dict) -> None:
        if args.eval_every and record["step"] % args.eval_every == 0:
            evals.append(measure("eval"))

    deadline = time.monotonic() + 60 * args.time_limit_min if args.time_limit_min else None
    trainer.run(on_step=on_step, deadline=deadline, fit_schedule_to_deadline=args.fit_schedule)
    if trainer.schedule_fitted:
        print(f"dflash-train: schedule fitted to the time limit: {trainer.total_steps} steps", file=sys.stderr)
    path = trainer.export()
    if trainer.step < trainer.total_steps:
        print(f"dflash-train: stopped at step {trainer.step} of {trainer.total_steps} (time limit); drafter so far "
              f"in {path}; continue with --resume", file=sys.stderr)
        return 0
    evals.append(measure("final"))
    with open(os.path.join(args.out, "eval.json"), "w", encoding="utf-8") as handle:
        json.dump(evals, handle, indent=1)
    print(f"dflash-train: drafter written to {path} (config.json + model.safetensors)", file=sys.stderr)
    return 0


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


if __name__ == "__main__":
    raise SystemExit(main())
