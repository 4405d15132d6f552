# SPDX-License-Identifier: Apache-2.0
"""ServerProcess stops its server's process group when the launching program is stopped by SIGTERM (as
``timeout`` does on the device machine): the group is a session of its own and would otherwise outlive the
launcher and hold the GPU. And a real SGLang server whose picked port is taken before it binds is started again
on another port (a CI run lost a module's servers to that race)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from dflash_sglang.deploy.launch import ServerProcess, ServerStartError
from tiny_servers import COMMON_ARGS

LAUNCHER = r'''
import sys
from dflash_sglang.deploy.launch import ServerProcess

# A "server" that never answers /health_generate: the launcher is still waiting for it when SIGTERM comes.
launcher = [sys.executable, "-c", "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); "
            "time.sleep(300)", sys.argv[2]]
with ServerProcess([], log_path=sys.argv[1] + ".log", launcher=launcher):
    pass
'''


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_sigterm_to_the_launcher_stops_the_server(tmp_path):
    pid_file = tmp_path / "server.pid"
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(tmp_path / "server"), str(pid_file)])
    try:
        deadline = time.monotonic() + 60
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline and launcher.poll() is None, "the server never started"
            time.sleep(0.2)
        server_pid = int(pid_file.read_text())
        assert _alive(server_pid)
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=60) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 10
        while _alive(server_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(server_pid), "the server outlived its launcher"
    finally:
        launcher.kill()


def _occupied_port() -> socket.socket:
    """A port bound by another socket. Not listening: a health poll to it is refused at once rather than waiting
    out its timeout on a connection nobody answers (the bind conflict is the same)."""
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.bind(("127.0.0.1", 0))
    return holder


@pytest.mark.slow
def test_a_server_that_loses_its_picked_port_starts_on_another(tiny_checkpoints, tmp_path):
    args = ["--model-path", tiny_checkpoints["target"], *COMMON_ARGS]
    with _occupied_port() as holder:
        taken = holder.getsockname()[1]
        server = ServerProcess(args, log_path=str(tmp_path / "server.log"))
        server.port = taken  # as if another process had bound the picked port before the server did
        with server:
            assert server.port != taken
            ids, _ = server.generate_greedy("hello", 4)
            assert len(ids) == 4


# Binds --port as uvicorn does (asyncio's create_server): on a taken port it exits with asyncio's own bind error,
# the message a real server's log ends with.
BINDING_LAUNCHER = [sys.executable, "-c", "import asyncio, sys; port = int(sys.argv[sys.argv.index('--port') + 1]); "
                    "asyncio.run(asyncio.start_server(lambda reader, writer: None, '127.0.0.1', port)); "
                    "print('bound', flush=True); sys.exit(3)"]


def test_a_port_the_caller_chose_is_not_retried(tmp_path):
    """A port the caller chose is the caller's: one start, and the error names the bind failure."""
    with _occupied_port() as holder:
        taken = holder.getsockname()[1]
        pinned = ServerProcess([], log_path=str(tmp_path / "pinned.log"), port=taken, launcher=BINDING_LAUNCHER)
        with pytest.raises(ServerStartError, match="address already in use"):
            pinned.start()
        assert pinned.port == taken and "bound" not in pinned.log_text()
