# SPDX-License-Identifier: Apache-2.0
"""The SGLang hook as users get it: a plain (non-editable) `pip install .` registers DFLASH in a fresh
interpreter without any import by the user, and `DFLASH_SGLANG_DISABLE=1` leaves SGLang exactly as it was.

The plain install goes into a target folder (`pip install --target`), and a Python started with `-S`
(no site processing, so the editable install of this checkout is invisible) sees SGLang's dependencies as
plain folders and only that target as a site directory, as a regular installation would.
"""

from __future__ import annotations

import os
import site
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHECK_REGISTERED = """
import sys
from sglang.srt.speculative.spec_info import SpeculativeAlgorithm
from sglang.srt.server_args import ServerArgs
import argparse
parser = argparse.ArgumentParser()
ServerArgs.add_cli_args(parser)
args = parser.parse_args(["--model-path", "m", "--speculative-algorithm", "DFLASH"])
import dflash_sglang
print("DFLASH" in SpeculativeAlgorithm.__members__, args.speculative_algorithm, dflash_sglang.__file__)
"""


def _python(code: str, env: dict[str, str] | None = None, isolated_site: str | None = None
            ) -> subprocess.CompletedProcess:
    if isolated_site is None:
        command = [sys.executable, "-c", code]
    else:
        dependencies = site.getsitepackages()
        prelude = (f"import site, sys; sys.path.extend({dependencies!r}); site.addsitedir({isolated_site!r})\n")
        command = [sys.executable, "-S", "-c", prelude + code]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd="/")


def test_plain_pip_install_registers_dflash_in_a_fresh_interpreter(tmp_path):
    target = tmp_path / "site"
    env = dict(os.environ, DFLASH_SKIP_EXTENSION="1")
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet",
                              "--target", str(target), REPO], capture_output=True, text=True, timeout=600, env=env)
    assert install.returncode == 0, install.stderr[-3000:]
    assert (target / "dflash_sglang_hook.pth").exists(), sorted(os.listdir(target))
    assert not list(target.glob("__editable__*")), "a plain install, not an editable one"

    run = _python(CHECK_REGISTERED, isolated_site=str(target))
    assert run.returncode == 0, run.stderr[-3000:]
    registered, algorithm, package_file = run.stdout.split()
    assert registered == "True" and algorithm == "DFLASH"
    assert package_file.startswith(str(target)), "the installed copy, not this checkout, was imported"


def test_disable_variable_leaves_sglang_untouched():
    enabled = _python(CHECK_REGISTERED)
    assert enabled.returncode == 0 and enabled.stdout.startswith("True DFLASH"), enabled.stderr[-3000:]

    disabled = _python(CHECK_REGISTERED, env=dict(os.environ, DFLASH_SGLANG_DISABLE="1"))
    assert disabled.returncode != 0
    assert "invalid choice: 'DFLASH'" in disabled.stderr, disabled.stderr[-3000:]
    list_members = "from sglang.srt.speculative.spec_info import SpeculativeAlgorithm as S; print(list(S.__members__))"
    members = _python(list_members, env=dict(os.environ, DFLASH_SGLANG_DISABLE="1"))
    assert members.returncode == 0 and "DFLASH" not in members.stdout, members.stdout + members.stderr


@pytest.mark.parametrize("module", ["sglang.srt.server_args", "sglang.srt.speculative.spec_info"])
def test_hook_patches_modules_imported_in_any_order(module):
    """The scheduler's spawned processes import SGLang modules in their own order; each patch applies when
    its module loads, whichever comes first."""
    run = _python(f"import {module}\n" + CHECK_REGISTERED)
    assert run.returncode == 0 and run.stdout.startswith("True DFLASH"), run.stderr[-3000:]
