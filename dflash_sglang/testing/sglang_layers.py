# SPDX-License-Identifier: Apache-2.0
"""SGLang's model layers in one plain CPU process, without a server: for unit tests and op counts of our models.

:func:`init_sglang_single_process` sets what SGLang's layers read at construction -- the global server arguments
(every ``ServerArgs`` field at its default, device ``cpu``: no model config is loaded), a one-rank gloo
process group with TP / EP / PP size 1 and the MoE runner config -- as a scheduler process would. Import
SGLang's layers only in a process that can load ``sgl_kernel`` (a GPU driver or the CPU stand-in of
``deploy/cpu_stub.py``).
"""

from __future__ import annotations

import dataclasses
import socket


def init_sglang_single_process() -> None:
    """Idempotent within a process (SGLang's parallel groups cannot be set up twice)."""
    from sglang.srt.distributed import init_distributed_environment, initialize_model_parallel, parallel_state
    from sglang.srt.layers.moe import initialize_moe_config
    from sglang.srt.server_args import ServerArgs, set_global_server_args_for_scheduler

    if parallel_state.model_parallel_is_initialized():
        return
    args = object.__new__(ServerArgs)  # skips __post_init__, which would load a model config
    for field in dataclasses.fields(ServerArgs):
        if field.default is not dataclasses.MISSING:
            setattr(args, field.name, field.default)
        elif field.default_factory is not dataclasses.MISSING:
            setattr(args, field.name, field.default_factory())
    args.device = "cpu"
    set_global_server_args_for_scheduler(args)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                 distributed_init_method=f"tcp://127.0.0.1:{port}")
    initialize_model_parallel(1)
    initialize_moe_config(args)
