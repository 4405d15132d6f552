# SPDX-License-Identifier: Apache-2.0
"""ServerProcess stops its server's process group when the launching program is stopped by SIGTERM (as
``timeout`` does on the device machine): the group is a session of its own and would otherwise outlive the
launcher and hold the GPU."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

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
