# SPDX-License-Identifier: Apache-2.0
"""dflash_sglang.bench.trace: per-step GPU/host figures from a torch.profiler trace file, checked on a
trace with a known timeline (two graph launches per step, an eager kernel, a host synchronization)."""

from __future__ import annotations

import gzip
import json

import pytest

from dflash_sglang.bench.trace import load_events, summarize_cpu_trace, summarize_trace


def _runtime(name: str, ts: float, dur: float, correlation: int) -> dict:
    return {"ph": "X", "cat": "cuda_runtime", "name": name, "ts": ts, "dur": dur, "args": {"correlation": correlation}}


def _kernel(name: str, ts: float, dur: float, correlation: int) -> dict:
    return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur, "args": {"correlation": correlation}}


def _dflash_step(start: float, corr: int) -> list[dict]:
    """One step of 10 ms: drafter graph (2 kernels, 1.5 ms span), verify graph (6 ms span), an eager
    kernel (0.5 ms) and a 1 ms stream synchronize on the host; the GPU idles 2 ms."""
    return [
        _runtime("cudaGraphLaunch", start, 20, corr),
        _kernel("draft_gemm", start + 100, 1000, corr),
        _kernel("draft_attn", start + 1100, 500, corr),
        _runtime("cudaGraphLaunch", start + 1700, 20, corr + 1),
        _kernel("verify_gemm", start + 1700, 6000, corr + 1),
        _runtime("cudaLaunchKernel", start + 7800, 5, corr + 2),
        _kernel("verify_block", start + 7800, 500, corr + 2),
        _runtime("cudaStreamSynchronize", start + 7810, 1000, corr + 3),
        {"ph": "X", "cat": "cpu_op", "name": "aten::cat", "ts": start + 9000, "dur": 10, "args": {}},
    ]


@pytest.fixture
def trace_file(tmp_path):
    events = [event for step in range(4) for event in _dflash_step(step * 10_000, 10 * step)]
    path = tmp_path / "host.trace.json.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        json.dump({"traceEvents": events + [{"ph": "M", "name": "process_name"}]}, handle)
    return str(path)


def test_summary_of_a_known_timeline(trace_file):
    summary = summarize_trace(load_events(trace_file), graphs_per_step=2)
    assert summary["steps"] == 3  # the last step has no successor to bound it
    assert summary["period_ms"] == pytest.approx(10.0)
    assert summary["gpu_busy_ms"] == pytest.approx(1.5 + 6.0 + 0.5)
    assert summary["gpu_idle_ms"] == pytest.approx(2.0)
    assert summary["graph_ms"] == pytest.approx([1.5, 6.0])
    assert summary["outside_graphs_ms"] == pytest.approx(0.5)
    assert summary["top_outside_graphs_ms"] == pytest.approx({"verify_block": 0.5})
    assert summary["outside_graphs_launches"] == 1
    assert summary["graph_top_kernels_ms"] == [pytest.approx({"draft_gemm": 1.0, "draft_attn": 0.5}),
                                               pytest.approx({"verify_gemm": 6.0})]
    assert summary["host_runtime_ms"]["cudaStreamSynchronize"] == pytest.approx(1.0)


def test_plain_decode_steps_of_one_graph(tmp_path):
    events = []
    for step in range(5):  # 6 ms apart, a 5 ms graph replay each
        events += [_runtime("cudaGraphLaunch", step * 6000, 20, step),
                   _kernel("decode_gemm", step * 6000 + 50, 5000, step)]
    path = tmp_path / "ar.trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    summary = summarize_trace(load_events(str(path)), graphs_per_step=1)
    assert summary["steps"] == 4
    assert (summary["period_ms"], summary["gpu_idle_ms"]) == (pytest.approx(6.0), pytest.approx(1.0))
    assert summary["graph_ms"] == pytest.approx([5.0])


def test_kernel_names_drop_their_template_and_argument_lists():
    from dflash_sglang.bench.trace import short_kernel_name

    assert short_kernel_name("void at::native::reduce_kernel<512, 1>(at::native::ReduceOp<float>)") == \
        "at::native::reduce_kernel"
    assert short_kernel_name("nvjet_sm90_tst_64x16_64x16_2x1_v_bz_splitK_TNT") == \
        "nvjet_sm90_tst_64x16_64x16_2x1_v_bz_splitK_TNT"


def test_too_short_a_trace_is_a_clear_error(tmp_path):
    path = tmp_path / "short.trace.json"
    path.write_text(json.dumps({"traceEvents": _dflash_step(0, 0)}))
    with pytest.raises(ValueError, match="2 CUDA graph launches; need two steps of 2"):
        summarize_trace(load_events(str(path)), graphs_per_step=2)


def _cpu_op(name: str, ts: float, dur: float, dims: list | None = None, tid: int = 1) -> dict:
    args = {"Input Dims": dims} if dims is not None else {}
    return {"ph": "X", "cat": "cpu_op", "name": name, "ts": ts, "dur": dur, "pid": 1, "tid": tid, "args": args}


def test_cpu_trace_self_times_and_typical_figures():
    """Two steps: aten::linear (1000 us) calls aten::mm (800 us, one of them preempted to 10800 us); an
    aten::add of 50 us on its own; an op on another thread overlapping in time is not anyone's child."""
    events = []
    for step, mm_us in ((0, 800), (1, 10800)):
        start = step * 20000
        events += [_cpu_op("aten::linear", start, mm_us + 200, [[16, 576], [3072, 576]]),
                   _cpu_op("aten::mm", start + 100, mm_us, [[16, 576], [576, 3072]]),
                   _cpu_op("aten::add", start + mm_us + 300, 50, [[16, 576], [16, 576]]),
                   _cpu_op("aten::copy_", start + 150, 30, tid=2)]
    summary = summarize_cpu_trace(events, num_steps=2)
    assert summary["top_ops_self_ms_per_step"]["aten::mm"] == pytest.approx((800 + 10800) / 2 / 1e3)
    assert summary["top_ops_self_ms_per_step"]["aten::linear"] == pytest.approx(0.2)  # its own 200 us per step
    assert summary["top_ops_typical_ms_per_step"]["aten::mm"] == pytest.approx(2 * 5800 / 2 / 1e3)  # median x calls
    assert summary["top_ops_self_ms_per_step"]["aten::copy_"] == pytest.approx(0.03)
    key = "aten::add [[16, 576], [16, 576]]"
    assert summary["top_shapes_typical_ms_per_step"][key] == pytest.approx(0.05) and summary["calls_per_step"][key] == 1
    assert summary["op_ms_per_step"] == pytest.approx((1000 + 50 + 30 + 11000 + 50 + 30) / 2 / 1e3)
