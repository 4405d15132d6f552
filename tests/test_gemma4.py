# SPDX-License-Identifier: Apache-2.0
"""Gemma 4 on the CPU through real SGLang servers.

* Golden: the committed tiny dense and MoE checkpoints (``scripts/make_gemma4_golden.py``, saved by
  transformers 5.17 in the released layout, vision tower included) are served by SGLang 0.5.10.post1; the
  full log-probability vectors of a 24-token prefill and of 7 greedy decode steps over SGLang's KV cache
  match transformers' fp32 reference, also when the prompt comes from the radix cache: served in fp32 to
  1e-3 (seen: < 1e-5), served in bf16 (dense) within bf16 tolerance.
* DFLASH: the tiny dense Gemma 4 with a tiny drafter in the released format (Gemma keys in
  ``dflash_config``) gives the non-speculative server's greedy tokens.
* KV pool (``models/gemma4_kv_pool.py``): the sliding layers' window (8 tokens, shorter than every sequence
  here) bounds their attention and their pool; each layer type keeps its own KV shape, said in the log; the
  golden logits hold with the window-sized sliding pool and with ``--disable-hybrid-swa-memory``'s one slot
  space; under DFLASH the sliding slots a request holds stay bounded by the window while its context grows.
* Chat: the Gemma-4-style chat template runs in SGLang's OpenAI server, and ``chat_template_kwargs``
  ``{"enable_thinking": ...}`` changes the prompt exactly as the template renders it.
"""

from __future__ import annotations

import json
import os
import re

import pytest

from dflash_sglang.deploy.launch import ServerProcess
from dflash_sglang.serving.kv_slots import SWA_EVICT_STRIDE
from dflash_sglang.testing.gemma4_golden import golden_errors, write_golden_checkpoint
from dflash_sglang.testing.tiny_gemma4 import THINK, write_gemma4_drafter, write_gemma4_tokenizer

pytestmark = pytest.mark.slow

COMMON_ARGS = ["--device", "cpu", "--attention-backend", "torch_native", "--disable-cuda-graph",
               "--skip-server-warmup", "--mem-fraction-static", "0.1", "--max-total-tokens", "4096",
               "--random-seed", "0", "--sleep-on-idle"]  # an idle module-scoped server sleeps, not polls a core
# Max |log-prob difference| vs the fp32 reference on the same (bf16-rounded) weights. fp32 serving: seen
# < 1e-5. bf16 serving: seen 0.17 (prefill) and 0.08 (decode); the fp32 check is the one that pins the math.
LOGPROB_ATOL = {"float32": 1e-3, "bfloat16": 0.3}


def _server(args: list[str], root, name: str, dtype: str = "bfloat16") -> ServerProcess:
    """A CPU server whose idle check fails on any KV slot (full or sliding) not back in its pool."""
    return ServerProcess([*args, *COMMON_ARGS, "--dtype", dtype], log_path=str(root / f"{name}.log"),
                         env=dict(os.environ, SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE="1"))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma4")
    for variant in ("dense", "moe"):
        write_golden_checkpoint(variant, str(root / variant))
    return root


@pytest.fixture(scope="module")
def dense(root):
    with _server(["--model-path", str(root / "dense")], root, "dense") as server:
        yield server


@pytest.fixture
def fp32_server(request, root):
    """A float32 server (``request.param``: variant, --tp-size, extra arguments) for one golden test only (idle
    SGLang servers still cost CPU on a 2-core host). At TP 2 the two ranks split the host's cores."""
    variant, tp_size, extra = request.param
    with _server(["--model-path", str(root / variant), "--tp-size", str(tp_size), *extra], root,
                 f"{variant}-fp32-tp{tp_size}{''.join(extra)}", "float32") as server:
        yield variant, server


@pytest.fixture(scope="module")
def moe_fp32(root):
    """The MoE variant served alone in float32 at TP 1: a golden case and the reference of DFLASH at TP 2."""
    with _server(["--model-path", str(root / "moe")], root, "moe-fp32-tp1", "float32") as server:
        yield server


