# SPDX-License-Identifier: Apache-2.0
"""serving.step_profile on the CPU: per-part means and medians of wall time, and the process's CPU time per part."""

from __future__ import annotations

import json
import time

import torch

from dflash_sglang.serving.step_profile import StepProfiler


def test_cpu_records_means_medians_and_cpu_time(tmp_path):
    path = tmp_path / "profile.jsonl"
    profiler = StepProfiler(str(path), torch.device("cpu"), flush_every=3)
    for sleep_s in (0.001, 0.001, 0.05):  # the last step is "preempted": sleeping takes no CPU
        profiler.start_step()
        sum(range(20000))
        profiler.mark("draft")
        time.sleep(sleep_s)
        profiler.mark("verify")
        profiler.end_step(batch_size=1)
    (record,) = [json.loads(line) for line in path.read_text().splitlines()]
    assert record["batch_size"] == 1 and record["steps"] == 3
    assert set(record["parts_ms"]) == set(record["parts_ms_median"]) == set(record["parts_cpu_ms_median"]) == \
        {"draft", "verify"}
    assert record["parts_ms"]["verify"] > 15 > 5 > record["parts_ms_median"]["verify"] >= 1  # the mean takes the 50 ms
    assert record["parts_cpu_ms_median"]["verify"] < 1  # sleeping uses no CPU
    assert record["step_wall_ms_median"] < record["step_wall_ms"]
