# SPDX-License-Identifier: Apache-2.0
"""Writes the Gemma 4 golden fixtures: tiny dense and MoE checkpoints in the released layout, and the
reference log-probabilities of transformers' own Gemma 4 model for a prefill and greedy decode steps.

It needs a transformers with ``models/gemma4`` (>= 5.17), which SGLang's pin (5.3.0) lacks, so it runs in its
own environment; the tests only read what it writes. Regenerate with::

    pip install --target /tmp/tf-gemma4 --no-deps transformers==5.17.0 "tokenizers>=0.23.1,<0.24"
    PYTHONPATH=/tmp/tf-gemma4:$PWD DFLASH_SGLANG_DISABLE=1 .venv/bin/python scripts/make_gemma4_golden.py

(the main virtual environment supplies torch, safetensors, huggingface_hub). For each variant it writes
``tests/fixtures/gemma4/<variant>/``: ``config.json`` (our ``dflash_sglang.testing.tiny_gemma4.gemma4_config``, the
released layout) and ``model.safetensors`` (bf16, saved by transformers' ``save_pretrained``, so the names are
transformers' own, vision tower included), and next to it ``reference-<variant>.safetensors``:

* ``prompt_ids`` [P] int64, ``output_ids`` [N] int64 (greedy continuation);
* ``prefill_logprobs`` [P, vocab] fp32: log-softmax of the soft-capped logits at each prompt position;
* ``decode_logprobs`` [N, vocab] fp32: row j is the distribution output token j was chosen from (row 0 is
  the last prefill position, rows 1.. come from single-token decode steps over transformers' KV cache).

The reference model is reloaded with ``from_pretrained`` from the written folder (its loading report must
be clean) and runs in fp32 on the bf16-rounded weights.
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch
from safetensors.torch import save_file

from dflash_sglang.testing.tiny import write_json
from dflash_sglang.testing.tiny_gemma4 import VARIANTS, gemma4_config, gemma4_text_weights, write_gemma4_tokenizer

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures", "gemma4")
PROMPT_LEN, NUM_OUTPUT, MIN_MARGIN = 24, 8, 0.05
# shorter than the prompt: the sliding layers' window (a query sees itself and the 7 keys before it) bounds the
# prefill and every decode step, which the served model must reproduce through its sliding-window KV pool
SLIDING_WINDOW = 8


def build_checkpoint(variant: str, out: str, seed: int) -> dict:
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    with tempfile.TemporaryDirectory() as scratch:
        ids, vocab_size = write_gemma4_tokenizer(scratch, seed=0)
    # head sizes 16 (sliding) and 32 (full): SGLang's triton attention kernels need >= 16 (a tl.dot's K), so
    # the same fixtures serve the GPU golden test (tests/test_gemma4_gpu.py)
    config = gemma4_config(variant, vocab_size, ids, head_dim=16, global_head_dim=32, sliding_window=SLIDING_WINDOW)
    torch.manual_seed(seed)
    model = Gemma4ForConditionalGeneration(Gemma4Config.from_dict(config))
    text = {name: t.to(torch.bfloat16).float()
            for name, t in gemma4_text_weights(config, torch.Generator().manual_seed(seed)).items()}
    state = model.state_dict()
    ours_missing = sorted(n for n in state if n.startswith("model.language_model.") and n not in text)
    theirs_missing = sorted(n for n in text if n not in state or state[n].shape != text[n].shape)
    if ours_missing or theirs_missing:
        sys.exit(f"{variant}: tiny_gemma4 names/shapes differ from transformers'\n  not written by us: "
                 f"{ours_missing}\n  unknown to transformers or mis-shaped: {theirs_missing}")
    model.load_state_dict(text, strict=False)
    os.makedirs(out, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(out)
    write_json(os.path.join(out, "config.json"), config)  # the released layout, not transformers' re-serialization
    return config


@torch.no_grad()
def reference(out: str, config: dict, seed: int) -> dict[str, torch.Tensor]:
    from transformers import Gemma4ForConditionalGeneration

    model, info = Gemma4ForConditionalGeneration.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    problems = {key: value for key, value in info.items() if value}
    if problems:
        sys.exit(f"{out}: transformers' loading report is not clean: {problems}")
    model.eval()
    vocab = config["text_config"]["vocab_size"]
    prompt = torch.randint(0, vocab - 64, (PROMPT_LEN,), generator=torch.Generator().manual_seed(seed + 1))
    result = model(input_ids=prompt[None], use_cache=True)
    prefill = torch.log_softmax(result.logits[0].float(), dim=-1)
    rows, tokens, cache = [prefill[-1]], [int(prefill[-1].argmax())], result.past_key_values
    for _ in range(NUM_OUTPUT - 1):
        result = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=cache, use_cache=True)
        cache = result.past_key_values
        rows.append(torch.log_softmax(result.logits[0, -1].float(), dim=-1))
        tokens.append(int(rows[-1].argmax()))
    decode = torch.stack(rows)
    top2 = decode.topk(2, dim=-1).values
    margin = float((top2[:, 0] - top2[:, 1]).min())
    if margin < MIN_MARGIN:
        sys.exit(f"{out}: greedy margin {margin:.3f} < {MIN_MARGIN}; pick another seed")
    print(f"{out}: prompt {PROMPT_LEN} tokens, greedy {tokens}, smallest greedy margin {margin:.3f}")
    return {"prompt_ids": prompt, "output_ids": torch.tensor(tokens), "prefill_logprobs": prefill.contiguous(),
            "decode_logprobs": decode.contiguous()}


def main() -> None:
    for index, variant in enumerate(VARIANTS):
        out = os.path.join(FIXTURES, variant)
        config = build_checkpoint(variant, out, seed=index)
        save_file(reference(out, config, seed=index), os.path.join(FIXTURES, f"reference-{variant}.safetensors"))


if __name__ == "__main__":
    main()
