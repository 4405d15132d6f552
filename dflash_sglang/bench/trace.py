# SPDX-License-Identifier: Apache-2.0
"""Reading a torch.profiler trace of SGLang decode steps (SGLang's ``/start_profile``): where a step's
time goes on the GPU and on the host.

A decode step is delimited by the scheduler's CUDA graph launches: a plain decode step launches one graph,
a DFLASH step two (drafter, then target verify). ``summarize_trace`` groups the trace into steps (one step
starts at each launch of the step's first graph), and reports per step, as medians:

* ``period_ms``: time between the starts of consecutive steps (what a user waits per step);
* ``gpu_busy_ms``: union of GPU kernel and memcpy time inside the step; ``gpu_idle_ms`` = period - busy,
  i.e. time the GPU waits for the host;
* ``graph_ms``: GPU span of each graph replay (first kernel start to last kernel end), by position in the step,
  and ``graph_top_kernels_ms``: the kernels that take the most time inside each (names without template
  arguments, summed per step);
* ``outside_graphs_ms``: GPU time of kernels launched eagerly (not by a graph), with the top ones by name, and
  ``outside_graphs_launches``: how many there are per step;
* ``host``: the CUDA runtime calls the host spent the most time in (synchronizations, copies, launches).

``profile_decode_steps`` records such a trace from a running server.
"""

from __future__ import annotations

import collections
import gzip
import json
import os
import statistics
import time
from typing import Any, Callable

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
GRAPH_LAUNCH = "cudaGraphLaunch"


def short_kernel_name(name: str) -> str:
    """``void ns::kernel<...>(...)`` -> ``ns::kernel``: one name per kernel whatever its template arguments."""
    name = name.removeprefix("void ")
    cut = min((i for i in (name.find("<"), name.find("(")) if i > 0), default=len(name))
    return name[:cut]


def profile_decode_steps(server, directory: str, prefix: str, num_steps: int, drive: Callable[[], object], *,
                         activities: list[str], record_shapes: bool, wait_s: int = 60,
                         settle_s: float = 2.0) -> str | None:
    """Traces ``num_steps`` decode steps of ``server`` (a ``deploy.launch.ServerProcess``) into ``directory``
    through SGLang's ``/start_profile`` by stage (prefill and decode steps go to separate files) while ``drive()``
    sends requests that outlive those steps. Returns the decode trace's path once the scheduler has written it
    (polled each second for ``wait_s`` seconds, then ``settle_s`` more for the write to finish), or None."""
    os.makedirs(directory, exist_ok=True)
    server.post("/start_profile", {"output_dir": directory, "num_steps": num_steps, "with_stack": False,
                                   "record_shapes": record_shapes, "activities": activities,
                                   "profile_prefix": prefix, "profile_by_stage": True})
    drive()
    for _ in range(wait_s):
        traces = sorted(f for f in os.listdir(directory) if f.endswith("-DECODE.trace.json.gz"))
        if traces:
            time.sleep(settle_s)
            return os.path.join(directory, traces[-1])
        time.sleep(1.0)
    return None


def load_events(path: str) -> list[dict[str, Any]]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return [e for e in json.load(handle)["traceEvents"] if e.get("ph") == "X"]


