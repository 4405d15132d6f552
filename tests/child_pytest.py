# SPDX-License-Identifier: Apache-2.0
"""Runs some of a test file's tests again in a child pytest with a different environment (the Triton
interpreter, the CPU driver stand-in), and holds the child to passing all of them, none skipped.

Modules that test SGLang's own layers, pools or scheduler import them only where ``sgl_kernel`` loads (a GPU
driver, or a child with ``deploy/cpu_stub.py``'s stand-in): their ``test_in_a_child_process``
(:func:`sglang_cpu_rerun`) runs the other tests in such a child.

The Triton op tests share one layout: their ``test_kernel_*`` tests run on the GPU where there is one, else a
``test_kernel_in_triton_interpreter`` (:func:`triton_interpreter_rerun`) runs them again in a child with
``TRITON_INTERPRET=1`` (which must be set before Triton is imported), where :func:`triton_kernel_device` is the
CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Callable

import pytest
import torch

CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def run_child_pytest(test_file: str, keyword: str, env: dict[str, str], timeout: int = 900) -> None:
    child = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file, "-k", keyword],
        env=env, capture_output=True, text=True, timeout=timeout)
    summary = child.stdout.strip().splitlines()[-1] if child.stdout.strip() else child.stderr[-2000:]
    assert child.returncode == 0, child.stdout[-6000:] + child.stderr[-2000:]
    assert " passed" in summary and "failed" not in summary and "skipped" not in summary, summary


def triton_interpreter_rerun(test_file: str) -> Callable[[], None]:
    """The test that reruns ``test_file``'s ``test_kernel_*`` tests in Triton's interpreter (skipped on a GPU, where
    they run directly, and in that child); assign it to ``test_kernel_in_triton_interpreter``."""

    @pytest.mark.skipif(CUDA or INTERPRETED, reason="the kernel tests run directly on a GPU (or in this child)")
    def test_kernel_in_triton_interpreter() -> None:
        pytest.importorskip("triton")
        run_child_pytest(test_file, "test_kernel_ and not interpreter", {**os.environ, "TRITON_INTERPRET": "1"})

    return test_kernel_in_triton_interpreter


def triton_kernel_device() -> str:
    """Where a kernel test runs its kernel: ``cuda``, or ``cpu`` in the interpreter's child; skips otherwise."""
    if not (CUDA or INTERPRETED):
        pytest.skip("no GPU: test_kernel_in_triton_interpreter runs this in Triton's interpreter")
    return "cuda" if CUDA else "cpu"


def sglang_cpu_rerun(test_file: str, child_flag: str, runs_here: bool,
                     extra_env: dict[str, str] | None = None) -> Callable[[], None]:
    """The test that reruns ``test_file``'s other tests in a child with SGLang's CPU environment and
    ``child_flag`` set (skipped where ``runs_here``: the tests then run directly); assign it to
    ``test_in_a_child_process``."""

    @pytest.mark.skipif(runs_here, reason="SGLang's modules import here: the tests run directly")
    def test_in_a_child_process() -> None:
        from dflash_sglang.deploy.cpu_stub import cpu_server_env

        env = {**cpu_server_env(), child_flag: "1", **(extra_env or {})}
        run_child_pytest(test_file, "not test_in_a_child_process", env, timeout=600)

    return test_in_a_child_process
