# SPDX-License-Identifier: Apache-2.0
"""JSON reports of benchmarks and checks: what they ran on (commit, machine, GPU, package versions), and
writing them."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGES = ("dflash-sglang", "sglang", "torch", "transformers", "flashinfer-python", "sglang-kernel", "openai")


def git_commit(given: str | None = None) -> str:
    """``given`` (e.g. passed on the command line where the tree has no .git, as on the device machine),
    else ``git rev-parse HEAD`` of this repository, marked ``+dirty`` when tracked files differ from it."""
    if given:
        return given
    try:
        head = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def package_versions() -> dict[str, str]:
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def provenance(commit: str | None = None) -> dict:
    """commit, python, host, cpu count, GPU name and CUDA version (when there is one), package versions."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"commit": git_commit(commit), "python": platform.python_version(), "host": platform.node(),
            "cpus": os.cpu_count(), "gpu": gpu, "cuda": torch.version.cuda if gpu else None,
            "packages": package_versions()}


def write_report(report: dict, path: str) -> None:
    """Writes (or rewrites) a JSON report; scripts call it after every case, so a run cut short keeps
    what it measured."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
