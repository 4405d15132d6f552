# SPDX-License-Identifier: Apache-2.0
"""From a YAML deployment file to a running SGLang server: the file's schema (``deployment``), the
``dflash-serve`` command (``serve``), server processes (``launch``) and the CPU stand-in for the GPU
driver that SGLang's kernels library links (``cpu_stub``)."""
