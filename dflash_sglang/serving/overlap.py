# SPDX-License-Identifier: Apache-2.0
"""DFLASH under SGLang's overlap scheduler ("spec v2"): what one decode step hands the next, on the device.

With overlap on, the scheduler launches step k+1 before it has read step k's tokens, so nothing the next
step needs may come from the host. :class:`DFlashDraftInput` is the batch's ``spec_info`` between steps:

* ``verified_id`` [bs] int64 -- each request's last emitted token (t0 of its next block, no KV yet) and
  ``new_seq_lens`` [bs] -- its committed KV length, both written on the forward stream by the worker and
  carried through SGLang's ``FutureMap`` ring buffer (``store_into`` / ``resolve_from``);
* ``verify_done`` (:class:`StepDone`) -- marks the step's verdict on the forward stream. SGLang calls its
  ``synchronize()`` before it touches the batch's ``seq_lens`` on the scheduling stream (filtering,
  merging); ours makes that stream WAIT for the event on the device instead of blocking the host.

Per-step KV slots (``prepare_for_decode``, on the host, before the step is launched): as SGLang's EAGLE v2,
every request keeps ``kv_committed_len + 2B`` slots assigned in its ``req_to_token`` row (the host's
committed length lags one step, and a step adds at most B), clamped to the row's width; the block's slots
are then a device-side gather at ``seq_lens .. seq_lens + B - 1``. Rejected block slots are not freed: the
next block overwrites them, and SGLang frees the tail past ``kv_committed_len`` when the request ends. With
``--page-size`` > 1 the slots come page-aligned (``kv_slots.assign_row_slots``: each row grows from its
``kv_allocated_len`` and continues its last page); at the end ``cache_finished_req`` frees the partial page
holding ``kv_committed_len`` and ``release_kv_cache`` the whole pages after it, as for EAGLE v2.

Host sequence lengths. SGLang's EAGLE v2 blocks the host on the previous verify to read exact
``seq_lens_cpu`` every step, which leaves the GPU idle while the next step is prepared. The triton
attention backend (target and drafter) builds its block-pass metadata from the device ``seq_lens`` alone,
so with it ``seq_lens_cpu`` holds an upper bound (``kv_committed_len + B``) and the host never waits on
the GPU before launching a step; with any other backend, or off CUDA, the lengths are read exactly.

Stop strings. SGLang's spec-v2 output path appends a request's whole accepted list and checks stop strings
once; DFLASH's v1 loop checks after every token. :func:`cut_at_stop_strings` keeps v1's result: a list is
cut after the token that completes a stop string, and ``kv_committed_len`` is pulled back to match.
"""

from __future__ import annotations

from typing import Optional

import torch

from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode
from sglang.srt.speculative.spec_info import SpecInput, SpecInputType

from dflash_sglang.serving.kv_slots import assign_row_slots, evict_swa_slots

EXACT_LENS_BACKEND = "triton"  # the attention backend whose block passes need no host sequence lengths


class StepDone:
    """An event on the forward stream after a step's verdict (a no-op off CUDA, where work is synchronous)."""

    def __init__(self, device: torch.device) -> None:
        self.event = torch.cuda.Event() if device.type == "cuda" else None
        if self.event is not None:
            self.event.record()

    def synchronize(self) -> None:
        """Orders the caller's current stream after the step, on the device (the host does not wait)."""
        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)

    def wait_host(self) -> None:
        """Blocks the host until the step's verdict is on the device."""
        if self.event is not None:
            self.event.synchronize()


def host_lens_must_be_exact(server_args) -> bool:
    """Whether ``seq_lens_cpu`` must be exact for the block passes (see the module docstring)."""
    draft_backend = server_args.speculative_draft_attention_backend or server_args.attention_backend
    return not (str(server_args.device).startswith("cuda")
                and server_args.attention_backend == EXACT_LENS_BACKEND and draft_backend == EXACT_LENS_BACKEND)