def _union_ms(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total / 1e3


def summarize_trace(events: list[dict[str, Any]], graphs_per_step: int, top: int = 8) -> dict[str, Any]:
    """Per-step medians of a trace (see the module docstring). ``graphs_per_step``: 1 (AR) or 2 (DFLASH)."""
    gpu = sorted((e for e in events if e.get("cat") in GPU_CATEGORIES), key=lambda e: e["ts"])
    runtime = [e for e in events if e.get("cat") == "cuda_runtime"]
    launches = sorted((e for e in runtime if e["name"] == GRAPH_LAUNCH), key=lambda e: e["ts"])
    graph_of = {e["args"]["correlation"]: i for i, e in enumerate(launches)}
    if len(launches) < 2 * graphs_per_step:
        raise ValueError(f"trace has {len(launches)} CUDA graph launches; need two steps of {graphs_per_step}")
    step_starts = [launches[i]["ts"] for i in range(0, len(launches) - graphs_per_step + 1, graphs_per_step)]

    steps = []
    for start, stop in zip(step_starts, step_starts[1:]):
        # The GPU work of a step: what its host launched in [start, stop) (kernels run after their launch).
        step_calls = [e for e in runtime if start <= e["ts"] < stop]
        corr = {e["args"]["correlation"] for e in step_calls if "correlation" in e["args"]}
        work = [e for e in gpu if e["args"].get("correlation") in corr]
        busy = _union_ms([(e["ts"], e["ts"] + e["dur"]) for e in work])
        graphs = collections.defaultdict(list)
        eager = collections.Counter()
        for e in work:
            index = graph_of.get(e["args"]["correlation"])
            if index is None:
                eager[e["name"]] += e["dur"]
            else:
                graphs[index].append(e)
        spans = [(max(e["ts"] + e["dur"] for e in graphs[i]) - min(e["ts"] for e in graphs[i])) / 1e3
                 for i in sorted(graphs)]
        inside = [collections.Counter() for _ in graphs]
        for position, index in enumerate(sorted(graphs)):
            for e in graphs[index]:
                inside[position][short_kernel_name(e["name"])] += e["dur"]
        host = collections.Counter()
        for e in step_calls:
            host[e["name"]] += e["dur"]
        steps.append({"period": (stop - start) / 1e3, "busy": busy, "spans": spans, "eager": eager, "host": host,
                      "inside": inside, "launches": sum(1 for e in work if graph_of.get(e["args"]["correlation"])
                                                        is None)})
    if not steps:
        raise ValueError("trace holds no complete step")

    def median(values):
        return statistics.median(values) if values else 0.0

    def largest(counters: list[collections.Counter]) -> dict[str, float]:
        totals = collections.Counter()
        for counter in counters:
            totals.update(counter)
        return {name: total / len(steps) / 1e3 for name, total in totals.most_common(top)}

    def top_names(key: str) -> dict[str, float]:
        return largest([step[key] for step in steps])

    width = min(len(s["spans"]) for s in steps)
    return {
        "steps": len(steps),
        "period_ms": median([s["period"] for s in steps]),
        "gpu_busy_ms": median([s["busy"] for s in steps]),
        "gpu_idle_ms": median([s["period"] - s["busy"] for s in steps]),
        "graph_ms": [median([s["spans"][i] for s in steps]) for i in range(width)],
        "graph_top_kernels_ms": [largest([s["inside"][i] for s in steps]) for i in range(width)],
        "outside_graphs_ms": median([sum(s["eager"].values()) / 1e3 for s in steps]),
        "outside_graphs_launches": median([s["launches"] for s in steps]),
        "top_outside_graphs_ms": top_names("eager"),
        "host_runtime_ms": top_names("host"),
    }



def summarize_cpu_trace(events: list[dict[str, Any]], num_steps: int, top: int = 15) -> dict[str, Any]:
    """Where the host's time goes in a CPU-only trace of ``num_steps`` decode steps (SGLang's ``/start_profile``
    with ``activities: ["CPU"]``): the ATen ops with the most SELF time (their time minus that of the ops they
    call) per step, by name and by ``name [input shapes]`` (when shapes were recorded). Nesting is read per
    thread from the events' intervals.

    Two figures per op: ``*_self_ms_per_step`` sums what the trace measured; ``*_typical_ms_per_step`` is its
    calls per step times its MEDIAN self time. On a shared CPU the OS preempts the process inside whatever op
    runs then (one call of a 20 us copy then lasts 10 ms); the typical figure is the op as it runs unpreempted.
    """
    ops = [e for e in events if e.get("cat") == "cpu_op"]
    if not ops:
        raise ValueError("trace holds no cpu_op events")
    self_times: dict[str, list[float]] = collections.defaultdict(list)
    by_thread: dict[Any, list[dict[str, Any]]] = collections.defaultdict(list)
    for e in ops:
        by_thread[(e.get("pid"), e.get("tid"))].append(e)
    top_level_us = 0.0
    for thread_ops in by_thread.values():
        thread_ops.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list[list[Any]] = []  # [end, key, duration, child time]

        def pop() -> None:
            _, key, duration, children = stack.pop()
            self_times[key].append(duration - children)

        for e in thread_ops:
            while stack and stack[-1][0] <= e["ts"]:
                pop()
            shapes = e.get("args", {}).get("Input Dims")
            key = f"{e['name']} {shapes}" if shapes else e["name"]
            if stack:
                stack[-1][3] += e["dur"]
            else:
                top_level_us += e["dur"]
            stack.append([e["ts"] + e["dur"], key, e["dur"], 0.0])
        while stack:
            pop()
    span_us = max(e["ts"] + e["dur"] for e in ops) - min(e["ts"] for e in ops)
    per_step = 1e3 * num_steps
    measured = {key: sum(times) / per_step for key, times in self_times.items()}
    typical = {key: len(times) * statistics.median(times) / per_step for key, times in self_times.items()}

    def by_name(figures: dict[str, float]) -> dict[str, float]:
        totals: collections.Counter = collections.Counter()
        for key, ms in figures.items():
            totals[key.split(" ", 1)[0]] += ms
        return totals

    def largest(figures: dict[str, float]) -> dict[str, float]:
        return dict(collections.Counter(figures).most_common(top))

    return {"steps": num_steps, "span_ms_per_step": span_us / per_step, "op_ms_per_step": top_level_us / per_step,
            "typical_op_ms_per_step": sum(typical.values()),
            "top_ops_self_ms_per_step": largest(by_name(measured)),
            "top_ops_typical_ms_per_step": largest(by_name(typical)),
            "top_shapes_typical_ms_per_step": largest(typical),
            "calls_per_step": {key: len(self_times[key]) / num_steps for key in largest(typical)}}
