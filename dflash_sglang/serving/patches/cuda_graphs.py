# SPDX-License-Identifier: Apache-2.0
"""Both of DFLASH's block passes in CUDA graphs, and the attention backends they run on: the CUDA-graph
runner captures TARGET_VERIFY graphs for the target (with the drafter's features) and for the drafter; the
triton backend captures and replays them without a tree mask and runs their attention with the split-KV
block kernel (``ops/block_attention.py``; sliding-window layers too; one-token decode steps on request); the
flashinfer backend attends non-causally in the drafter's ``ENCODER_ONLY`` layers."""

from __future__ import annotations

from dflash_sglang.serving.patches import is_dflash_server, patches


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
            from dflash_sglang.serving.server_defaults import load_draft_config
            from dflash_sglang.serving.worker import enable_feature_capture

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
        from dflash_sglang.serving.info import DFlashVerifyInput

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


def _mask_free(forward_mode, spec_info) -> bool:
    """A TARGET_VERIFY pass whose verify input has no custom mask: one of DFLASH's block passes."""
    return forward_mode.is_target_verify() and spec_info is not None and spec_info.custom_mask is None


def _block_kernel_covers(backend, q, k, v, layer, forward_batch, sinks) -> bool:
    """Whether the block kernel computes this layer's attention: softmax attention (sliding windows included; no
    soft cap, sinks, KV scales or cross attention) with equal Q/K/V head sizes of 16 to 512 (powers of two), the new
    K/V given and a KV cache in the queries' dtype."""
    from sglang.srt.layers.radix_attention import AttentionType

    from dflash_sglang.ops.block_attention import SUPPORTED_HEAD_DIMS

    return (k is not None and v is not None
            and not backend.enable_deterministic and not backend.use_mla and sinks is None
            and layer.qk_head_dim == layer.v_head_dim and layer.qk_head_dim in SUPPORTED_HEAD_DIMS
            and not layer.logit_cap and layer.k_scale is None
            and not layer.is_cross_attention and layer.xai_temperature_len <= 0
            and layer.attn_type in (AttentionType.DECODER, AttentionType.ENCODER_ONLY)
            and forward_batch.token_to_kv_pool.dtype == q.dtype)


def _runs_block_attention(backend, q, k, v, layer, forward_batch, sinks) -> bool:
    """Whether a ``TritonAttnBackend.forward_extend`` call is a DFLASH block pass the block kernel covers: a
    mask-free TARGET_VERIFY batch (``DFLASH_BLOCK_ATTENTION=on``)."""
    from dflash_sglang.core.config import block_attention_mode

    return (forward_batch.forward_mode.is_target_verify() and backend.forward_metadata.custom_mask is None
            and _block_kernel_covers(backend, q, k, v, layer, forward_batch, sinks) and block_attention_mode() == "on")


def _runs_block_decode(backend, q, k, v, layer, forward_batch, sinks) -> bool:
    """Whether a ``TritonAttnBackend.forward_decode`` call runs on the block kernel (blocks of one token): a
    decoder layer it covers, windowed unless ``DFLASH_DECODE_ATTENTION=block`` (``sglang``: none)."""
    from sglang.srt.layers.radix_attention import AttentionType

    from dflash_sglang.core.config import decode_attention_mode

    mode = decode_attention_mode()
    return ((mode == "block" or (mode == "auto" and _layer_window(layer) >= 0))
            and forward_batch.forward_mode.is_decode() and layer.attn_type == AttentionType.DECODER
            and _block_kernel_covers(backend, q, k, v, layer, forward_batch, sinks))


def _skips_decode_window_listing(backend, forward_mode, spec_info) -> bool:
    """Whether a plain decode batch's metadata can leave out the sliding-window listing: the backend's forwards
    so far ran every windowed layer's decode on the block kernel, which reads the full listing through its window
    (``_dflash_decode_reads_window_listing`` False; None until a decode forward ran, e.g. before CUDA-graph
    capture). Upstream's listing costs a dozen small kernels and, with a sliding pool, a host sync a step (it
    slices by a device tensor), which stalls the overlap scheduler."""
    return (forward_mode.is_decode_or_idle() and spec_info is None
            and getattr(backend, "_dflash_decode_reads_window_listing", None) is False)


