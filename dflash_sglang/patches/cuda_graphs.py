# SPDX-License-Identifier: Apache-2.0
"""Both of DFLASH's block passes in CUDA graphs, and the attention backends they run on: the CUDA-graph
runner captures TARGET_VERIFY graphs for the target (with the drafter's features) and for the drafter; the
triton backend captures and replays them without a tree mask; the flashinfer backend attends non-causally
in the drafter's ``ENCODER_ONLY`` layers."""

from __future__ import annotations

from dflash_sglang.patches import is_dflash_server, patches


class _FixedBlockVerifier:
    """What ``CudaGraphRunner.__init__`` is shown of DFLASH while it sizes and captures its graphs.

    Upstream captures TARGET_VERIFY graphs of ``speculative_num_draft_tokens`` tokens per request for the
    algorithms that verify fixed-size drafts without a drafter of their own (its NGRAM branch) and refuses
    draft runners. Both of DFLASH's block passes have exactly that shape, so for the duration of
    ``__init__`` the runner sees an NGRAM-like algorithm on a non-draft runner; everything else is DFLASH.
    """

    def __init__(self, algorithm) -> None:
        self._algorithm = algorithm

    def is_ngram(self) -> bool:
        return True

    def __getattr__(self, name: str):
        return getattr(self._algorithm, name)


@patches(lambda module: module.CudaGraphRunner)
def patch_cuda_graph_runner(runner_cls) -> None:
    """CUDA graphs for DFLASH's two block passes (upstream: ``CudaGraphRunner.__init__`` branches on
    ``spec_algorithm.is_eagle() / is_standalone() / is_ngram()``; ``get_spec_info`` builds their inputs)."""
    original_init = runner_cls.__init__
    original_get_spec_info = runner_cls.get_spec_info

    def __init__(self, model_runner) -> None:
        if not is_dflash_server(model_runner.server_args):
            return original_init(self, model_runner)
        if not model_runner.is_draft_worker:  # the graphs must contain the feature capture
            from dflash_sglang.server_defaults import load_draft_config
            from dflash_sglang.worker import enable_feature_capture

            enable_feature_capture(model_runner, load_draft_config(model_runner.server_args))
        from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode

        # The target's verify graphs return the drafter's features; the drafter's graphs return logits only.
        self._dflash_hidden_mode = CaptureHiddenMode.NULL if model_runner.is_draft_worker else CaptureHiddenMode.FULL
        saved = model_runner.spec_algorithm, model_runner.is_draft_worker
        model_runner.spec_algorithm = _FixedBlockVerifier(saved[0])
        model_runner.is_draft_worker = False
        try:
            original_init(self, model_runner)
        finally:
            model_runner.spec_algorithm, model_runner.is_draft_worker = saved

    def get_spec_info(self, num_tokens: int):
        if not is_dflash_server(self.model_runner.server_args):
            return original_get_spec_info(self, num_tokens)
        from dflash_sglang.info import DFlashVerifyInput

        return DFlashVerifyInput(None, self.num_tokens_per_bs, self._dflash_hidden_mode)

    runner_cls.__init__ = __init__
    runner_cls.get_spec_info = get_spec_info


class _WithoutCustomMask:
    """A verify input as TritonAttnBackend's CUDA-graph methods read it, for a chain with no custom mask:
    an empty mask, so the copy into the graph's mask buffer is a no-op."""

    def __init__(self, spec_info) -> None:
        import torch

        self._spec_info = spec_info
        self.custom_mask = torch.empty(0, dtype=torch.bool)

    def __getattr__(self, name: str):
        return getattr(self._spec_info, name)


@patches(lambda module: module.TritonAttnBackend)
def patch_triton_backend(backend) -> None:
    """Lets ``TritonAttnBackend`` capture and replay TARGET_VERIFY graphs for verify inputs without a custom
    mask: upstream's ``init_forward_metadata_capture_cuda_graph`` / ``..._replay_cuda_graph`` copy
    ``spec_info.custom_mask`` into a buffer (EAGLE trees always have one). With no mask the captured
    attention is the same causal-chain (or ENCODER_ONLY non-causal) kernel as the eager pass."""
    original_capture = backend.init_forward_metadata_capture_cuda_graph
    original_replay = backend.init_forward_metadata_replay_cuda_graph

    def mask_free(forward_mode, spec_info) -> bool:
        return forward_mode.is_target_verify() and spec_info is not None and spec_info.custom_mask is None

    def init_forward_metadata_capture_cuda_graph(self, bs, num_tokens, req_pool_indices, seq_lens, encoder_lens,
                                                 forward_mode, spec_info):
        if not mask_free(forward_mode, spec_info):
            return original_capture(self, bs, num_tokens, req_pool_indices, seq_lens, encoder_lens, forward_mode,
                                    spec_info)
        original_capture(self, bs, num_tokens, req_pool_indices, seq_lens, encoder_lens, forward_mode,
                         _WithoutCustomMask(spec_info))
        self.forward_metadata.custom_mask = None

    def init_forward_metadata_replay_cuda_graph(self, bs, req_pool_indices, seq_lens, seq_lens_sum, encoder_lens,
                                                forward_mode, spec_info, seq_lens_cpu):
        if mask_free(forward_mode, spec_info):
            spec_info = _WithoutCustomMask(spec_info)
        return original_replay(self, bs, req_pool_indices, seq_lens, seq_lens_sum, encoder_lens, forward_mode,
                               spec_info, seq_lens_cpu)

    backend.init_forward_metadata_capture_cuda_graph = init_forward_metadata_capture_cuda_graph
    backend.init_forward_metadata_replay_cuda_graph = init_forward_metadata_replay_cuda_graph


@patches(lambda module: module.FlashInferAttnBackend)
def patch_flashinfer_backend(backend) -> None:
    """Makes ``FlashInferAttnBackend.forward_extend`` honour ``AttentionType.ENCODER_ONLY`` in its paged path,
    which upstream runs with ``causal=not layer.is_cross_attention`` (its ragged path already honours it).
    Without this a flashinfer drafter attends causally: outputs stay lossless, acceptance silently drops."""
    original_forward_extend = backend.forward_extend
    from sglang.srt.layers.radix_attention import AttentionType

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        if layer.attn_type != AttentionType.ENCODER_ONLY or self.forward_metadata.use_ragged:
            return original_forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache)
        wrapper = self.forward_metadata.prefill_wrappers[self._get_wrapper_idx(layer)]
        paged_forward = wrapper.forward
        wrapper.forward = lambda *args, **kwargs: paged_forward(*args, **{**kwargs, "causal": False})
        try:
            return original_forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache)
        finally:
            del wrapper.forward  # back to the class's method

    backend.forward_extend = forward_extend
