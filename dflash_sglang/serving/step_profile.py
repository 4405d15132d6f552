# SPDX-License-Identifier: Apache-2.0
"""Where a DFLASH decode step spends its time: per-part timings for ``scripts/bench_step.py``.

With ``DFLASH_STEP_PROFILE=PATH`` set, the worker marks the boundaries of each decode step's parts
(``mark``), and :class:`StepProfiler` times them with CUDA events on the GPU stream (``time.perf_counter``
on a CPU), plus the step's wall time and the host time between the end of one step and the start of the
next (the scheduler's own work). Every ``flush_every`` steps it appends one JSON line per batch size:
``{"batch_size", "steps", "parts_ms": {part: mean}, "step_wall_ms", "between_steps_ms"}``, plus the medians
``parts_ms_median`` and ``step_wall_ms_median`` (on a shared CPU a step the OS preempts drags the mean; the
median is the step as it runs), and on a CPU ``parts_cpu_ms_median``: the process's CPU time per part
(``time.process_time``, all threads), which other processes' load does not inflate.
Without the variable the worker gets :class:`NoProfiler`, whose methods do nothing.
"""

from __future__ import annotations

import json
import statistics
import time
from collections import defaultdict, deque

import torch

from dflash_sglang.core.config import step_profile_path


class NoProfiler:
    def start_step(self) -> None:
        """Nothing to time."""

    def mark(self, part: str) -> None:
        """Nothing to time."""

    def end_step(self, batch_size: int) -> None:
        """Nothing to time."""


class StepProfiler(NoProfiler):
    def __init__(self, path: str, device: torch.device, flush_every: int = 20) -> None:
        self.path = path
        self.cuda = device.type == "cuda"
        self.flush_every = flush_every
        self._marks: list[tuple[str, object]] = []
        self._step_start = 0.0
        self._last_end: float | None = None
        self._pending: deque[tuple[int, list[tuple[str, object]], dict[str, float]]] = deque()
        self._sums: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self._steps: dict[int, int] = defaultdict(int)
        self._samples: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))

    def _stamp(self) -> object:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter(), time.process_time()

    def start_step(self) -> None:
        self._step_start = time.perf_counter()
        self._marks = [("start", self._stamp())]

    def mark(self, part: str) -> None:
        """Ends the part called ``part`` (it began at the previous mark)."""
        self._marks.append((part, self._stamp()))

    def end_step(self, batch_size: int) -> None:
        """Files the step; its GPU times are read once its last event has completed (never waiting for it,
        so profiling leaves the overlap scheduler's pipelining intact)."""
        now = time.perf_counter()
        walls = {"step_wall_ms": (now - self._step_start) * 1e3}
        if self._last_end is not None:
            walls["between_steps_ms"] = (self._step_start - self._last_end) * 1e3
        self._last_end = now
        self._pending.append((batch_size, self._marks, walls))
        while self._pending and self._complete(self._pending[0][1][-1][1]):
            self._account(*self._pending.popleft())

    def _complete(self, stamp: object) -> bool:
        return not self.cuda or stamp.query()

    def _account(self, batch_size: int, marks: list[tuple[str, object]], walls: dict[str, float]) -> None:
        sums, samples = self._sums[batch_size], self._samples[batch_size]
        for (_, begin), (part, end) in zip(marks, marks[1:]):
            if self.cuda:
                ms = begin.elapsed_time(end)
            else:
                ms = (end[0] - begin[0]) * 1e3
                samples[f"cpu:{part}"].append((end[1] - begin[1]) * 1e3)
            sums[part] += ms
            samples[part].append(ms)
        for key, value in walls.items():
            sums[key] += value
            samples[key].append(value)
        self._steps[batch_size] += 1
        if self._steps[batch_size] % self.flush_every == 0:
            self._flush(batch_size)

    def _flush(self, batch_size: int) -> None:
        steps, sums, samples = self._steps[batch_size], self._sums.pop(batch_size), self._samples.pop(batch_size)
        self._steps[batch_size] = 0
        walls = {key: sums.pop(key, 0.0) / steps for key in ("step_wall_ms", "between_steps_ms")}
        medians = {key: statistics.median(values) for key, values in samples.items()}
        record = {"batch_size": batch_size, "steps": steps,
                  "parts_ms": {part: total / steps for part, total in sums.items()}, **walls,
                  "parts_ms_median": {part: medians[part] for part in sums},
                  "step_wall_ms_median": medians["step_wall_ms"],
                  "between_steps_ms_median": medians.get("between_steps_ms", 0.0)}
        if not self.cuda:
            record["parts_cpu_ms_median"] = {part: medians[f"cpu:{part}"] for part in sums}
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


def make_profiler(device: str | torch.device) -> NoProfiler:
    path = step_profile_path()
    return NoProfiler() if path is None else StepProfiler(path, torch.device(device))
