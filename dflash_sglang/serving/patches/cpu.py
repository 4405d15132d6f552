# SPDX-License-Identifier: Apache-2.0
"""What SGLang's CPU path lacks, for DFLASH and for the plain server the tests compare it with: mask-free
TARGET_VERIFY passes in the torch_native attention backend, a KV pool that does not warm up a Triton kernel
on a CPU device, a paged KV allocator (``--page-size > 1``) that does not launch Triton kernels there,
xgrammar's token bitmask applied to CPU logits (structured output), and ``--tp-size > 1`` process groups that
do not open an NCCL communicator on a CPU device."""

from __future__ import annotations

from dflash_sglang.serving.patches import patches


@patches(lambda module: module.TorchNativeAttnBackend)
def patch_torch_native_backend(backend) -> None:
    """Lets ``TorchNativeAttnBackend.forward_extend`` run TARGET_VERIFY passes without a tree mask.

    SGLang's torch_native backend reads ``extend_prefix_lens``/``extend_seq_lens`` and ``seq_lens`` as the
    total KV length, which a TARGET_VERIFY ForwardBatch does not set (there ``seq_lens`` is the committed
    prefix). For verify inputs without a custom mask (DFLASH's causal chain, and the drafter's non-causal
    block) this runs :func:`block_attention_cpu` on CPU tensors (``DFLASH_BLOCK_ATTENTION=off``: upstream's
    loop), and elsewhere fills those lengths in for upstream's loop; tree-masked verification (EAGLE) is left
    as upstream has it.
    """
    from dflash_sglang.core.config import block_attention_mode

    original_forward_extend = backend.forward_extend

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        spec_info = forward_batch.spec_info
        if not forward_batch.forward_mode.is_target_verify() or getattr(spec_info, "custom_mask", 0) is not None:
            return original_forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache)
        if (q.device.type == "cpu" and not layer.is_cross_attention and layer.qk_head_dim == layer.v_head_dim
                and block_attention_mode() == "on"):
            return block_attention_cpu(q, k, v, layer, forward_batch, spec_info.draft_token_num, save_kv_cache)
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


def block_attention_cpu(q, k, v, layer, forward_batch, block_size: int, save_kv_cache: bool):
    """Attention of a TARGET_VERIFY pass on the CPU: each request's ``block_size`` queries against its committed
    prefix and its block, in ONE ``scaled_dot_product_attention`` call for the whole batch.

    Upstream's ``_run_sdpa_forward_extend`` pads every request's queries to its whole KV length (prefix + block)
    so that SDPA's square causal mask lines up, and loops over requests: a verify pass then computes
    (prefix + B)^2 scores per head instead of B * (prefix + B), ~20x the work at a 300-token prefix. Here the
    queries stay B per request; the mask (built once per pass and kept on the ForwardBatch, as are the
    gathered KV slots) lets query i of a request see its keys 0 .. prefix + i (causal layers: the target) or
    all prefix + B (``ENCODER_ONLY``: the drafter), and hides the padding of shorter requests.

    Args:
        q: [bs * B, num_heads * head_dim] (or [bs * B, num_heads, head_dim]); k, v: [bs * B, num_kv_heads,
            head_dim], this layer's block K/V, written to the pool at ``out_cache_loc`` first.
    Returns:
        the attention output in q's shape and dtype.
    """
    import torch
    from torch.nn.functional import scaled_dot_product_attention

    from sglang.srt.layers.radix_attention import AttentionType

    pool = forward_batch.token_to_kv_pool
    if save_kv_cache:
        pool.set_kv_buffer(layer, forward_batch.out_cache_loc, k, v)
    causal = layer.attn_type != AttentionType.ENCODER_ONLY
    key_slots, mask = _block_attention_inputs(forward_batch, block_size, causal)
    bs, max_len = key_slots.shape
    heads, kv_heads, dim = layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim
    query = q.view(bs, block_size, heads, dim).transpose(1, 2)  # [bs, H, B, D]
    key = pool.get_key_buffer(layer.layer_id)[key_slots.view(-1)].view(bs, max_len, kv_heads, dim).transpose(1, 2)
    value = pool.get_value_buffer(layer.layer_id)[key_slots.view(-1)].view(bs, max_len, kv_heads, dim).transpose(1, 2)
    if key.dtype != query.dtype:  # as upstream: SDPA wants one dtype
        key, value = key.to(query.dtype), value.to(query.dtype)
    out = scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=layer.scaling,
                                       enable_gqa=heads != kv_heads)
    return out.transpose(1, 2).reshape(q.shape)


