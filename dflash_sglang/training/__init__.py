# SPDX-License-Identifier: Apache-2.0
"""Training DFlash drafters: regenerated data (data.py), the objective (objective.py), the loop (loop.py) and
the `dflash-train` command (cli.py)."""
