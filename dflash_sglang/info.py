# SPDX-License-Identifier: Apache-2.0
"""Per-step batch state of a DFLASH decode step, as SGLang's attention backends and ForwardBatch see it.

:class:`DFlashVerifyInput` rides on ``ScheduleBatch.spec_info`` during the target's verify pass only
(``ForwardMode.TARGET_VERIFY``): it gives the block's positions, the block size and a causal (no custom
mask) chain. DFLASH keeps no speculative state between steps -- the drafter's context lives in its KV
cache at the target's slots, and the last verified token is ``req.output_ids[-1]`` -- so the batch's
``spec_info`` is reset to ``None`` after each step and filter/merge have nothing to do.
"""

from __future__ import annotations

import torch

from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode
from sglang.srt.speculative.spec_info import SpecInput, SpecInputType


class DFlashVerifyInput(SpecInput):
    """Verify-pass metadata. Invariant: ``positions`` holds ``block_size`` consecutive positions per
    request, starting at the request's committed KV length (``batch.seq_lens``)."""

    def __init__(self, positions: torch.Tensor, block_size: int) -> None:
        # A chain is verified like an n-gram draft: a verify input without a tree mask.
        super().__init__(SpecInputType.NGRAM_VERIFY)
        self.positions = positions  # [bs * block_size] int64
        self.draft_token_num = block_size
        self.custom_mask = None  # causal over prefix + block
        self.capture_hidden_mode = CaptureHiddenMode.FULL

    def get_spec_adjust_token_coefficient(self) -> tuple[int, int]:
        return self.draft_token_num, self.draft_token_num

    def filter_batch(self, new_indices: torch.Tensor, has_been_filtered: bool = True) -> None:
        """Nothing to filter: the verify input lives for one forward pass."""

    def merge_batch(self, spec_info: "DFlashVerifyInput") -> None:
        """Nothing to merge: the verify input lives for one forward pass."""