class _DecodeWindowListing:
    """Within it, the backend's metadata methods see the window that a plain decode batch's listing needs, and
    other batches the backend's own. Upstream's ``update_sliding_window_buffer`` lists ``sliding_window_size``
    keys, the decoded token's included, where SGLang counts the window as keys *before* the query (its extend
    kernel, FlashInfer, FlashAttention and transformers see that many and the query's own): a decode saw one key
    too few once past the window (sgl-project/sglang#32087). So a decode listing takes one key more; where the
    block kernel reads every windowed layer's decode (``_skips_decode_window_listing``) none is built at all.
    SGLang's eviction keeps those keys: it frees sliding slots ``sliding_window_size`` below the query."""

    def __init__(self, backend, forward_mode, spec_info) -> None:
        self._backend = backend
        self._window = backend.sliding_window_size
        self._decode_window = self._window
        if self._window is not None and self._window > 0 and forward_mode.is_decode_or_idle() and spec_info is None:
            skipped = _skips_decode_window_listing(backend, forward_mode, spec_info)
            self._decode_window = None if skipped else self._window + 1

    def __enter__(self) -> None:
        self._backend.sliding_window_size = self._decode_window

    def __exit__(self, *exc) -> None:
        self._backend.sliding_window_size = self._window


def _layer_window(layer) -> int:
    """The layer's sliding window in SGLang's count (keys before the query), -1 for none."""
    window = layer.sliding_window_size
    return window if window is not None and window > -1 else -1


def _swa_slot_map(backend, layer, forward_batch):
    """For a layer whose K/V live in a hybrid pool's window-sized sliding pool (SGLang's ``SWAKVPool`` under its
    ``SWATokenToKVPoolAllocator``): the full-to-sliding slot map the block kernel reads its listed slots
    through (the allocator's tensor, updated in place, so a captured graph reads the current one); else None.
    A DFLASH drafter's backend has no allocator (``patches/gemma4.py``): its pool is indexed by full slots."""
    mapping = getattr(backend.token_to_kv_pool_allocator, "full_to_swa_index_mapping", None)
    layers = getattr(forward_batch.token_to_kv_pool, "layers_mapping", None)
    if mapping is None or layers is None or not layers[layer.layer_id][1]:
        return None
    return mapping