@pytest.mark.parametrize("fp32_server", [("dense", 1, []), ("moe", 2, []),
                                         ("dense", 1, ["--disable-hybrid-swa-memory"])], indirect=True,
                         ids=["dense", "moe-tp2", "dense-one-slot-space"])
def test_golden_logprobs_fp32_serving(fp32_server):
    """At TP 2 (MoE variant, which covers the dense layers' split too) the sliding layers' two KV heads are split
    over the ranks, the full-attention layers' one KV head is replicated on both and the experts' columns are
    split. ``--disable-hybrid-swa-memory``: sliding layers in the full slot space (``Gemma4KVPool``)."""
    variant, server = fp32_server
    _check_golden(server, variant, "float32")


def test_golden_logprobs_fp32_serving_moe(moe_fp32):
    _check_golden(moe_fp32, "moe", "float32")


def test_golden_logprobs_bf16_serving(dense):
    _check_golden(dense, "dense", "bfloat16")


def _check_golden(server: ServerProcess, variant: str, dtype: str) -> None:
    errors = golden_errors(server.base_url, variant)
    print(f"{variant} served in {dtype}: max |log-prob error| {errors}")
    assert errors.worst() < LOGPROB_ATOL[dtype]


def test_kv_pool_keeps_each_layer_type_at_its_shape(dense):
    """No padding (sliding layers 2 KV heads x 16, full layers 2 x 32), the sliding layers in a pool of
    ``--swa-full-tokens-ratio`` (SGLang's default, 0.8) times the full slots, more than the profiled 4096
    tokens (--max-total-tokens) since a sliding slot costs half a full one here."""
    log = dense.log_text()
    match = re.search(r"Gemma 4 KV pool: sliding layers \[0, 2\]: 2 x 16, (\d+) slots; "
                      r"full layers \[1, 3\]: 2 x 32, (\d+) slots", log)
    assert match, log[-3000:]
    swa, full = map(int, match.groups())
    assert swa == int(full * 0.8) and full == int(4096 * (2 * 32 + 2 * 16) / (2 * 32 + 0.8 * 2 * 16))


def test_vision_tower_is_skipped_and_said_in_the_log(dense):
    assert "skipped 16 vision/audio tower tensors" in dense.log_text()
    assert "Gemma 4: serving text only" in dense.log_text()


@pytest.fixture(scope="module")
def dflash_dense(root):
    target = str(root / "dense")  # the dense fixture folder written for the `dense` server
    with open(os.path.join(target, "config.json"), encoding="utf-8") as handle:
        target_config = json.load(handle)
    ids, _ = write_gemma4_tokenizer(str(root / "tokenizer-ids"))
    drafter = write_gemma4_drafter(str(root / "drafter"), target_config, ids, block_size=8, sliding_window=8)
    args = ["--model-path", target, "--speculative-algorithm", "DFLASH", "--speculative-draft-model-path", drafter,
            "--decode-log-interval", "1"]  # the pools' use after every step, for the sliding-slot test
    with _server(args, root, "dflash") as server:
        yield server


def test_dflash_on_gemma4_is_lossless(dense, dflash_dense):
    for prompt in ("the quick brown fox", "In a small village by the sea there lived", "hello"):
        spec_ids, meta = dflash_dense.generate_greedy(prompt, 24)
        base_ids, _ = dense.generate_greedy(prompt, 24)
        assert spec_ids == base_ids, prompt
        assert meta["spec_verify_ct"] >= 1
    assert "DFLASH: block size 8" in dflash_dense.log_text()


def _long_greedy(server: ServerProcess, prompt: str, tokens: int) -> tuple[list[int], int]:
    """(``tokens`` greedy output ids, never stopping at EOS; the prompt's token count)."""
    result = server.generate({"text": prompt, "sampling_params": {"max_new_tokens": tokens, "temperature": 0,
                                                                  "ignore_eos": True}})
    return result["output_ids"], result["meta_info"]["prompt_tokens"]


