# SPDX-License-Identifier: Apache-2.0
"""Runs some of a test file's tests again in a child pytest with a different environment (the Triton
interpreter, the CPU driver stand-in), and holds the child to passing all of them, none skipped."""

from __future__ import annotations

import subprocess
import sys


def run_child_pytest(test_file: str, keyword: str, env: dict[str, str], timeout: int = 900) -> None:
    child = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file, "-k", keyword],
        env=env, capture_output=True, text=True, timeout=timeout)
    summary = child.stdout.strip().splitlines()[-1] if child.stdout.strip() else child.stderr[-2000:]
    assert child.returncode == 0, child.stdout[-6000:] + child.stderr[-2000:]
    assert " passed" in summary and "failed" not in summary and "skipped" not in summary, summary
