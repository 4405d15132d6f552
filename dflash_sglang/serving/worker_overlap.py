# SPDX-License-Identifier: Apache-2.0
"""DFlashOverlapWorker: the DFLASH step under SGLang's overlap scheduler (the default; ``--disable-overlap-schedule``
selects :class:`~dflash_sglang.serving.worker.DFlashWorker`'s host-committed loop).

The scheduler hands this worker a ``ModelWorkerBatch`` and reads the step's tokens one iteration later, so a
step is queued on the forward stream without any host read of the previous one (``dflash_sglang.serving.overlap``):

* t0 is the previous step's ``verified_id`` and the prefix length is ``seq_lens`` (the previous step's
  ``new_seq_lens``), both device tensors; the block's KV slots are read from ``req_to_token``, where
  ``DFlashDraftInput.prepare_for_decode`` assigned them (``ops.block_inputs``: one kernel);
* each request's remaining token budget lives in a device table indexed by its ``req_pool_idx``: set at
  prefill (``max_new_tokens`` minus the tokens it has), lowered by every step's emitted count, so the
  verifier cuts at ``max_new_tokens`` although the host's ``output_ids`` lag a step;
* after the verdict one kernel (``ops.advance_state``) makes the next state and lowers the budgets;
* the step returns its emitted tokens ([bs * B], request i's at ``i*B .. i*B + accept_lens[i]``), its
  ``accept_lens`` (tokens whose KV is kept, at least 1), and the next ``DFlashDraftInput``.

The block passes themselves (drafter, verify, verdict, KV injection) are ``DFlashWorker._block_step``.
"""

from __future__ import annotations

import logging

import torch

from sglang.srt.managers.schedule_batch import ModelWorkerBatch
from sglang.srt.managers.scheduler import GenerationBatchResult

from dflash_sglang import ops
from dflash_sglang.serving.overlap import DFlashDraftInput, StepDone, host_lens_must_be_exact
from dflash_sglang.serving.worker import DFlashWorker

logger = logging.getLogger(__name__)


class DFlashOverlapWorker(DFlashWorker):
    logprobs_on_host = False  # SGLang's output processor reads them from logits_output (spec v2 layout)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.speculative_num_draft_tokens = self.block_size  # the stride of next_token_ids, read by SGLang
        self.exact_host_lens = host_lens_must_be_exact(self.server_args)
        self.remaining_budget = torch.zeros(self.req_to_token_pool.size, dtype=torch.int64, device=self.device)
        logger.info("DFLASH: overlap scheduler (spec v2); the host %s", "reads exact sequence lengths each step"
                    if self.exact_host_lens else "never waits for the GPU before launching a step")

    @property
    def draft_worker(self) -> "DFlashOverlapWorker":
        """SGLang's spec-v2 scheduler finds the drafter's runner at ``draft_worker.draft_worker.draft_runner``."""
        return self

    def forward_batch_generation(self, batch: ModelWorkerBatch) -> GenerationBatchResult:
        if batch.forward_mode.is_extend():
            return self._prefill(batch)
        if batch.forward_mode.is_idle():
            result = self.target_worker.forward_batch_generation(batch)
            empty = torch.empty(0, dtype=torch.int64, device=self.device)
            result.next_draft_input = self._draft_input(empty, empty, None)
            return result
        return self._decode(batch)

    def _draft_input(self, verified_id: torch.Tensor, new_seq_lens: torch.Tensor, done) -> DFlashDraftInput:
        return DFlashDraftInput(verified_id, new_seq_lens, self.block_size, self.exact_host_lens, done)

    def _prefill(self, batch: ModelWorkerBatch) -> GenerationBatchResult:
        """The v1 prefill, plus each request's token budget for the steps that follow (the prefill emits one)."""
        self.remaining_budget[batch.req_pool_indices] = self._token_budgets(batch.reqs, emitted_meanwhile=1)
        result = self._extend(batch)
        result.next_draft_input = self._draft_input(result.next_token_ids.to(torch.int64), batch.seq_lens, None)
        return result

    def _decode(self, batch: ModelWorkerBatch) -> GenerationBatchResult:
        self.profiler.start_step()
        state: DFlashDraftInput = batch.spec_info
        if batch.seq_lens.is_cuda:  # made on the scheduling stream; keep it alive for this one
            batch.seq_lens.record_stream(torch.cuda.current_stream())
        block, positions, block_slots, prefix_lens, budgets = ops.block_inputs(
            state.verified_id, batch.seq_lens, batch.req_pool_indices, self.req_to_token_pool.req_to_token,
            self.remaining_budget, self.mask_token_id, self.block_size)
        step = self._block_step(batch, block, prefix_lens, positions, block_slots, self._stop_ids(batch.reqs), budgets)
        # A request emits nothing only when it has no budget left: it finished at an earlier step, and the
        # scheduler skips its tokens. accept_lens >= 1 keeps SGLang's acceptance histogram in range.
        verified_id, new_seq_lens, accept_lens = ops.advance_state(
            state.verified_id, prefix_lens, budgets, step.num_emitted, step.emitted, batch.req_pool_indices,
            self.remaining_budget, batch.seq_lens.dtype)
        done = StepDone(torch.device(self.device))
        self.profiler.mark("accept")
        self.profiler.end_step(len(batch.reqs))
        return GenerationBatchResult(
            logits_output=step.logits_output, next_token_ids=step.emitted.view(-1),
            accept_lens=accept_lens, can_run_cuda_graph=step.can_run_cuda_graph,
            next_draft_input=self._draft_input(verified_id, new_seq_lens, done))