def test_dflash_holds_a_window_of_sliding_slots_per_request(dense, dflash_dense):
    """160 tokens past the window (8): the plain server's tokens, and the sliding slots in use (the decode log's
    ``#swa token`` after every step) stay bounded while the request's full slots grow. A request holds its
    prompt's (the radix cache's node, locked while it runs), and from its own tokens at most the window (7 keys
    before a query), a block of slack, a stride of not-yet-freed ones and the 2 blocks the overlap loop
    assigns ahead (``kv_slots.evict_swa_slots``)."""
    prompt = "Once upon a time in a land far away"
    log_start = len(dflash_dense.log_text())
    spec_ids, prompt_tokens = _long_greedy(dflash_dense, prompt, 160)
    assert spec_ids == _long_greedy(dense, prompt, 160)[0]
    usage = [tuple(map(int, pair)) for pair in
             re.findall(r"#full token: (\d+), full token usage: [\d.]+, #swa token: (\d+)",
                        dflash_dense.log_text()[log_start:])]
    assert usage and max(full for full, _ in usage) >= prompt_tokens + 160, usage
    assert max(swa for _, swa in usage) <= prompt_tokens + 7 + 8 + SWA_EVICT_STRIDE + 2 * 8, usage


def _chat_prompt_tokens(server: ServerProcess, enable_thinking: bool | None) -> int:
    import openai

    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="none", timeout=600, max_retries=0)
    extra = {} if enable_thinking is None else {"chat_template_kwargs": {"enable_thinking": enable_thinking}}
    reply = client.chat.completions.create(model="default", messages=[{"role": "user", "content": "Count to three."}],
                                           max_tokens=4, temperature=0, extra_body=extra)
    return reply.usage.prompt_tokens


def test_chat_template_enable_thinking(dense, root):
    from sglang.srt.utils.hf_transformers_utils import get_tokenizer  # what the server itself loads

    tokenizer = get_tokenizer(str(root / "dense"))
    messages = [{"role": "user", "content": "Count to three."}]
    expected = {}
    for thinking in (True, False):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             enable_thinking=thinking)
        assert (THINK in text) == thinking, text
        expected[thinking] = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert expected[True] > expected[False]
    assert _chat_prompt_tokens(dense, True) == expected[True]
    assert _chat_prompt_tokens(dense, False) == expected[False]
    assert _chat_prompt_tokens(dense, None) == expected[False]


def test_dflash_on_gemma4_moe_at_tp2_is_lossless(root, moe_fp32):
    """DFLASH at --tp-size 2 (sharded drafter; the target's heads, replicated full-layer KV head and expert
    columns split) in the loop without the overlap scheduler, against the plain MoE server at TP 1, in float32,
    past the sliding window and the first freed sliding slots (100 tokens)."""
    target = str(root / "moe")
    with open(os.path.join(target, "config.json"), encoding="utf-8") as handle:
        target_config = json.load(handle)
    ids, _ = write_gemma4_tokenizer(str(root / "tokenizer-ids-moe"))
    drafter = write_gemma4_drafter(str(root / "drafter-moe"), target_config, ids, block_size=8)
    prompts = {"the quick brown fox": 24, "In a small village by the sea there lived": 100}
    expected = [_long_greedy(moe_fp32, prompt, tokens)[0] for prompt, tokens in prompts.items()]
    args = ["--model-path", target, "--speculative-algorithm", "DFLASH", "--speculative-draft-model-path", drafter,
            "--tp-size", "2", "--disable-overlap-schedule"]
    with _server(args, root, "moe-fp32-dflash-tp2", "float32") as dflash:
        for (prompt, tokens), ids_expected in zip(prompts.items(), expected):
            assert _long_greedy(dflash, prompt, tokens)[0] == ids_expected, prompt
        assert "DFLASH: block size 8" in dflash.log_text()
