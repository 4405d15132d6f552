# SPDX-License-Identifier: Apache-2.0
"""What SGLang's CPU path lacks for DFLASH: mask-free TARGET_VERIFY passes in the torch_native attention
backend, and a KV pool that does not warm up a Triton kernel on a CPU device."""

from __future__ import annotations

from dflash_sglang.serving.patches import patches


@patches(lambda module: module.TorchNativeAttnBackend)
def patch_torch_native_backend(backend) -> None:
    """Lets ``TorchNativeAttnBackend.forward_extend`` run TARGET_VERIFY passes without a tree mask.

    SGLang's torch_native backend reads ``extend_prefix_lens``/``extend_seq_lens`` and ``seq_lens`` as the
    total KV length, which a TARGET_VERIFY ForwardBatch does not set (there ``seq_lens`` is the committed
    prefix). For verify inputs without a custom mask (DFLASH's causal chain) this fills them in for the
    call; tree-masked verification (EAGLE) is left as upstream has it.
    """
    original_forward_extend = backend.forward_extend

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        spec_info = forward_batch.spec_info
        if not forward_batch.forward_mode.is_target_verify() or getattr(spec_info, "custom_mask", 0) is not None:
            return original_forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache)
        import torch

        saved = forward_batch.seq_lens, forward_batch.extend_prefix_lens, forward_batch.extend_seq_lens
        prefix_lens = forward_batch.seq_lens
        forward_batch.extend_prefix_lens = prefix_lens
        forward_batch.extend_seq_lens = torch.full_like(prefix_lens, spec_info.draft_token_num)
        forward_batch.seq_lens = prefix_lens + spec_info.draft_token_num
        try:
            return original_forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache)
        finally:
            forward_batch.seq_lens, forward_batch.extend_prefix_lens, forward_batch.extend_seq_lens = saved

    backend.forward_extend = forward_extend


@patches(lambda module: module.MHATokenToKVPool)
def patch_memory_pool(pool) -> None:
    """Skips ``MHATokenToKVPool._init_kv_copy_and_warmup`` on CPU devices.

    SGLang turns the pool's KV-copy kernel on whenever speculative decoding is on and warms it up with a
    Triton launch, which cannot run without a GPU. The copy only moves KV between pages for page sizes > 1,
    which DFLASH does not use; on the GPU nothing changes.
    """
    original_init_kv_copy = pool._init_kv_copy_and_warmup

    def init_kv_copy_and_warmup(self) -> None:
        if str(self.device).startswith("cpu"):
            self._kv_copy_config = None
            return
        original_init_kv_copy(self)

    pool._init_kv_copy_and_warmup = init_kv_copy_and_warmup