class DFlashDraftInput(SpecInput):
    """The batch's state between DFLASH steps under the overlap scheduler (module docstring)."""

    capture_hidden_mode = CaptureHiddenMode.NULL

    def __init__(self, verified_id: torch.Tensor, new_seq_lens: torch.Tensor, block_size: int,
                 exact_host_lens: bool, verify_done: Optional[StepDone] = None) -> None:
        super().__init__(SpecInputType.EAGLE_DRAFT)
        self.verified_id = verified_id
        self.new_seq_lens = new_seq_lens
        self.block_size = block_size
        self.exact_host_lens = exact_host_lens
        self.verify_done = verify_done
        self.future_indices = None  # set by the scheduler: where this batch's state sits in the FutureMap

    def get_spec_adjust_token_coefficient(self) -> tuple[int, int]:
        return self.block_size, self.block_size

    def filter_batch(self, new_indices: torch.Tensor, has_been_filtered: bool = True) -> None:
        if self.future_indices is not None:
            self.future_indices.indices = self.future_indices.indices[new_indices]
        else:
            self.verified_id = self.verified_id[new_indices]
            self.new_seq_lens = self.new_seq_lens[new_indices]

    def merge_batch(self, other: "DFlashDraftInput") -> None:
        from sglang.srt.managers.overlap_utils import FutureIndices

        if self.future_indices is None or other.future_indices is None:
            raise RuntimeError("DFLASH: merging batches whose step state is not in the FutureMap")
        self.future_indices = FutureIndices(
            indices=torch.cat([self.future_indices.indices, other.future_indices.indices]))

    # --- the FutureMap (SGLang's ring buffer of step results, indexed by future_indices) ------------------
    def store_into(self, future_map, future_indices) -> None:
        """Writes this step's results at ``future_indices`` (on the forward stream, after the step)."""
        interval = future_indices.interval
        if future_map.is_empty_slice(interval):
            return
        buffers = getattr(future_map, "dflash_buffers", None)
        if buffers is None:
            size = future_map.future_buffer_len
            buffers = future_map.dflash_buffers = (
                torch.zeros(size, dtype=torch.int64, device=future_map.device),
                torch.zeros(size, dtype=self.new_seq_lens.dtype, device=future_map.device))
        buffers[0][interval] = self.verified_id.to(torch.int64)
        buffers[1][interval] = self.new_seq_lens

    def resolve_from(self, future_map) -> None:
        """Reads the previous step's results back (on the forward stream, before this step)."""
        indices = self.future_indices.indices
        if indices.is_cuda:  # made on the scheduling stream, read here: keep it alive for this stream
            indices.record_stream(torch.cuda.current_stream())
        verified_id, new_seq_lens = future_map.dflash_buffers
        self.verified_id = verified_id[indices]
        self.new_seq_lens = new_seq_lens[indices]

    # --- before the step is launched (host) --------------------------------------------------------------
    def prepare_for_decode(self, batch) -> None:
        """Assigns every request ``kv_committed_len + 2B`` KV slots (module docstring) and sets the batch's
        host sequence lengths: exact, or an upper bound when the backends need none."""
        batch.maybe_wait_verify_done()
        # the step in flight reads keys from the host's committed length (one step behind) minus the window
        evict_swa_slots(batch, slack=self.block_size, skip_first_decode=True)
        req_to_token = batch.req_to_token_pool.req_to_token
        width = req_to_token.shape[1]
        rows, starts, ends = [], [], []
        for req in batch.reqs:
            wanted = min(req.kv_committed_len + 2 * self.block_size, width)
            if wanted > req.kv_allocated_len:
                rows.append(req.req_pool_idx)
                starts.append(req.kv_allocated_len)
                ends.append(wanted)
                req.kv_allocated_len = wanted
            req.decode_batch_idx += 1
        if rows:
            assign_row_slots(batch.tree_cache, req_to_token, rows, starts, ends)
        if self.exact_host_lens:
            if self.verify_done is not None:
                self.verify_done.wait_host()
            batch.seq_lens_cpu = batch.seq_lens.cpu()
        else:
            batch.seq_lens_cpu = torch.tensor([req.kv_committed_len + self.block_size for req in batch.reqs],
                                              dtype=torch.int64)
        batch.seq_lens_sum = int(batch.seq_lens_cpu.sum())


def cut_at_stop_strings(req, tokens: list[int]) -> list[int]:
    """``tokens`` (one step's emitted list for ``req``) cut after the first token at which SGLang's per-token
    stop-string check would finish the request. ``req`` is left as it was."""
    params = req.sampling_params
    if not (params.stop_strs or params.stop_regex_strs) or req.finished() or len(tokens) < 2:
        return tokens
    base = len(req.output_ids)
    try:
        for count, token in enumerate(tokens[:-1], start=1):
            req.output_ids.append(token)
            if req._check_str_based_finish():
                return tokens[:count]
        return tokens
    finally:
        del req.output_ids[base:]
        req.finished_reason = None
