# SPDX-License-Identifier: Apache-2.0
"""What SGLang's CPU path lacks, for DFLASH and for the plain server the tests compare it with: weight layouts
that multiply a block of rows at the cost of one row, a KV pool that does not warm up a Triton kernel on a CPU
device, a paged KV allocator (``--page-size > 1``) that does not launch Triton kernels there, xgrammar's token
bitmask applied to CPU logits (structured output), and ``--tp-size > 1`` process groups that do not open an NCCL
communicator on a CPU device. The torch_native attention backend's patches (block passes, sliding windows, SWA
pools): ``cpu_attention.py``."""

from __future__ import annotations

from dflash_sglang.serving.patches import patches


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


def _transposed_layout(weight) -> None:
    """Keeps ``weight`` ([out, in]) as the transpose of a contiguous [in, out] matrix (its values unchanged),
    unless it already is: ``x @ weight.T`` then multiplies by a contiguous matrix (see patch_unquant_layouts)."""
    import torch

    data = weight.data
    if (data.dtype != torch.float32 or data.dim() != 2 or not data.is_contiguous() or data.shape[0] == 1
            or data.shape[1] == 1):
        return
    weight.data = data.t().contiguous().t()


@patches(lambda module: module)
def patch_unquant_layouts(unquant) -> None:
    """On CPU devices without SGLang's AMX kernels: unquantized float32 linear, embedding and LM-head weights are
    stored [in, out] in memory (a transposed view keeps their [out, in] shape, values and loaders).

    ``F.linear(x, w)`` multiplies by ``w.T``; with ``w`` stored [out, in] the BLAS reads a transposed operand,
    which on the CPUs measured here costs ~2x a contiguous one for 4-16 rows: a DFLASH verify pass (a block
    of rows per request) took 50 ms where one decoding row took 35 ms, 46 of those 50 ms in ``aten::mm``
    (scripts/bench_step_cpu.py traces, SmolLM2-135M, bench/results/NOTES.md). One row costs the same either
    way, so the plain server is not slowed. bfloat16 weights keep [out, in]: oneDNN's bf16 GEMMs are faster
    with it (SmolLM2's LM head, one row: 1.5 ms against 2.2 ms [in, out]). GPUs and AMX kernels keep theirs.
    """
    from sglang.srt.utils import use_intel_amx_backend

    def relayout_after(original):
        def process_weights_after_loading(self, layer) -> None:
            original(self, layer)
            weight = getattr(layer, "weight", None)
            if weight is not None and weight.device.type == "cpu" and not use_intel_amx_backend(layer):
                _transposed_layout(weight)

        return process_weights_after_loading

    for method in (unquant.UnquantizedLinearMethod, unquant.UnquantizedEmbeddingMethod):
        method.process_weights_after_loading = relayout_after(method.process_weights_after_loading)
