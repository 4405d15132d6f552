# SPDX-License-Identifier: Apache-2.0
"""Starting, health-checking and stopping an SGLang server process (tests, benchmarks, scripts).

``ServerProcess`` runs ``python -m sglang.launch_server ARGS`` (or ``sglang serve ARGS``) in its own process
group with its log in a file, waits until ``/health_generate`` answers, and stops the whole group, also when
the launching program is stopped by SIGTERM (``timeout``, a job runner): the server's own process group
would otherwise outlive it and hold the GPU. On a CPU device it adds the libcuda stand-in and SGLang's CPU
engine to the environment (``cpu_stub.cpu_server_env``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Sequence

from dflash_sglang.deploy.cpu_stub import cpu_server_env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerStartError(RuntimeError):
    pass


LAUNCH_SERVER = (sys.executable, "-m", "sglang.launch_server")
SGLANG_SERVE = (os.path.join(os.path.dirname(sys.executable), "sglang"), "serve")
PORT_RETRIES = 2  # new ports tried when the picked one is taken before the server binds it


class ServerProcess:
    """One SGLang server. ``args`` are launch_server arguments without --host/--port; ``launcher`` is the
    command that takes them (``python -m sglang.launch_server`` or SGLang's ``sglang serve`` CLI)."""

    def __init__(self, args: Sequence[str], *, log_path: str, port: int | None = None, host: str = "127.0.0.1",
                 env: dict[str, str] | None = None, launcher: Sequence[str] = LAUNCH_SERVER) -> None:
        self.launcher = list(launcher)
        self.host = host
        self.port_given = port is not None
        self.port = port or free_port()
        self.server_args = list(args)
        self.log_path = log_path
        base_env = dict(os.environ if env is None else env)
        tp_size = int(_arg_value(args, "--tp-size") or _arg_value(args, "--tensor-parallel-size") or 1)
        self.env = cpu_server_env(base_env, tp_size) if _arg_value(args, "--device") == "cpu" else base_env
        self.process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def args(self) -> list[str]:
        return [*self.server_args, "--host", self.host, "--port", str(self.port)]

    def start(self, timeout_s: float = 600.0) -> "ServerProcess":
        """Starts the server and waits until it answers. A port this object picked itself can be taken between
        the pick and the server's bind (by another process, or by one of the ports SGLang picks at random for
        its own processes): the server then exits saying so, and it is started again on a new port, up to
        ``PORT_RETRIES`` times."""
        _exit_on_sigterm()
        retries = 0
        while True:
            with open(self.log_path, "w", encoding="utf-8") as log:
                self.process = subprocess.Popen([*self.launcher, *self.args], stdout=log,
                                                stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
            try:
                self._wait_healthy(timeout_s)
                return self
            except ServerStartError:
                self.stop()
                if self.port_given or retries == PORT_RETRIES or not self._lost_its_port():
                    raise
                retries += 1
                self.port = free_port()
            except BaseException:  # interrupted (SIGTERM, Ctrl-C): __exit__ will not run
                self.stop()
                raise

    def _lost_its_port(self) -> bool:
        log = self.log_text()
        return "address already in use" in log and f"'{self.host}', {self.port})" in log

    def _wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerStartError(f"SGLang server exited with code {self.process.returncode}; log tail:\n"
                                       f"{self.log_tail()}")
            if self.healthy():
                return
            time.sleep(1.0)
        raise ServerStartError(f"SGLang server not healthy after {timeout_s:.0f} s; log tail:\n{self.log_tail()}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base_url}/health_generate", timeout=30) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def post(self, path: str, body: dict) -> dict | None:
        """POSTs ``body`` as JSON to ``path`` (e.g. ``/generate``, ``/start_profile``); the JSON answer, if any."""
        request = urllib.request.Request(f"{self.base_url}{path}", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=600) as response:
            payload = response.read()
        try:
            return json.loads(payload)
        except ValueError:
            return None

    def generate(self, body: dict) -> dict:
        """One native ``/generate`` request (``text`` or ``input_ids`` plus ``sampling_params``)."""
        return self.post("/generate", body)

    def generate_greedy(self, prompt: str, max_new_tokens: int) -> tuple[list[int], dict]:
        """Native ``/generate`` at temperature 0: (output token ids, SGLang's meta_info)."""
        result = self.generate({"text": prompt, "sampling_params": {"max_new_tokens": max_new_tokens,
                                                                    "temperature": 0}})
        return result["output_ids"], result["meta_info"]

    def server_info(self) -> dict:
        with urllib.request.urlopen(f"{self.base_url}/get_server_info", timeout=30) as response:
            return json.load(response)

    def log_tail(self, lines: int = 60) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as handle:
                return "".join(handle.readlines()[-lines:])
        except OSError:
            return ""

    def log_text(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as handle:
            return handle.read()

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        except ProcessLookupError:
            pass

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _exit_on_sigterm() -> None:
    """Makes SIGTERM raise SystemExit in this process (where it still has the default, killing handler), so
    ``with ServerProcess(...)`` blocks unwind and stop their servers. Only the main thread can set handlers."""
    import threading

    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _raise_system_exit)


def _raise_system_exit(signum, frame) -> None:
    raise SystemExit(128 + signum)


def _arg_value(args: Sequence[str], flag: str) -> str | None:
    args = list(args)
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(f"{flag}="):
            return arg.split("=", 1)[1]
    return None
