# SPDX-License-Identifier: Apache-2.0
"""The drafter's attention backend: which SGLang backend runs the drafter's block passes, the drafters a
backend would attend wrongly (they get ``triton`` instead), and the start-up line naming the kernel.

SGLang's FlashAttention backend (``fa3``; ``fa4`` is the same ``FlashAttentionBackend`` with ``fa_impl_ver=4``,
calling ``flash_attn.cute``) runs DFLASH's drafter pass -- a mask-free TARGET_VERIFY batch -- correctly, eager
and in CUDA graphs, and attends non-causally in ``ENCODER_ONLY`` layers. But ``forward_extend`` passes a
sliding window as ``window_size=(W, 0)`` whether or not the layer is causal, and flash-attention reads a right
window of 0 as "no key after the query": in a non-causal sliding-window layer every block query would miss
the block positions after it. Outputs would stay lossless (the target verifies every draft) while acceptance
silently dropped, so such drafters get ``triton``. The evidence, per case: ``docs/fa4-drafter.md``.
"""

from __future__ import annotations

import logging
import types

from dflash_sglang.core.config import DFlashDraftConfig

logger = logging.getLogger(__name__)
FLASH_ATTENTION_BACKENDS = ("fa3", "fa4")  # sglang attention_registry: FlashAttentionBackend(fa_impl_ver=3 | 4)
SUBSTITUTE_BACKEND = "triton"  # also dflash_sglang.deploy's fallback for backends a machine cannot run


def draft_attention_backend(server_args) -> str | None:
    """The backend name that runs the drafter's block passes (TARGET_VERIFY batches), as SGLang's
    ``ModelRunner._get_attention_backend`` picks it for a draft worker: ``--speculative-draft-attention-backend``,
    else the target's; with different prefill and decode backends the drafter gets a ``HybridAttnBackend``,
    which sends TARGET_VERIFY to the prefill one unless ``--speculative-attention-mode decode``."""
    if server_args.speculative_draft_attention_backend:
        return server_args.speculative_draft_attention_backend
    prefill, decode = server_args.get_attention_backends()
    return decode if server_args.speculative_attention_mode == "decode" else prefill


def misattended_layers(backend: str | None, draft: DFlashDraftConfig) -> list[int]:
    """Drafter layers that ``backend`` would attend differently from the drafter: on fa3/fa4, the non-causal
    layers with a sliding window (attended causally inside the block; module docstring)."""
    if backend not in FLASH_ATTENTION_BACKENDS:
        return []
    return [i for i in range(draft.num_hidden_layers)
            if not draft.layer_is_causal(i) and draft.layer_sliding_window(i) is not None]


def choose_draft_attention_backend(server_args, draft: DFlashDraftConfig) -> None:
    """Sets ``--speculative-draft-attention-backend triton`` when the drafter's backend would attend some of its
    layers wrongly, with one WARNING naming the requested backend, the reason and the backend used."""
    backend = draft_attention_backend(server_args)
    layers = misattended_layers(backend, draft)
    if not layers:
        return
    requested = (f"{backend} (--speculative-draft-attention-backend)" if server_args.speculative_draft_attention_backend
                 else f"{backend} (the target's; no --speculative-draft-attention-backend)")
    logger.warning(
        "DFLASH: drafter attention backend %s would attend this drafter wrongly: its layers %s are non-causal with "
        "sliding window %d, which SGLang's FlashAttentionBackend passes as window_size=(window, 0), so "
        "each block token would miss the block tokens after it (same outputs, lower acceptance); using %s for the "
        "drafter instead (docs/fa4-drafter.md)", requested, layers, draft.sliding_window, SUBSTITUTE_BACKEND)
    server_args.speculative_draft_attention_backend = SUBSTITUTE_BACKEND


def describe_draft_attention(server_args, draft_runner) -> str:
    """One line for the drafter's start-up log: its attention backend, the SGLang class that serves it and, on
    triton, the layers whose mask-free block passes run the split-KV block-attention kernel."""
    backend, prefix = draft_runner.attn_backend, ""
    if type(backend).__name__ == "HybridAttnBackend":  # different prefill/decode backends: the TARGET_VERIFY one
        prefix = "HybridAttnBackend -> "
        decode = server_args.speculative_attention_mode == "decode"
        backend = backend.decode_backend if decode else backend.prefill_backend
    name = type(backend).__name__
    detail = ""
    if name == "FlashAttentionBackend":
        library = "flash_attn.cute" if backend.fa_impl_ver == 4 else "sgl_kernel FA3"
        detail = f", fa_impl_ver {backend.fa_impl_ver}: {library}.flash_attn_with_kvcache"
    line = f"DFLASH: drafter attention {draft_attention_backend(server_args)} (SGLang {prefix}{name}{detail})"
    if name != "TritonAttnBackend":
        return line
    from dflash_sglang.core.config import block_attention_mode

    if block_attention_mode() != "on":
        return line + "; DFLASH_BLOCK_ATTENTION=off: block passes run SGLang's extend kernel"
    covered, others = _block_kernel_layers(backend, draft_runner)
    line += (f"; mask-free block passes run the split-KV block-attention kernel (dflash_sglang/ops/"
             f"block_attention.py) in {len(covered)} of {len(covered) + len(others)} layers")
    if others:
        line += f", SGLang's extend kernel in layers {others} (soft cap, head size or KV dtype)"
    return line


def _block_kernel_layers(backend, draft_runner) -> tuple[list[int], list[int]]:
    """Ids of the drafter's attention layers that the triton backend's block passes run with the block kernel,
    and of the others, as ``patches.cuda_graphs._runs_block_attention`` decides it for a drafter pass."""
    import torch
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    from dflash_sglang.serving.patches.cuda_graphs import _runs_block_attention

    layers = [module for module in draft_runner.model.modules() if isinstance(module, RadixAttention)]
    view = types.SimpleNamespace(forward_metadata=types.SimpleNamespace(custom_mask=None),
                                 enable_deterministic=backend.enable_deterministic, use_mla=backend.use_mla)
    batch = types.SimpleNamespace(forward_mode=ForwardMode.TARGET_VERIFY,
                                  token_to_kv_pool=types.SimpleNamespace(dtype=draft_runner.token_to_kv_pool.dtype))
    covered, others = [], []
    for layer in layers:
        q = torch.empty(0, layer.tp_q_head_num * layer.qk_head_dim, dtype=draft_runner.dtype, device="meta")
        (covered if _runs_block_attention(view, q, q, q, layer, batch, None) else others).append(layer.layer_id)
    return covered, others
