# SPDX-License-Identifier: Apache-2.0
"""`dflash-train --regenerate-with sglang` on the tiny target (CPU, float32): SGLang's offline engine writes
byte-for-byte the rows the transformers path writes (greedy; responses that end on a stop token and responses cut
at --max-new-tokens), extends a partly written cache without duplicating rows, shuts its processes down before
training, starts no engine when nothing is left, and the rows train."""

import json
import os
import shutil
import subprocess
import sys
from collections import Counter

import pytest
import torch

from dflash_sglang.training import regenerate_sglang
from dflash_sglang.training.cli import main

pytestmark = pytest.mark.usefixtures("single_thread")

NUM_PROMPTS = 12
MAX_NEW_TOKENS = 20
REGEN_ARGS = ["--gen-batch-size", "5", "--no-progress"]
TRAIN_ARGS = ["--num-draft-layers", "1", "--block-size", "4", "--target-layer-ids", "1", "--num-anchors", "8",
              "--batch-size", "2", "--max-steps", "2", "--eval-holdout", "2", "--eval-max-new-tokens", "8"]
# Runs dflash-train in a fresh process started without the CPU libcuda stand-in on LD_LIBRARY_PATH (as a user
# would start it), then reports the processes left behind: the engine's must be gone before training.
CHILD = """
import sys
import psutil
from dflash_sglang.training.cli import main
code = main(sys.argv[1:])
print("CHILDREN", len(psutil.Process().children(recursive=True)))
sys.exit(code)
"""


def _rows(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


@pytest.fixture(scope="module")
def case(tiny_checkpoints, tmp_path_factory):
    """The tiny target with one more stop id, and the transformers path's cache for it. The tiny target never
    produces its own eos (it mostly repeats tokens), so the stop id is a token that its greedy answers to some
    prompts, not all, contain: rows then end both ways."""
    root = tmp_path_factory.mktemp("regen")
    prompts = root / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"The cat walks to the market {i} times."})
                                 for i in range(NUM_PROMPTS)))
    common = ["--prompts", str(prompts), "--regenerate-only", "--regenerate-with", "transformers", *REGEN_ARGS]
    probe = root / "probe.jsonl"
    assert main(["--target", tiny_checkpoints["target"], "--out", str(root / "probe"), "--data", str(probe),
                 "--max-new-tokens", str(2 * MAX_NEW_TOKENS), *common]) == 0
    responses = [r["response_ids"] for r in _rows(probe)]
    containing = Counter(t for response in responses for t in set(response))
    stop = min(containing, key=lambda t: (abs(2 * containing[t] - len(responses)), t))  # in about half of them
    target = root / "target"
    shutil.copytree(tiny_checkpoints["target"], target)
    config = json.loads((target / "generation_config.json").read_text())
    config["eos_token_id"] = [*config["eos_token_id"], stop]
    (target / "generation_config.json").write_text(json.dumps(config))

    expected = root / "transformers.jsonl"
    assert main(["--target", str(target), "--out", str(root / "tf"), "--data", str(expected),
                 "--max-new-tokens", str(MAX_NEW_TOKENS), *common]) == 0
    rows = _rows(expected)
    assert len(rows) == NUM_PROMPTS
    ends = Counter("stop" if r["response_ids"][-1] == stop else "length" for r in rows)
    assert all(len(r["response_ids"]) == MAX_NEW_TOKENS or r["response_ids"][-1] == stop for r in rows)
    assert ends["stop"] >= 2 and ends["length"] >= 2, ends
    return {"root": root, "prompts": str(prompts), "target": str(target), "expected": str(expected), "stop": stop}


@pytest.fixture(scope="module")
def sglang_run(case):
    """A cache holding the transformers path's first 4 rows, extended by `--regenerate-with sglang` (8 prompts
    answered by SGLang's engine), then 2 training steps on all 12 rows in the same process."""
    data = case["root"] / "sglang.jsonl"
    lines = open(case["expected"], encoding="utf-8").readlines()
    data.write_text("".join(lines[:4]))
    out = case["root"] / "sglang-run"
    argv = ["--target", case["target"], "--out", str(out), "--data", str(data), "--prompts", case["prompts"],
            "--regenerate", "--regenerate-with", "sglang", "--max-new-tokens", str(MAX_NEW_TOKENS), *REGEN_ARGS,
            *TRAIN_ARGS]
    run = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True, timeout=900,
                         env=dict(os.environ), cwd=case["root"])
    assert run.returncode == 0, run.stderr[-6000:]
    return {"data": str(data), "out": str(out), "stdout": run.stdout, "stderr": run.stderr}


@pytest.mark.slow
def test_sglang_rows_equal_the_transformers_rows(case, sglang_run):
    assert "regenerating 12 responses with the target (sglang)" in sglang_run["stderr"]
    assert "dflash-train: 8 new rows" in sglang_run["stderr"], sglang_run["stderr"][-3000:]
    # Same prompts, same responses (the stop token kept as the last id), same order, nothing duplicated.
    assert open(sglang_run["data"], encoding="utf-8").read() == open(case["expected"], encoding="utf-8").read()


@pytest.mark.slow
def test_engine_is_gone_before_training_and_the_rows_train(sglang_run):
    assert "CHILDREN 0" in sglang_run["stdout"], sglang_run["stdout"]
    log = json.load(open(os.path.join(sglang_run["out"], "training_log.json")))
    assert [r["step"] for r in log["history"]] == [1, 2]
    assert "10 training sequences" in sglang_run["stderr"]
    assert os.path.exists(os.path.join(sglang_run["out"], "model.safetensors"))


@pytest.mark.slow
def test_a_complete_cache_starts_no_engine(case, sglang_run, monkeypatch):
    def no_engine(kwargs):
        raise AssertionError("an engine was started for a complete cache")

    monkeypatch.setattr(regenerate_sglang, "running_engine", no_engine)
    before = open(sglang_run["data"], encoding="utf-8").read()
    assert main(["--target", case["target"], "--out", str(case["root"] / "again"), "--data", sglang_run["data"],
                 "--prompts", case["prompts"], "--regenerate", "--regenerate-with", "sglang", "--regenerate-only",
                 "--max-new-tokens", str(MAX_NEW_TOKENS), *REGEN_ARGS]) == 0
    assert open(sglang_run["data"], encoding="utf-8").read() == before


def test_engine_arguments_and_the_auto_choice():
    kwargs = regenerate_sglang.engine_kwargs("t", torch.device("cpu"), torch.float32, 3, {"mem_fraction_static": 0.2})
    assert kwargs == {"model_path": "t", "skip_tokenizer_init": True, "dtype": "float32", "random_seed": 3,
                      "device": "cpu", "attention_backend": "torch_native", "disable_cuda_graph": True,
                      "mem_fraction_static": 0.2}
    assert not regenerate_sglang.sglang_can_run(torch.device("cpu"))  # auto: transformers on the CPU
    with pytest.raises(ValueError, match="--regenerate-with transformers"):
        regenerate_sglang.engine_kwargs("t", torch.device("meta"), torch.float32, 0)