@patches(lambda module: module.TritonAttnBackend)
def patch_triton_backend(backend) -> None:
    """Lets ``TritonAttnBackend`` capture and replay TARGET_VERIFY graphs for verify inputs without a custom
    mask: upstream's ``init_forward_metadata_capture_cuda_graph`` / ``..._replay_cuda_graph`` copy
    ``spec_info.custom_mask`` into a buffer (EAGLE trees always have one). With no mask the captured
    attention is the same causal-chain (or ENCODER_ONLY non-causal) pass as the eager one, and a replay
    refreshes only what it reads, ``kv_indptr`` and ``kv_indices``, in one kernel (``ops.paged_kv_indices``;
    upstream: about ten, for the query index, mask and mask index too). Wraps
    ``forward_extend`` so those passes run the split-KV block kernel (upstream: its extend kernel, one program
    per request and query head walking the whole prefix; ``DFLASH_BLOCK_ATTENTION=off`` keeps it), and
    ``forward_decode`` so that plain decode steps of windowed layers (``DFLASH_DECODE_ATTENTION=auto``, or of
    every layer with ``block``) run it too, with blocks of one token: the window bounds the full listing as in
    verify (``core.config.decode_attention_mode``); once no windowed layer reads upstream's window listing, the
    decode metadata (``init_forward_metadata`` and the graph replay) stops building it, and while one does, it
    lists one key more than upstream (``_DecodeWindowListing``; ``init_cuda_graph_state`` sizes the graph
    buffer for it)."""
    original_capture = backend.init_forward_metadata_capture_cuda_graph
    original_replay = backend.init_forward_metadata_replay_cuda_graph
    original_forward_extend = backend.forward_extend
    original_forward_decode = backend.forward_decode
    original_init_forward_metadata = backend.init_forward_metadata
    original_init_cuda_graph_state = backend.init_cuda_graph_state
    import torch
    from sglang.srt.layers.radix_attention import AttentionType

    from dflash_sglang import ops
    from dflash_sglang.ops.block_attention import block_attention

    def init_cuda_graph_state(self, max_bs, max_num_tokens, *args, **kwargs):
        original_init_cuda_graph_state(self, max_bs, max_num_tokens, *args, **kwargs)
        window = self.sliding_window_size
        if window is not None and window > 0 and \
                self.cuda_graph_window_kv_indices.numel() < max_num_tokens * (window + 1):
            # room for decode listings one key longer than upstream's (_DecodeWindowListing)
            self.cuda_graph_window_kv_indices = torch.zeros(max_num_tokens * (window + 1), dtype=torch.int64,
                                                            device=self.device)

    def init_forward_metadata_capture_cuda_graph(self, bs, num_tokens, req_pool_indices, seq_lens, encoder_lens,
                                                 forward_mode, spec_info):
        if not _mask_free(forward_mode, spec_info):
            with _DecodeWindowListing(self, forward_mode, spec_info):
                return original_capture(self, bs, num_tokens, req_pool_indices, seq_lens, encoder_lens,
                                        forward_mode, spec_info)
        original_capture(self, bs, num_tokens, req_pool_indices, seq_lens, encoder_lens, forward_mode,
                         _WithoutCustomMask(spec_info))
        self.forward_metadata.custom_mask = None

    def init_forward_metadata(self, forward_batch):
        with _DecodeWindowListing(self, forward_batch.forward_mode, forward_batch.spec_info):
            return original_init_forward_metadata(self, forward_batch)

    def init_forward_metadata_replay_cuda_graph(self, bs, req_pool_indices, seq_lens, seq_lens_sum, encoder_lens,
                                                forward_mode, spec_info, seq_lens_cpu):
        if not _mask_free(forward_mode, spec_info):
            with _DecodeWindowListing(self, forward_mode, spec_info):
                return original_replay(self, bs, req_pool_indices, seq_lens, seq_lens_sum, encoder_lens,
                                       forward_mode, spec_info, seq_lens_cpu)
        if (self.sliding_window_size is not None and self.sliding_window_size > 0
                and getattr(self, "_dflash_reads_window_listing", False)):
            return original_replay(self, bs, req_pool_indices, seq_lens, seq_lens_sum, encoder_lens, forward_mode,
                                   _WithoutCustomMask(spec_info), seq_lens_cpu)
        # The graph reads kv_indptr / kv_indices (sliding layers too: the block kernel applies their window to
        # the full listing, and translates a sliding pool's slots itself); its qo_indptr (i * B) was written at
        # capture, and the mask index is unread without a mask.
        bs = len(req_pool_indices)
        ops.paged_kv_indices(self.req_to_token, req_pool_indices, seq_lens[:bs], self.kv_indptr[:bs + 1],
                             self.cuda_graph_kv_indices)

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, sinks=None):
        if not _runs_block_attention(self, q, k, v, layer, forward_batch, sinks):
            if _mask_free(forward_batch.forward_mode, forward_batch.spec_info) and _layer_window(layer) >= 0:
                # Upstream's kernel reads the window listing: graph replays must keep building it.
                self._dflash_reads_window_listing = True
            return original_forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache, sinks)
        if save_kv_cache:
            forward_batch.token_to_kv_pool.set_kv_buffer(layer, forward_batch.out_cache_loc, k, v)
        head_dim = layer.qk_head_dim
        metadata = self.forward_metadata
        out = block_attention(
            q.view(-1, layer.tp_q_head_num, head_dim), k.view(-1, layer.tp_k_head_num, head_dim),
            v.view(-1, layer.tp_v_head_num, head_dim),
            forward_batch.token_to_kv_pool.get_key_buffer(layer.layer_id),
            forward_batch.token_to_kv_pool.get_value_buffer(layer.layer_id), metadata.kv_indptr,
            metadata.kv_indices, block_size=metadata.max_extend_len,
            causal=layer.attn_type != AttentionType.ENCODER_ONLY, sm_scale=layer.scaling, window=_layer_window(layer),
            kv_slot_map=_swa_slot_map(self, layer, forward_batch))
        return out.view(q.shape)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, sinks=None):
        windowed = _layer_window(layer) >= 0
        if not _runs_block_decode(self, q, k, v, layer, forward_batch, sinks):
            if windowed:  # upstream's kernel reads the window listing: metadata must keep building it
                self._dflash_decode_reads_window_listing = True
            return original_forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache, sinks)
        if windowed and getattr(self, "_dflash_decode_reads_window_listing", None) is None:
            self._dflash_decode_reads_window_listing = False
        if save_kv_cache:
            forward_batch.token_to_kv_pool.set_kv_buffer(layer, forward_batch.out_cache_loc, k, v)
        head_dim = layer.qk_head_dim
        # The decode listing (kv_indptr / kv_indices, the full one under a window too) ends with the token decoded,
        # whose K/V the kernel takes from k and v; the window and a sliding pool's slot map apply as in verify.
        out = block_attention(
            q.reshape(-1, layer.tp_q_head_num, head_dim), k.reshape(-1, layer.tp_k_head_num, head_dim),
            v.reshape(-1, layer.tp_v_head_num, head_dim),
            forward_batch.token_to_kv_pool.get_key_buffer(layer.layer_id),
            forward_batch.token_to_kv_pool.get_value_buffer(layer.layer_id), self.forward_metadata.kv_indptr,
            self.forward_metadata.kv_indices, block_size=1, causal=True, sm_scale=layer.scaling,
            window=_layer_window(layer), kv_slot_map=_swa_slot_map(self, layer, forward_batch), listed_block=True)
        return out.view(-1, layer.tp_q_head_num * head_dim)

    backend.init_forward_metadata_capture_cuda_graph = init_forward_metadata_capture_cuda_graph
    backend.init_forward_metadata_replay_cuda_graph = init_forward_metadata_replay_cuda_graph
    backend.forward_extend = forward_extend
    backend.forward_decode = forward_decode
    backend.init_forward_metadata = init_forward_metadata
    backend.init_cuda_graph_state = init_cuda_graph_state


