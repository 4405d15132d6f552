# SPDX-License-Identifier: Apache-2.0
"""DFlashWorker: SGLang's speculative worker for DFLASH (draft one block -> verify it -> commit), and the
host-committed loop that runs without SGLang's overlap scheduler (``--disable-overlap-schedule``; the
default overlap loop is ``worker_overlap.DFlashOverlapWorker``, which reuses the block passes here).

Memory layout. The drafter has its own KV pool, indexed by the SAME slots as the target's (shared
``req_to_token_pool`` and allocator, as SGLang's EAGLE worker does): the drafter's cache at slot s holds
the context K/V of the token whose target KV is at s. Every path that commits target KV (prefill, chunked
prefill, verify) also injects that token's context K/V, so radix-cache prefix hits find the drafter's
context already there.

One decode step, for a batch whose requests have ``seq_lens`` committed tokens and a last token ``t0``
(``req.output_ids[-1]``, no KV yet):

1. allocate ``block_size`` slots per request for positions ``seq_len .. seq_len + B - 1`` (page-aligned
   with ``--page-size`` > 1: ``kv_slots.assign_row_slots``), after freeing a hybrid sliding-window pool's
   slots below the window (``kv_slots.evict_swa_slots``);
2. draft: one pass of the drafter over [t0, mask, ...] (non-causal, prefix = injected context), writing
   the block's drafter K/V into those slots; drafts = argmax (or samples) of positions 1..B-1;
3. verify: one pass of the target over [t0, d1, ...] into the same slots (a causal chain), capturing
   hidden states at the drafter's ``target_layer_ids``;
4. accept (``ops.verify_block``): longest matching prefix + bonus, or rejection sampling, from the verify
   rows as SGLang's sampler would see them (penalties, ``min_new_tokens`` and ``logit_bias`` applied row
   by row when the batch asks: ``block_logit_processing.py``, which processes the drafter's rows too; a
   request with a grammar has its drafts drawn under the grammar's masks, its verify rows masked, and its
   step ends where the grammar terminates: ``block_grammar.py``); SGLang's own ``req.check_finished`` cuts
   at EOS / stop strings / max_tokens inside the block; when a request asks for logprobs, every block row's
   target logprobs are read from the verify logits (``logprobs.py``);
5. commit: free the rejected slots (with ``--page-size`` > 1 only the pages past the last kept token;
   ``kv_slots``), keep t0 + accepted drafts, and inject their context K/V (this overwrites the draft
   pass's block K/V in the kept slots).

Both block passes are ``ForwardMode.TARGET_VERIFY`` batches of the same shape (B tokens per request after
its committed prefix), so SGLang's CudaGraphRunner replays captured graphs for both at decode batch sizes
(``patches.cuda_graphs.patch_cuda_graph_runner``); the target's graphs capture the drafter's features.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Optional

import torch

from sglang.srt.managers.schedule_batch import ModelWorkerBatch, ScheduleBatch
from sglang.srt.managers.scheduler import GenerationBatchResult
from sglang.srt.managers.tp_worker import TpModelWorker
from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode, ForwardBatch, ForwardMode
from sglang.srt.server_args import ServerArgs

from dflash_sglang import ops
from dflash_sglang.serving.block_grammar import constrain_drafts
from dflash_sglang.serving.info import DFlashVerifyInput
from dflash_sglang.core.sampling import processed_probs, sample_from
from dflash_sglang.serving.block_logit_processing import BlockLogitProcessor, row_sampling
from dflash_sglang.serving.draft_attention import describe_draft_attention
from dflash_sglang.serving.kv_slots import assign_row_slots, evict_swa_slots, first_freeable_offsets, upload
from dflash_sglang.serving.logprobs import append_request_logprobs, attach_block_logprobs
from dflash_sglang.serving.server_defaults import load_draft_config
from dflash_sglang.serving.step_profile import make_profiler
from dflash_sglang.serving.tp_sync import sync_across_tp

logger = logging.getLogger(__name__)
NO_BUDGET_LIMIT = 1 << 40


class DFlashWorker(TpModelWorker):
    logprobs_on_host = True  # this loop appends output logprobs to the requests itself (``logprobs.py``)

    def __init__(self, server_args: ServerArgs, gpu_id: int, tp_rank: int, dp_rank: Optional[int],
                 moe_ep_rank: int, attn_cp_rank: int, moe_dp_rank: int, nccl_port: int,
                 target_worker: TpModelWorker) -> None:
        self.server_args = server_args
        self.target_worker = target_worker
        self.draft_config = load_draft_config(server_args)
        self.block_size = server_args.speculative_num_draft_tokens
        target_runner = target_worker.model_runner
        target_model = target_runner.model
        enable_feature_capture(target_runner, self.draft_config)

        # The drafter serves the target's context length. Its CUDA graphs are captured below, once it
        # shares the target's embedding and LM head.
        server_args.context_length = target_runner.model_config.context_len
        disable_cuda_graph = server_args.disable_cuda_graph
        server_args.disable_cuda_graph = True
        self.req_to_token_pool, self.token_to_kv_pool_allocator = target_worker.get_memory_pool()
        super().__init__(server_args=server_args, gpu_id=gpu_id, tp_rank=tp_rank, pp_rank=0, dp_rank=dp_rank,
                         moe_ep_rank=moe_ep_rank, attn_cp_rank=attn_cp_rank, moe_dp_rank=moe_dp_rank,
                         nccl_port=nccl_port, is_draft_worker=True, req_to_token_pool=self.req_to_token_pool,
                         token_to_kv_pool_allocator=self.token_to_kv_pool_allocator,
                         memory_pool_config=target_runner.memory_pool_config)
        server_args.disable_cuda_graph = disable_cuda_graph

        self.draft_runner = self.model_runner
        self.draft_model = self.draft_runner.model
        embed, head = target_model.get_embed_and_head()
        self.draft_model.set_embed_and_head(embed, head)
        self.k_cache, self.v_cache = stack_kv_pool(self.draft_runner.token_to_kv_pool)
        self.draft_runner.init_device_graphs()
        self.vocab_size = target_runner.model_config.vocab_size
        self.device_type = torch.device(self.device).type
        self.block_offsets_cpu = torch.arange(self.block_size)
        self.block_offsets = self.block_offsets_cpu.to(self.device)
        self.profiler = make_profiler(self.device)
        self.mask_token_id = self.draft_config.mask_token_id
        self._stop_ids_cache: tuple[list, Optional[torch.Tensor]] = ([], None)
        self.logit_processor = BlockLogitProcessor(self.vocab_size, torch.device(self.device))
        logger.info("DFLASH: block size %d, drafter %s (%d layers, target layers %s), CUDA kernels %s",
                    self.block_size, server_args.speculative_draft_model_path, self.draft_config.num_hidden_layers,
                    list(self.draft_config.target_layer_ids),
                    "on" if ops.use_kernels_for(self.k_cache) else "off (PyTorch path)")
        logger.info("%s", describe_draft_attention(server_args, self.draft_runner))

    # ----------------------------------------------------------------------------------------------
    # SGLang's speculative-worker interface
    @property
    def draft_model_runner(self):
        return self.model_runner

    def clear_cache_pool(self) -> None:
        """Nothing beyond the shared pools (cleared by the scheduler) is cached."""

    def forward_batch_generation(self, batch: ScheduleBatch) -> GenerationBatchResult:
        if batch.forward_mode.is_extend():
            return self._forward_extend(batch)
        if batch.forward_mode.is_idle():
            return self.target_worker.forward_batch_generation(batch.get_model_worker_batch())
        return self._forward_decode(batch)

    # ----------------------------------------------------------------------------------------------
    def _forward_extend(self, batch: ScheduleBatch) -> GenerationBatchResult:
        return self._extend(batch.get_model_worker_batch())

    def _extend(self, worker_batch: ModelWorkerBatch) -> GenerationBatchResult:
        """Prefill (or a prefill chunk): the target runs and samples; every new token's context K/V is injected."""
        worker_batch.capture_hidden_mode = CaptureHiddenMode.FULL
        worker_batch.sampling_info = self.logit_processor.prefill_sampling_info(worker_batch)
        result = self.target_worker.forward_batch_generation(worker_batch)
        positions = torch.cat([torch.arange(start, start + length, dtype=torch.int64) for start, length
                               in zip(worker_batch.extend_prefix_lens, worker_batch.extend_seq_lens)])
        positions = self._upload(positions)
        self.draft_model.inject_context(result.logits_output.hidden_states, positions, worker_batch.out_cache_loc,
                                        self.k_cache, self.v_cache)
        result.logits_output.hidden_states = None
        self.logit_processor.seed(worker_batch.reqs, result.next_token_ids)
        return result

    def _forward_decode(self, batch: ScheduleBatch) -> GenerationBatchResult:
        """One speculative step for every request of ``batch`` (see the module docstring), committed on the host.

        The host waits for the GPU once per step: after the verdict, for the emitted tokens. Everything the
        host builds goes up through pinned memory without a sync (``self._upload``), and the KV injection of
        the kept tokens is queued before that wait, from the verdict's device-side keep slots."""
        self.profiler.start_step()
        bs, block = batch.batch_size(), self.block_size
        stop_ids, budgets = self._stop_conditions(batch)
        block_input = torch.full((bs, block), self.mask_token_id, dtype=torch.int64)
        block_input[:, 0] = torch.tensor([req.output_ids[-1] for req in batch.reqs], dtype=torch.int64)
        prefix_lens = batch.seq_lens.to(torch.int64)  # committed tokens per request
        positions = prefix_lens[:, None] + self.block_offsets[None, :]  # [bs, B]
        prefix_lens_cpu = batch.seq_lens_cpu.to(torch.int64)
        evict_swa_slots(batch, slack=block, skip_first_decode=False)
        block_slots = assign_row_slots(batch.tree_cache, self.req_to_token_pool.req_to_token,
                                       [req.req_pool_idx for req in batch.reqs], prefix_lens_cpu.tolist(),
                                       (prefix_lens_cpu + block).tolist()).view(bs, block)
        step = self._block_step(batch.get_model_worker_batch(), self._upload(block_input), prefix_lens, positions,
                                block_slots, stop_ids, budgets)
        verdict_cpu = torch.cat([step.num_emitted.to(torch.int64)[:, None], step.emitted], dim=1).cpu()  # the wait
        self.profiler.mark("accept")

        counts = self._append_outputs(batch, verdict_cpu[:, 1:], verdict_cpu[:, 0].tolist())
        if batch.return_logprob:
            append_request_logprobs(batch.reqs, counts, verdict_cpu[:, 1:].tolist(), step.logits_output, block)
        counts_cpu = torch.tensor(counts, dtype=torch.int64)
        kept = counts_cpu.clamp(min=1)  # t0 always keeps its KV
        freeable = first_freeable_offsets(prefix_lens_cpu, kept, self.token_to_kv_pool_allocator.page_size)
        rejected = (self.block_offsets_cpu[None, :] >= freeable[:, None]).view(-1).nonzero().view(-1)
        if rejected.numel():
            self.token_to_kv_pool_allocator.free(block_slots.view(-1)[self._upload(rejected)])
        for req, n in zip(batch.reqs, kept.tolist()):
            req.kv_committed_len += n
            req.kv_allocated_len = req.kv_committed_len
        batch.seq_lens = batch.seq_lens + self._upload(kept.to(batch.seq_lens.dtype))
        batch.seq_lens_cpu = batch.seq_lens_cpu + kept.to(batch.seq_lens_cpu.dtype)
        batch.seq_lens_sum = int(batch.seq_lens_cpu.sum())
        batch.forward_mode = ForwardMode.DECODE
        batch.spec_info = None
        emitted_mask = self.block_offsets_cpu[None, :] < counts_cpu[:, None]
        accepted = [n - 1 for n in counts]
        self.profiler.mark("commit")
        self.profiler.end_step(bs)
        return GenerationBatchResult(
            logits_output=step.logits_output, next_token_ids=self._upload(verdict_cpu[:, 1:][emitted_mask]),
            num_accepted_tokens=sum(accepted), accept_length_per_req_cpu=accepted,
            can_run_cuda_graph=step.can_run_cuda_graph,
            accept_lens=self._upload(torch.tensor(accepted, dtype=torch.int32)))

    def _block_step(self, decode_batch: ModelWorkerBatch, block: torch.Tensor, prefix_lens: torch.Tensor,
                    positions: torch.Tensor, block_slots: torch.Tensor, stop_ids: torch.Tensor,
                    budgets: torch.Tensor) -> "BlockStep":
        """The device half of a decode step, queued without a host wait: the drafter's pass over ``block``
        ([bs, B] int64 ``[t0, mask, ...]``, at ``positions`` [bs, B] = ``prefix_lens`` .. +B-1, KV into
        ``block_slots`` [bs, B]), the drafts (written over the block's masks, once the drafter has read them),
        the target's verify pass over ``[t0, drafts]``, the verdict (``ops.verify_block``, cut at ``stop_ids`` /
        ``budgets``) and the context K/V of the kept tokens."""
        bs, block_size = block.shape
        draft_batch = dataclasses.replace(
            decode_batch, forward_mode=ForwardMode.TARGET_VERIFY, input_ids=block.view(-1),
            out_cache_loc=block_slots.view(-1), capture_hidden_mode=CaptureHiddenMode.NULL,
            spec_info=DFlashVerifyInput(positions.view(-1), block_size, CaptureHiddenMode.NULL))
        self.profiler.mark("prepare")

        draft_logits = self._draft(draft_batch)[:, 1:]  # [bs, B-1, V]: the drafts of positions 1..B-1
        sampling = decode_batch.sampling_info
        greedy = sampling.is_all_greedy
        # Penalties, min_new_tokens, logit_bias: rows processed one after the other (None: no such option)
        logit_step = self.logit_processor.for_step(decode_batch, prefix_lens)
        if logit_step is not None:
            draft_probs = logit_step.draft(draft_logits, block)
        elif greedy:  # the drafts go over the block's masks: it becomes [t0, drafts], the verify pass's input
            draft_probs = None
            ops.argmax(draft_logits, out=block[:, 1:])
        else:
            draft_probs = processed_probs(draft_logits.reshape(bs * (block_size - 1), -1),
                                          *row_sampling(sampling, block_size - 1))
            block[:, 1:] = sample_from(draft_probs).view(bs, block_size - 1)
        grammar = constrain_drafts(decode_batch, draft_logits, block, draft_probs) if decode_batch.has_grammar else None
        sync_across_tp(block, sampling)  # the verify pass on every rank must read the same drafts
        self.profiler.mark("draft")

        logits_output, can_run_cuda_graph = self._verify(draft_batch, block, positions)
        self.profiler.mark("verify")
        target_logits = logits_output.next_token_logits[:, :self.vocab_size]
        if logit_step is not None:
            logit_step.verify(target_logits, block)
        if grammar is not None:  # masks the rows in place (logprobs read them masked, as SGLang's sampler does)
            budgets = grammar.constrain_verify(target_logits, budgets)
        if greedy:
            verdict = ops.verify_block(block, block_slots, prefix_lens, stop_ids, budgets,
                                       target_ids=sync_across_tp(ops.argmax(target_logits).view(bs, block_size),
                                                                 sampling))
        else:
            target_probs = processed_probs(target_logits, *row_sampling(sampling, block_size))
            verdict = ops.verify_block(
                block, block_slots, prefix_lens, stop_ids, budgets,
                target_probs=target_probs.view(bs, block_size, -1),
                draft_probs=draft_probs.view(bs, block_size - 1, -1),
                uniforms=sync_across_tp(torch.rand(bs, block_size, dtype=torch.float32, device=self.device),
                                        sampling))
        num_emitted, emitted, keep_slots = verdict[1], verdict[2], verdict[3]
        if logit_step is not None:
            logit_step.commit(emitted)
        if decode_batch.return_logprob:  # only then: a softmax over the vocabulary for every block row
            attach_block_logprobs(logits_output, decode_batch, target_logits, emitted, self.logprobs_on_host)
        # Context K/V of the kept block tokens (t0 + emitted drafts); -1 slots write nothing. A request
        # that SGLang later cuts shorter (a stop string) frees those slots; nothing reads them unwritten.
        features = logits_output.hidden_states.view(bs * block_size, -1)
        inject_positions, inject_slots = positions.view(-1), keep_slots.view(-1)
        if self.device_type == "cpu":  # NOTE: no stream to keep busy here: project only the kept rows
            kept = (inject_slots >= 0).nonzero().view(-1)
            features, inject_positions, inject_slots = features[kept], inject_positions[kept], inject_slots[kept]
        self.draft_model.inject_context(features, inject_positions, inject_slots, self.k_cache, self.v_cache)
        logits_output.hidden_states = None
        self.profiler.mark("inject")
        return BlockStep(num_emitted, emitted, logits_output, can_run_cuda_graph)

    def _upload(self, host: torch.Tensor) -> torch.Tensor:
        return upload(host, self.device_type, self.device)

    # ----------------------------------------------------------------------------------------------
    def _draft(self, draft_batch: ModelWorkerBatch) -> torch.Tensor:
        """One drafter pass over every request's block; returns its logits [bs, B, vocab] fp32 (a view)."""
        bs, block = draft_batch.seq_lens.shape[0], self.block_size
        forward_batch = ForwardBatch.init_new(draft_batch, self.draft_runner)
        logits = self.draft_runner.forward(forward_batch).logits_output.next_token_logits
        return logits.view(bs, block, -1)

    def _verify(self, draft_batch: ModelWorkerBatch, block_tokens: torch.Tensor, positions: torch.Tensor):
        """One target pass over all blocks (a causal chain), capturing the drafter's features."""
        worker_batch = dataclasses.replace(
            draft_batch, input_ids=block_tokens.view(-1), capture_hidden_mode=CaptureHiddenMode.FULL,
            spec_info=DFlashVerifyInput(positions.view(-1), self.block_size, CaptureHiddenMode.FULL))
        result = self.target_worker.forward_batch_generation(worker_batch, is_verify=True)
        return result.logits_output, result.can_run_cuda_graph

    def _stop_conditions(self, batch: ScheduleBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Token-level stops for the verifier, on the device: EOS / stop token ids (-1 padded) and the
        remaining token budgets."""
        return self._stop_ids(batch.reqs), self._token_budgets(batch.reqs, emitted_meanwhile=0)

    def _token_budgets(self, reqs: list, emitted_meanwhile: int) -> torch.Tensor:
        """[bs] int64 on the device: how many more tokens each request may emit, once the tokens in
        ``output_ids`` and ``emitted_meanwhile`` more (not yet appended) are counted."""
        budgets = [NO_BUDGET_LIMIT if req.sampling_params.max_new_tokens is None
                   else max(req.sampling_params.max_new_tokens - len(req.output_ids) - emitted_meanwhile, 0)
                   for req in reqs]
        return self._upload(torch.tensor(budgets, dtype=torch.int64))

    def _stop_ids(self, reqs: list) -> torch.Tensor:
        """[bs, S] int64 on the device: each request's stop token ids, -1 padded (kept while the batch's
        requests stay the same)."""
        cached_reqs, cached = self._stop_ids_cache
        if len(cached_reqs) == len(reqs) and all(a is b for a, b in zip(cached_reqs, reqs)):
            return cached
        rows = [_stop_token_ids(req, self.vocab_size) for req in reqs]
        width = max(1, max(len(row) for row in rows))
        stop_ids = self._upload(torch.tensor([row + (-1,) * (width - len(row)) for row in rows], dtype=torch.int64))
        self._stop_ids_cache = (list(reqs), stop_ids)
        return stop_ids

    def _append_outputs(self, batch: ScheduleBatch, emitted: torch.Tensor, num_emitted: list[int]) -> list[int]:
        """Appends each request's emitted tokens ([bs, B] host tensor), letting SGLang's finish check cut
        inside the block (stop strings included), and advances the request's grammar by each (SGLang's spec
        v1 output path leaves that to the worker). Returns the number of tokens each request really emitted."""
        final = []
        for req, tokens, n in zip(batch.reqs, emitted.tolist(), num_emitted):
            count = 0
            for token in tokens[:n]:
                req.output_ids.append(token)
                count += 1
                req.check_finished()
                if req.grammar is not None:  # after the finish check, as SGLang's output processor orders them
                    req.grammar.accept_token(token)
                if req.finished():
                    break
            final.append(count)
            req.spec_verify_ct += 1
            req.spec_accepted_tokens += count - 1
            req.update_spec_acceptance_histogram(count - 1)
        return final


@dataclasses.dataclass
class BlockStep:
    """What the device half of a decode step leaves on the device: per request, how many tokens it
    emits (``num_emitted`` [bs] int32) and which (``emitted`` [bs, B] int64, -1 padded)."""

    num_emitted: torch.Tensor
    emitted: torch.Tensor
    logits_output: object
    can_run_cuda_graph: bool


def _stop_token_ids(req, vocab_size: int) -> tuple[int, ...]:
    """The token ids that end ``req`` (mirrors ``Req._check_token_based_finish``), computed once per request.
    Ids outside ``[0, vocab_size)`` can never be emitted and are left out (a client's ``stop_token_ids`` of
    2**64 would not fit the verifier's int64 table)."""
    cached = getattr(req, "_dflash_stop_ids", None)
    if cached is None:
        params, stops = req.sampling_params, set()
        if not params.ignore_eos:
            stops |= set(req.eos_token_ids or ()) | set(params.stop_token_ids or ())
            if req.tokenizer is not None:
                stops |= {req.tokenizer.eos_token_id} | set(req.tokenizer.additional_stop_token_ids or ())
            stops.discard(None)
        cached = req._dflash_stop_ids = tuple(sorted(stop for stop in stops if 0 <= stop < vocab_size))
    return cached


def enable_feature_capture(target_runner, draft_config) -> None:
    """Makes the target return its hidden states at the drafter's ``target_layer_ids`` (SGLang's EAGLE3
    capture: a layer's output is taken at the next layer's input). Runs before the target's CUDA graphs
    are captured (``patches.cuda_graphs.patch_cuda_graph_runner``) and again, idempotently, when the worker starts."""
    target_model = target_runner.model
    num_layers = target_runner.model_config.hf_text_config.num_hidden_layers
    if not hasattr(target_model, "set_eagle3_layers_to_capture"):
        raise ValueError(f"DFLASH needs the target to expose hidden states at chosen layers; SGLang's "
                         f"{type(target_model).__name__} does not (no set_eagle3_layers_to_capture)")
    highest = max(draft_config.target_layer_ids)
    if highest > num_layers - 2:
        raise ValueError(f"drafter target_layer_ids reach layer {highest}; SGLang captures a layer's output at "
                         f"the next layer's input, so ids must be <= {num_layers - 2} for this "
                         f"{num_layers}-layer target")
    target_model.set_eagle3_layers_to_capture(list(draft_config.target_layer_ids))


def stack_kv_pool(pool) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-lays the drafter's KV pool as [L, slots, heads, dim] tensors (per-layer views stay in the pool's
    lists), so the KV injection writes every layer in one kernel. Returns (k_cache, v_cache)."""
    k_shape = (len(pool.k_buffer), *pool.k_buffer[0].shape)
    v_shape = (len(pool.v_buffer), *pool.v_buffer[0].shape)
    dtype, device = pool.k_buffer[0].dtype, pool.k_buffer[0].device
    pool.k_buffer = pool.v_buffer = None  # release the per-layer buffers before allocating the stacked ones
    if device.type == "cuda":
        torch.cuda.empty_cache()
    k_cache = torch.zeros(k_shape, dtype=dtype, device=device)
    v_cache = torch.zeros(v_shape, dtype=dtype, device=device)
    pool.k_buffer = list(k_cache.unbind(0))
    pool.v_buffer = list(v_cache.unbind(0))
    pool.k_data_ptrs = torch.tensor([x.data_ptr() for x in pool.k_buffer], dtype=torch.uint64, device=device)
    pool.v_data_ptrs = torch.tensor([x.data_ptr() for x in pool.v_buffer], dtype=torch.uint64, device=device)
    pool.data_ptrs = torch.cat([pool.k_data_ptrs, pool.v_data_ptrs], dim=0)
    return k_cache, v_cache
