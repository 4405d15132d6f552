# SPDX-License-Identifier: Apache-2.0
"""A stand-in ``libcuda.so.1`` so SGLang's kernel library (``sgl_kernel``) imports on a CPU-only machine.

``sgl_kernel``'s compiled ops link the GPU driver library; without a GPU driver the import fails and SGLang
cannot start, even with ``--device cpu``. The stand-in defines every driver entry point those libraries
import as a function returning CUDA_ERROR_NO_DEVICE (100). It is compiled once with the system C compiler
into a cache folder; a process that should use it needs that folder on ``LD_LIBRARY_PATH`` at start-up
(``cpu_server_env``), or, already running, the stand-in loaded before SGLang is imported
(``prepare_cpu_engine_process``). Never used where a real driver is present.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import hashlib
import os
import shutil
import subprocess

CUDA_ERROR_NO_DEVICE = 100


def driver_present() -> bool:
    return ctypes.util.find_library("cuda") is not None


def _sgl_kernel_libraries() -> list[str]:
    import importlib.util

    spec = importlib.util.find_spec("sgl_kernel")
    if spec is None or not spec.submodule_search_locations:
        return []
    root = list(spec.submodule_search_locations)[0]
    return sorted(glob.glob(os.path.join(root, "**", "*.so"), recursive=True))


def _driver_symbols(libraries: list[str]) -> list[str]:
    if shutil.which("nm") is None:
        raise RuntimeError("building the CPU libcuda stand-in needs `nm` (binutils): apt-get install binutils")
    symbols: set[str] = set()
    for library in libraries:
        out = subprocess.run(["nm", "-D", "--undefined-only", library], capture_output=True, text=True).stdout
        for line in out.splitlines():
            name = line.split()[-1].split("@")[0] if line.split() else ""
            if name.startswith("cu") and name[2:3].isupper():
                symbols.add(name)
    return sorted(symbols)


def ensure_libcuda_stub(cache_dir: str | None = None) -> str | None:
    """Builds (once) the stand-in and returns its folder, or None when a real driver is present or SGLang's
    kernels need none."""
    if driver_present():
        return None
    libraries = _sgl_kernel_libraries()
    symbols = _driver_symbols(libraries)
    if not symbols:
        return None
    from dflash_sglang.core.config import stub_cache_dir

    digest = hashlib.sha256("\n".join(symbols).encode()).hexdigest()[:16]
    folder = os.path.join(cache_dir or stub_cache_dir(), digest)
    target = os.path.join(folder, "libcuda.so.1")
    if os.path.exists(target):
        return folder
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("building the CPU libcuda stand-in needs a C compiler (cc/gcc): apt-get install gcc")
    os.makedirs(folder, exist_ok=True)
    source = os.path.join(folder, "libcuda_stub.c")
    with open(source, "w", encoding="utf-8") as handle:
        handle.write("/* CPU-only stand-in for the CUDA driver: every entry point reports no device. */\n")
        for name in symbols:
            handle.write(f"int {name}(void) {{ return {CUDA_ERROR_NO_DEVICE}; }}\n")
    partial = target + f".{os.getpid()}.tmp"
    subprocess.run([compiler, "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", partial, source], check=True)
    os.replace(partial, target)
    return folder


def cpu_server_env(base: dict[str, str] | None = None, tp_size: int = 1) -> dict[str, str]:
    """An environment for running SGLang on the CPU: the stand-in on LD_LIBRARY_PATH and SGLang's CPU engine; at
    ``tp_size`` > 1 also ``SGLANG_CPU_OMP_THREADS_BIND`` unless given (:func:`cpu_threads_bind`)."""
    env = dict(os.environ if base is None else base)
    folder = ensure_libcuda_stub()
    if folder is not None:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (folder, env.get("LD_LIBRARY_PATH", "")) if p)
    env["SGLANG_USE_CPU_ENGINE"] = "1"
    if tp_size > 1:
        env.setdefault("SGLANG_CPU_OMP_THREADS_BIND", cpu_threads_bind(tp_size))
    return env


def prepare_cpu_engine_process() -> None:
    """Lets this running process start ``sglang.Engine`` on the CPU: :func:`cpu_server_env` for it and the
    engine's subprocesses, and the stand-in loaded now, since the dynamic loader read ``LD_LIBRARY_PATH`` at
    start-up (a library loaded globally satisfies later ``libcuda.so.1`` dependencies by its soname). Call it
    before SGLang's engine is imported; it changes this process's environment."""
    os.environ.update(cpu_server_env())
    folder = ensure_libcuda_stub()
    if folder is not None:
        ctypes.CDLL(os.path.join(folder, "libcuda.so.1"), mode=ctypes.RTLD_GLOBAL)


def cpu_threads_bind(tp_size: int) -> str:
    """SGLang's ``SGLANG_CPU_OMP_THREADS_BIND`` for ``tp_size`` ranks: this host's cores split evenly, e.g.
    ``0-7|8-15``. SGLang's CPU path otherwise refuses more ranks than NUMA nodes (its ``init_threads_binding``)."""
    cores = os.cpu_count() or 1
    if cores < tp_size:
        raise ValueError(f"--tp-size {tp_size} on the CPU needs one core per rank; this host has {cores}")
    per_rank = cores // tp_size
    return "|".join(f"{r * per_rank}-{(r + 1) * per_rank - 1}" for r in range(tp_size))
