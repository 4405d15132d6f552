# SPDX-License-Identifier: Apache-2.0
"""Runs some of a test file's tests again in a child pytest with a different environment (the Triton
interpreter, the CPU driver stand-in), and holds the child to passing all of them, none skipped.

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
