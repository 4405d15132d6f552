# SPDX-License-Identifier: Apache-2.0
"""Per-step batch state of a DFLASH decode step, as SGLang's attention backends and ForwardBatch see it.

:class:`DFlashVerifyInput` rides on the batch during a decode step's two block passes, both run as
``ForwardMode.TARGET_VERIFY`` (a fixed block of ``block_size`` tokens per request after its committed
prefix, the shape SGLang's CUDA graphs capture): the drafter's pass, whose ``ENCODER_ONLY`` layers make
the block attend non-causally, and the target's verify pass, a causal chain with no custom mask that also
captures the drafter's features (``capture_hidden_mode`` FULL). The drafter's context lives in its KV
cache at the target's slots, so the only state between steps is the last verified token and the sequence
lengths: on the host in the loop without overlap (``req.output_ids[-1]``; the batch's ``spec_info`` is reset
to ``None`` after each step), on the device under the overlap scheduler (``overlap.DFlashDraftInput``).
"""

from __future__ import annotations

from typing import Optional

import torch

from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode
from sglang.srt.speculative.spec_info import SpecInput, SpecInputType


class DFlashVerifyInput(SpecInput):
    """Verify-pass metadata. Invariant: ``positions`` holds ``block_size`` consecutive positions per
    request, starting at the request's committed KV length (``batch.seq_lens``)."""

    def __init__(self, positions: Optional[torch.Tensor], block_size: int,
                 capture_hidden_mode: CaptureHiddenMode = CaptureHiddenMode.FULL) -> None:
        # A chain is verified like an n-gram draft: a verify input without a tree mask.
        super().__init__(SpecInputType.NGRAM_VERIFY)
        self.positions = positions  # [bs * block_size] int64; None while CUDA graphs are captured
        self.draft_token_num = block_size
        self.custom_mask = None  # causal over prefix + block (non-causal in ENCODER_ONLY layers)
        self.capture_hidden_mode = capture_hidden_mode

    def generate_attn_arg_prefill(self, req_pool_indices: torch.Tensor, paged_kernel_lens: torch.Tensor,
                                  paged_kernel_lens_sum: int, req_to_token: torch.Tensor):
        """FlashInfer's paged-prefill arguments for the block pass: each request's queries are its B block
        tokens, its keys the committed prefix plus the block. Returns (kv_indices, kv_indptr, qo_indptr,
        custom_mask=None)."""
        from sglang.srt.layers.attention.utils import create_flashinfer_kv_indices_triton

        bs, device = len(req_pool_indices), req_pool_indices.device
        kv_lens = paged_kernel_lens + self.draft_token_num
        kv_indptr = torch.zeros(bs + 1, dtype=torch.int32, device=device)
        kv_indptr[1:] = torch.cumsum(kv_lens, dim=0)
        qo_indptr = torch.arange(0, bs + 1, dtype=torch.int32, device=device) * self.draft_token_num
        kv_indices = torch.empty(paged_kernel_lens_sum + bs * self.draft_token_num, dtype=torch.int32,
                                 device=device)
        create_flashinfer_kv_indices_triton[(bs,)](req_to_token, req_pool_indices, kv_lens, kv_indptr, None,
                                                   kv_indices, req_to_token.size(1))
        return kv_indices, kv_indptr, qo_indptr, None

    def get_spec_adjust_token_coefficient(self) -> tuple[int, int]:
        return self.draft_token_num, self.draft_token_num

    def filter_batch(self, new_indices: torch.Tensor, has_been_filtered: bool = True) -> None:
        """Nothing to filter: the verify input lives for one forward pass."""

    def merge_batch(self, spec_info: "DFlashVerifyInput") -> None:
        """Nothing to merge: the verify input lives for one forward pass."""
