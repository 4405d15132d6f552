# SPDX-License-Identifier: Apache-2.0
"""What SGLang's overlap scheduler ("spec v2") needs for DFLASH (``dflash_sglang.serving.overlap`` has the why):
its ``FutureMap`` carries DFLASH's step state, and its output path cuts a step's tokens at stop strings."""

from __future__ import annotations

from dflash_sglang.serving.patches import is_dflash_server, patches


@patches(lambda module: module.FutureMap)
def patch_future_map(future_map_cls) -> None:
    """Wraps ``FutureMap.resolve_future`` and ``store_to_map_for_new_batch`` so a ``DFlashDraftInput`` keeps
    its two fields (last token, sequence lengths) in the ring buffer; EAGLE's inputs go through unchanged."""
    original_resolve = future_map_cls.resolve_future
    original_store = future_map_cls.store_to_map_for_new_batch

    def resolve_future(self, model_worker_batch) -> None:
        from dflash_sglang.serving.overlap import DFlashDraftInput

        if isinstance(model_worker_batch.spec_info, DFlashDraftInput):
            model_worker_batch.spec_info.resolve_from(self)
            return
        original_resolve(self, model_worker_batch)

    def store_to_map_for_new_batch(self, future_indices, draft_input) -> None:
        from dflash_sglang.serving.overlap import DFlashDraftInput

        if isinstance(draft_input, DFlashDraftInput):
            draft_input.store_into(self, future_indices)
            return
        original_store(self, future_indices, draft_input)

    future_map_cls.resolve_future = resolve_future
    future_map_cls.store_to_map_for_new_batch = store_to_map_for_new_batch


@patches(lambda module: module.SchedulerOutputProcessorMixin)
def patch_output_processor(mixin) -> None:
    """Wraps ``_resolve_spec_overlap_token_ids`` so, on a DFLASH server, each request's step tokens end at
    the token that completes a stop string (as DFLASH's v1 loop, which checks after every token), with
    ``kv_committed_len`` pulled back by the tokens cut."""
    original_resolve = mixin._resolve_spec_overlap_token_ids

    def resolve_spec_overlap_token_ids(self, result, batch):
        tokens_per_req = original_resolve(self, result, batch)
        if not is_dflash_server(self.server_args):
            return tokens_per_req
        from dflash_sglang.serving.overlap import cut_at_stop_strings

        for i, (req, tokens) in enumerate(zip(batch.reqs, tokens_per_req)):
            if req.is_retracted:
                continue
            kept = cut_at_stop_strings(req, tokens)
            if len(kept) < len(tokens):
                req.kv_committed_len -= len(tokens) - len(kept)
                tokens_per_req[i] = kept
        return tokens_per_req

    mixin._resolve_spec_overlap_token_ids = resolve_spec_overlap_token_ids