def _block_attention_inputs(forward_batch, block_size: int, causal: bool):
    """Per pass (every layer reads the same): the KV slots of each request's prefix + block, [bs, max_len]
    int64 (past a shorter request's length, whatever its ``req_to_token`` row holds: pool slots, masked), and
    the [bs, 1, B, max_len] bool mask (None where nothing is hidden)."""
    import torch

    cache = getattr(forward_batch, "_dflash_block_attention", None)
    if cache is None:
        cache = forward_batch._dflash_block_attention = {}
    if causal in cache:
        return cache[causal]
    prefix_lens = forward_batch.seq_lens.to(torch.int64)  # committed tokens per request
    kv_lens = prefix_lens + block_size
    max_len = int(kv_lens.max())
    key_slots = forward_batch.req_to_token_pool.req_to_token[forward_batch.req_pool_indices, :max_len].to(torch.int64)
    columns = torch.arange(max_len, device=kv_lens.device)
    if causal:  # query i (position prefix + i) sees keys 0 .. prefix + i
        limits = prefix_lens[:, None] + torch.arange(block_size, device=kv_lens.device)[None, :]  # [bs, B]
        mask = columns[None, None, :] <= limits[:, :, None]
    elif bool((kv_lens != max_len).any()):
        mask = (columns[None, :] < kv_lens[:, None])[:, None, :].expand(-1, block_size, -1)
    else:
        mask = None
    if mask is not None:
        mask = mask[:, None]
    cache[causal] = key_slots, mask
    return key_slots, mask


@patches(lambda module: module.MHATokenToKVPool)
def patch_memory_pool(pool) -> None:
    """Skips ``MHATokenToKVPool._init_kv_copy_and_warmup`` on CPU devices.

    SGLang turns the pool's KV-copy kernel on whenever speculative decoding is on and warms it up with a
    Triton launch, which cannot run without a GPU. The copy only moves KV between pages for EAGLE's tree drafts
    (top-k > 1) with page sizes > 1; DFLASH never moves KV. On the GPU nothing changes.
    """
    original_init_kv_copy = pool._init_kv_copy_and_warmup

    def init_kv_copy_and_warmup(self) -> None:
        if str(self.device).startswith("cpu"):
            self._kv_copy_config = None
            return
        original_init_kv_copy(self)

    pool._init_kv_copy_and_warmup = init_kv_copy_and_warmup