@patches(lambda module: module.FlashInferAttnBackend)
def patch_flashinfer_backend(backend) -> None:
    """Two fixes for DFLASH's block passes on ``FlashInferAttnBackend``:

    * ``forward_extend`` honours ``AttentionType.ENCODER_ONLY`` in its paged path, which upstream runs with
      ``causal=not layer.is_cross_attention`` (its ragged path already honours it). Without this a
      flashinfer drafter attends causally: outputs stay lossless, acceptance silently drops.
    * ``init_forward_metadata_capture_cuda_graph`` builds the TARGET_VERIFY wrappers of a mask-free pass
      without upstream's custom-mask buffer (``cuda_graph_custom_mask``, zeros until an EAGLE tree mask is
      copied in). FlashInfer runs a graph-mode wrapper that has a mask buffer in custom-mask mode, so the
      captured pass would attend to nothing: measured on the H100, the agreeing tiny drafter fell from 6.2
      to 1.0 accepted tokens per step (and a flashinfer *target* would verify against garbage logits).
    """
    original_forward_extend = backend.forward_extend
    original_capture = backend.init_forward_metadata_capture_cuda_graph
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

    def init_forward_metadata_capture_cuda_graph(self, bs, num_tokens, req_pool_indices, seq_lens, encoder_lens,
                                                 forward_mode, spec_info):
        if not _mask_free(forward_mode, spec_info):
            return original_capture(self, bs, num_tokens, req_pool_indices, seq_lens, encoder_lens, forward_mode,
                                    spec_info)
        mask_buffer, self.cuda_graph_custom_mask = self.cuda_graph_custom_mask, None
        try:
            return original_capture(self, bs, num_tokens, req_pool_indices, seq_lens, encoder_lens, forward_mode,
                                    spec_info)
        finally:
            self.cuda_graph_custom_mask = mask_buffer

    backend.forward_extend = forward_extend
    backend.init_forward_metadata_capture_cuda_graph = init_forward_metadata_capture_cuda_graph
