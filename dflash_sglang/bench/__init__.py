# SPDX-License-Identifier: Apache-2.0
"""Serving benchmark of a DFLASH deployment against the same target without speculation
(``scripts/bench_serving.py``): prompt sets (``prompts``), the streaming client (``client``), statistics and the
lossless check (``stats``), and the JSON + PNG report (``report``)."""
