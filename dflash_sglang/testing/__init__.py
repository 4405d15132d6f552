# SPDX-License-Identifier: Apache-2.0
"""Checkpoints for tests and demos, written offline: tiny random Qwen3 targets with DFlash drafters
(``tiny``) and tiny Gemma 4 targets (``tiny_gemma4``)."""
