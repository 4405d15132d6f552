# SPDX-License-Identifier: Apache-2.0
"""What the Triton kernels size themselves by: the device's streaming multiprocessor count and shared memory."""

from __future__ import annotations

import functools

import torch


@functools.cache
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (1 elsewhere, e.g. under Triton's CPU interpreter)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


@functools.cache
def shared_memory_per_block(device: torch.device) -> int:
    """Bytes of shared memory one CUDA program may opt into (0 elsewhere: the interpreter pipelines nothing)."""
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin if device.type == "cuda" else 0
