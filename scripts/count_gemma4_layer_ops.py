# SPDX-License-Identifier: Apache-2.0
"""Counts the ops of one Gemma 4 decoder layer's decode step (1 token) on the CPU, per part of the layer.

A proxy for GPU kernel launches: built from the committed tiny MoE golden checkpoint (``tests/fixtures/gemma4/moe``)
in bf16, one sliding and one full-attention layer run a 1-token forward under a ``TorchDispatchMode`` that counts
ATen ops; the attention kernel itself is stubbed (identity on q; it is one backend
call either way) and the experts run the CPU PyTorch loop (on a GPU: FusedMoE's kernels), so compare the
``router`` and ``attention`` parts and the layer total without ``experts``. Two counts:

* ``aten``: every ATen op that runs on the CPU, views and empty allocations left out (no kernel);
* ``gpu-proxy``: the same, but each call of an SGLang op module with a fused CUDA path (``MultiPlatformOp``:
  RMSNorm, TopK, RoPE, GeluAndMul) or of one of this project's Triton ops (``ops.residual_norm``,
  ``ops.qkv_norm_rope``) counts as one launch, as on CUDA (``TopK``: ``topk_softmax``).

Usage (the CPU stand-in for the GPU driver is set up by the script): ``python scripts/count_gemma4_layer_ops.py``.
"""

from __future__ import annotations

import collections
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD = "DFLASH_COUNT_OPS_CHILD"


def _count(layer, positions, hidden, next_norm) -> dict[str, collections.Counter]:
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from sglang.srt.layers.moe.topk import TopK
    from sglang.srt.layers.utils import MultiPlatformOp

    from dflash_sglang import ops

    aten = torch.ops.aten
    no_kernel = {aten.detach, aten.lift_fresh, aten.empty, aten.empty_like, aten.empty_strided}
    counts = {"aten": collections.Counter(), "gpu-proxy": collections.Counter()}
    stack: list[str] = []
    fused_depth = [0]

    def part() -> str:
        names = [name for name in stack if name]
        return names[-1] if names else "rest"

    class Counter(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view and func.overloadpacket not in no_kernel:
                counts["aten"][part()] += 1
                if not fused_depth[0]:
                    counts["gpu-proxy"][part()] += 1
            return func(*args, **(kwargs or {}))

    def enter_fused() -> None:
        if not fused_depth[0]:
            counts["gpu-proxy"][part()] += 1
        fused_depth[0] += 1

    def leave_fused() -> None:
        fused_depth[0] -= 1

    def enter(name: str, module):
        def hook(*_):
            stack.append(name)
            if isinstance(module, MultiPlatformOp):
                enter_fused()
        return hook

    def leave(module):
        def hook(*_):
            stack.pop()
            if isinstance(module, MultiPlatformOp):
                leave_fused()
        return hook

    def counted_as_one(op):
        """``op`` counted as one launch (TopK's native path is called directly on the CPU, where on CUDA the module
        call would run ``topk_softmax``; the Triton ops are one kernel on CUDA)."""
        def run(*args, **kwargs):
            enter_fused()
            try:
                return op(*args, **kwargs)
            finally:
                leave_fused()
        return run

    forward_native = TopK.forward_native
    triton_ops = {name: getattr(ops, name) for name in ("residual_norm", "qkv_norm_rope")}

    parts = {"self_attn": "attention", "moe.router": "router", "moe": "experts", "mlp": "mlp"}
    for name, module in layer.named_modules():
        label = parts.get(name, "")
        module.register_forward_pre_hook(enter(label, module))
        module.register_forward_hook(leave(module))
    TopK.forward_native = counted_as_one(forward_native)
    for name, op in triton_ops.items():
        setattr(ops, name, counted_as_one(op))
    try:
        with Counter():
            layer(positions, hidden, hidden, None, next_norm)
    finally:
        TopK.forward_native = forward_native
        for name, op in triton_ops.items():
            setattr(ops, name, op)
    return counts


def main() -> None:
    import torch
    from safetensors.torch import load_file

    from dflash_sglang.testing.sglang_layers import init_sglang_single_process

    init_sglang_single_process()
    from dflash_sglang.serving.models.gemma4 import Gemma4ForCausalLM
    from dflash_sglang.serving.models.gemma4_config import Gemma4Config

    torch.set_default_dtype(torch.bfloat16)  # as SGLang builds a bf16 model: the served dtype, casts included
    folder = os.path.join(ROOT, "tests", "fixtures", "gemma4", "moe")
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as handle:
        config = Gemma4Config.from_dict(json.load(handle))
    model = Gemma4ForCausalLM(config)
    model.load_weights(load_file(os.path.join(folder, "model.safetensors")).items())
    torch.manual_seed(0)
    hidden = torch.randn(1, model.config.hidden_size)
    positions = torch.tensor([5])
    for layer_id in (0, 1):
        layer = model.model.layers[layer_id]
        layer.self_attn.attn.forward = lambda q, k, v, forward_batch, **_: q  # noqa: E731 (the attention kernel)
        kind = model.config.layer_types[layer_id]
        for name, counter in _count(layer, positions, hidden, model.model.norm).items():
            total = sum(counter.values())
            print(f"layer {layer_id} ({kind}) {name:9s}: total {total:3d}, without experts "
                  f"{total - counter['experts']:3d}; " + ", ".join(f"{k} {v}" for k, v in sorted(counter.items())))


if __name__ == "__main__":
    if not os.environ.get(CHILD):
        from dflash_sglang.deploy.cpu_stub import cpu_server_env, driver_present

        env = {**os.environ, CHILD: "1"} if driver_present() else {**cpu_server_env(), CHILD: "1"}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    main()