@patches(lambda module: module.PagedTokenToKVPoolAllocator)
def patch_paged_allocator(allocator) -> None:
    """Gives ``PagedTokenToKVPoolAllocator.alloc_extend`` and ``alloc_decode`` a PyTorch path on CPU devices.

    Upstream launches the Triton kernels ``alloc_extend_kernel`` / ``alloc_decode_kernel`` on every device, so
    ``--page-size > 1`` cannot serve on a CPU (with or without DFLASH). Off the GPU this computes the same slots
    with SGLang's own ``alloc_extend_naive`` (as its NPU allocator does) and the NPU allocator's decode formula:
    the tail of each request's last page first (``last_loc + 1 ..``), then whole new pages from ``free_pages``.
    On the GPU nothing changes.
    """
    import torch

    from sglang.srt.mem_cache.allocator import alloc_extend_naive
    from sglang.srt.utils import get_num_new_pages

    original_alloc_extend, original_alloc_decode = allocator.alloc_extend, allocator.alloc_decode

    def alloc_extend(self, prefix_lens, prefix_lens_cpu, seq_lens, seq_lens_cpu, last_loc, extend_num_tokens):
        if not str(self.device).startswith("cpu"):
            return original_alloc_extend(self, prefix_lens, prefix_lens_cpu, seq_lens, seq_lens_cpu, last_loc,
                                         extend_num_tokens)
        num_new_pages = get_num_new_pages(seq_lens=seq_lens_cpu, page_size=self.page_size,
                                          prefix_lens=prefix_lens_cpu)
        if self.need_sort and num_new_pages > len(self.free_pages):
            self.merge_and_sort_free()
        if num_new_pages > len(self.free_pages):
            return None
        out_indices = torch.empty((extend_num_tokens,), dtype=torch.int64, device=self.device)
        alloc_extend_naive(prefix_lens.to(torch.int64), seq_lens.to(torch.int64), last_loc.to(torch.int64),
                           self.free_pages, out_indices, self.page_size, self.device)
        self.free_pages = self.free_pages[num_new_pages:]
        return out_indices

    def alloc_decode(self, seq_lens, seq_lens_cpu, last_loc):
        if not str(self.device).startswith("cpu"):
            return original_alloc_decode(self, seq_lens, seq_lens_cpu, last_loc)
        num_new_pages = get_num_new_pages(seq_lens=seq_lens_cpu, page_size=self.page_size, decode=True)
        if self.need_sort and num_new_pages > len(self.free_pages):
            self.merge_and_sort_free()
        if num_new_pages > len(self.free_pages):
            return None
        out_indices = last_loc.to(torch.int64) + 1  # the next slot of the request's last page ...
        starts_page = seq_lens % self.page_size == 1  # ... or the first of a new page
        out_indices[starts_page] = self.free_pages[:num_new_pages].to(torch.int64) * self.page_size
        self.free_pages = self.free_pages[num_new_pages:]
        return out_indices

    allocator.alloc_extend = alloc_extend
    allocator.alloc_decode = alloc_decode


@patches(lambda module: module.XGrammarGrammar)
def patch_xgrammar_grammar(grammar_cls) -> None:
    """Gives ``XGrammarGrammar.apply_vocab_mask`` a CPU path.

    Upstream applies the token bitmask with a Triton kernel (sgl_kernel's CUDA kernel on ROCm) and raises
    "Unsupported device: cpu" otherwise, inside the scheduler: the first structured-output request (json_schema,
    regex, ebnf, structural_tag) takes a CPU server down. On CPU logits this calls xgrammar's own
    ``apply_token_bitmask_inplace``, which dispatches CPU tensors to xgrammar's CPU kernel (the same packed
    int32 bitmask, -inf where a bit is 0, the vocabulary clipped to ``min(logits width, 32 * mask words)`` as
    the Triton kernel does). On the GPU nothing changes.
    """
    original_apply = grammar_cls.apply_vocab_mask

    def apply_vocab_mask(self, logits, vocab_mask) -> None:
        if logits.device.type != "cpu":
            return original_apply(self, logits, vocab_mask)
        from xgrammar import apply_token_bitmask_inplace

        apply_token_bitmask_inplace(logits, vocab_mask.to(logits.device))

    grammar_cls.apply_vocab_mask = apply_vocab_mask


@patches(lambda module: module.PyNcclCommunicator)
def patch_pynccl(communicator) -> None:
    """Leaves ``PyNcclCommunicator`` disabled on CPU devices, as it already is where no NCCL library loads.

    SGLang's ``init_model_parallel_group`` asks every group for a PyNccl communicator except on NPU/XPU; where the
    NCCL library is installed (torch's CUDA wheels bring it) its constructor then enters ``torch.cuda.device`` with
    the CPU device and raises, so ``--device cpu --tp-size 2`` cannot start. Disabled, the group's collectives on
    CPU tensors take SGLang's own CPU route (``GroupCoordinator.all_reduce``: shared-memory all-reduce, else
    torch.distributed over the gloo group). On the GPU nothing changes.
    """
    original_init = communicator.__init__

    def __init__(self, group, device, library_path=None) -> None:
        if str(device).startswith("cpu"):
            self.group, self.available, self.disabled = group, False, True
            return
        original_init(self, group, device, library_path)

    communicator.__init__ = __init__
