# SPDX-License-Identifier: Apache-2.0
"""How this package hooks into SGLang 0.5.10.post1 (the patches themselves: ``dflash_sglang.serving.patches``).

SGLang has no plugin entry point for speculative algorithms and parses arguments before user code runs,
in the launching process and again in its spawned scheduler processes. So ``dflash_sglang_hook.pth``
(installed into site-packages) calls :func:`install_import_hook` at every interpreter start-up; the hook
costs one ``sys.meta_path`` entry and imports nothing. When SGLang later imports one of the modules below,
the hook lets it load and then applies that module's patch, once (``PATCHES`` below; every patch checks the
SGLang version first):

* ``sglang.srt.speculative.spec_info`` -- adds ``SpeculativeAlgorithm.DFLASH`` (replaces nothing; the
  member is added to the enum) and wraps ``SpeculativeAlgorithm.create_worker`` and ``supports_spec_v2`` so
  DFLASH builds ``dflash_sglang.serving.worker_overlap.DFlashOverlapWorker`` under the overlap scheduler (SGLang's
  default) and ``dflash_sglang.serving.worker.DFlashWorker`` with ``--disable-overlap-schedule``.
* ``sglang.srt.server_args`` -- appends ``DFLASH`` to the ``--speculative-algorithm`` choices in
  ``ServerArgs.add_cli_args`` and wraps ``ServerArgs._handle_speculative_decoding`` to validate the drafter
  against the target and set DFLASH's defaults (``dflash_sglang.serving.server_defaults``).
* ``sglang.srt.models.registry`` -- registers the models of ``dflash_sglang.serving.models`` (the drafter, and
  targets SGLang lacks) with ``ModelRegistry.register``, as ``SGLANG_EXTERNAL_MODEL_PACKAGE`` would.
* ``sglang.srt.layers.attention.torch_native_backend`` -- wraps ``TorchNativeAttnBackend.forward_extend``
  and ``forward_decode`` so the CPU backend runs mask-free TARGET_VERIFY passes (upstream supports them on
  GPU backends only) and applies sliding windows, reading SWA-pooled layers through the full-to-SWA slot
  mapping (upstream ignores both).
* ``sglang.srt.mem_cache.memory_pool`` -- skips ``MHATokenToKVPool._init_kv_copy_and_warmup`` (a Triton
  warm-up for paged KV moves) on CPU devices, where Triton cannot launch.
* ``sglang.srt.mem_cache.allocator`` -- wraps ``PagedTokenToKVPoolAllocator.alloc_extend`` and ``alloc_decode``
  so ``--page-size > 1`` allocates with PyTorch on CPU devices (upstream launches Triton kernels everywhere).
* ``sglang.srt.constrained.xgrammar_backend`` -- wraps ``XGrammarGrammar.apply_vocab_mask`` so structured
  output applies its token bitmask to CPU logits with xgrammar's CPU kernel (upstream raises on a CPU).
* ``sglang.srt.distributed.device_communicators.pynccl`` -- leaves ``PyNcclCommunicator`` disabled on CPU
  devices, so ``--device cpu --tp-size > 1`` starts where an NCCL library is installed.
* ``sglang.srt.managers.tokenizer_manager`` -- wraps ``TokenizerManager._validate_one_request`` so every
  server (DFLASH or not) answers with HTTP 400 the requests that would kill SGLang's scheduler (prompt token
  ids outside the vocabulary, NaN temperatures...: ``request_safety.py``), and a DFLASH server the requests
  for options it does not serve (``request_rules.py``).
* ``sglang.srt.managers.io_struct`` -- wraps ``GenerateReqInput._handle_parallel_sampling`` to refuse an
  ``n`` below 1 or above ``request_safety.MAX_PARALLEL_SAMPLES`` before SGLang copies the request n times.
* ``sglang.srt.managers.scheduler`` -- wraps ``Scheduler.get_internal_state`` so a DFLASH server's
  ``/server_info`` ``avg_spec_accept_length`` counts the steps since SGLang's last decode log line too.
* ``sglang.srt.layers.utils.logprob`` -- wraps ``get_token_ids_logprobs_raw`` so a batch mixing requests with and
  without ``token_ids_logprob`` gives the output processor tensors only (upstream's ``[]`` ends the scheduler).
* ``sglang.srt.entrypoints.openai.serving_chat`` -- wraps ``OpenAIServingChat._process_logprobs_tokens`` so
  a streamed chat chunk of several tokens (one DFLASH step) gives each token its own top logprobs.
* ``sglang.srt.utils.hf_transformers_utils`` -- adds the Gemma 4 configs (``models/gemma4_config.py``) to
  ``_CONFIG_REGISTRY`` and transformers' ``AutoConfig``: SGLang's pinned transformers 5.3.0 has no ``gemma4``.
* ``sglang.srt.configs.model_config`` -- wraps ``ModelConfig._derive_model_shapes`` and
  ``ModelConfig.get_total_num_kv_heads`` so a Gemma 4 target is served text-only and states its KV shapes
  per layer type (``gemma4_config.adapt_model_config``); other models are left as they are.
* ``sglang.srt.configs.update_config`` -- wraps ``adjust_config_with_unaligned_cpu_tp`` so SGLang's CPU path does
  not pad a Gemma 4's heads at ``--tp-size`` > 1 (it splits them as on the GPU).
* ``sglang.srt.model_executor.model_runner_kv_cache_mixin`` -- wraps
  ``ModelRunnerKVCacheMixin.get_cell_size_per_token`` and ``_init_pools`` so a Gemma 4 target's KV pool
  keeps each layer at its own shape (``models/gemma4_kv_pool.Gemma4KVPool``) and is sized by that.
* ``sglang.srt.layers.attention.attention_registry`` -- wraps the ``triton`` entry of
  ``ATTENTION_BACKENDS`` so over a ``Gemma4KVPool`` the backend's decode buffers fit its widest layer.
* ``sglang.srt.layers.moe.fused_moe_triton.fused_moe_triton_config`` -- wraps ``get_moe_configs`` so fused-MoE
  kernel configs tuned by ``scripts/tune_moe.py`` and shipped in ``serving/moe_configs/`` are found first.
* ``sglang.srt.model_loader.loader`` -- wraps ``initialize_dummy_weights`` so ``DFLASH_BENCH_DUMMY_SCALES=neutral``
  (set by ``scripts/bench_step.py``) leaves norm weights and scalars at 1 in dummy-weight benchmarks.
* ``sglang.srt.model_executor.cuda_graph_runner`` -- wraps ``CudaGraphRunner.__init__`` and
  ``CudaGraphRunner.get_spec_info`` so a DFLASH server captures both of its block passes (the target's
  verify, with the drafter's features, and the drafter's pass) at decode batch sizes.
* ``sglang.srt.layers.attention.triton_backend`` -- wraps ``TritonAttnBackend``'s two CUDA-graph
  metadata methods so a TARGET_VERIFY pass without a custom mask (DFLASH's chain) can be captured, and its
  ``forward_extend`` so those passes run the split-KV block attention kernel (``ops/block_attention.py``).
* ``sglang.srt.layers.attention.flashinfer_backend`` -- wraps ``FlashInferAttnBackend.forward_extend`` so
  ``ENCODER_ONLY`` layers (the drafter's) attend non-causally in paged passes, as the triton, fa3 and
  torch_native backends already do, and ``init_forward_metadata_capture_cuda_graph`` so a mask-free
  TARGET_VERIFY graph is captured without a custom-mask buffer (FlashInfer would apply its zeros).
* ``sglang.srt.managers.overlap_utils`` -- wraps ``FutureMap.resolve_future`` and
  ``store_to_map_for_new_batch`` so DFLASH's step state (``overlap.DFlashDraftInput``) rides in the ring buffer.
* ``sglang.srt.managers.scheduler_output_processor_mixin`` -- wraps ``_resolve_spec_overlap_token_ids`` so a
  DFLASH step's tokens end at a stop string as they do in the v1 loop (``overlap.cut_at_stop_strings``).

Set ``DFLASH_SGLANG_DISABLE=1`` to leave SGLang untouched. Other SGLang versions get a clear error.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
from types import ModuleType

# SGLang module -> "dflash_sglang.serving.patches.<module>:<function>", imported only when SGLang imports the module.
PATCHES: dict[str, str] = {
    "sglang.srt.speculative.spec_info": "algorithm:patch_spec_info",
    "sglang.srt.server_args": "algorithm:patch_server_args",
    "sglang.srt.models.registry": "algorithm:patch_model_registry",
    "sglang.srt.managers.tokenizer_manager": "algorithm:patch_tokenizer_manager",
    "sglang.srt.managers.io_struct": "algorithm:patch_generate_req_input",
    "sglang.srt.managers.scheduler": "algorithm:patch_scheduler",
    "sglang.srt.layers.utils.logprob": "algorithm:patch_token_ids_logprobs",
    "sglang.srt.entrypoints.openai.serving_chat": "algorithm:patch_serving_chat",
    "sglang.srt.layers.attention.torch_native_backend": "cpu_attention:patch_torch_native_backend",
    "sglang.srt.mem_cache.memory_pool": "cpu:patch_memory_pool",
    "sglang.srt.layers.quantization.unquant": "cpu:patch_unquant_layouts",
    "sglang.srt.mem_cache.allocator": "cpu:patch_paged_allocator",
    "sglang.srt.constrained.xgrammar_backend": "cpu:patch_xgrammar_grammar",
    "sglang.srt.distributed.device_communicators.pynccl": "cpu:patch_pynccl",
    "sglang.srt.utils.hf_transformers_utils": "gemma4:patch_hf_transformers_utils",
    "sglang.srt.configs.model_config": "gemma4:patch_model_config",
    "sglang.srt.configs.update_config": "gemma4:patch_update_config",
    "sglang.srt.model_executor.model_runner_kv_cache_mixin": "gemma4:patch_kv_cache_mixin",
    "sglang.srt.layers.attention.attention_registry": "gemma4:patch_attention_registry",
    "sglang.srt.layers.moe.fused_moe_triton.fused_moe_triton_config": "moe:patch_fused_moe_config",
    "sglang.srt.model_loader.loader": "dummy_weights:patch_dummy_loader",
    "sglang.srt.model_executor.cuda_graph_runner": "cuda_graphs:patch_cuda_graph_runner",
    "sglang.srt.layers.attention.triton_backend": "cuda_graphs:patch_triton_backend",
    "sglang.srt.layers.attention.flashinfer_backend": "cuda_graphs:patch_flashinfer_backend",
    "sglang.srt.managers.overlap_utils": "overlap:patch_future_map",
    "sglang.srt.managers.scheduler_output_processor_mixin": "overlap:patch_output_processor",
}


def apply_patch(patch: str, module: ModuleType) -> None:
    """Applies ``patch`` ("<patches module>:<function>") to the SGLang ``module`` it belongs to."""
    module_name, function = patch.split(":")
    getattr(importlib.import_module(f"dflash_sglang.serving.patches.{module_name}"), function)(module)


# ------------------------------------------------------------------------------------------------------
# The import hook.
class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, wrapped: importlib.abc.Loader, patch: str) -> None:
        self._wrapped = wrapped
        self._patch = patch

    def create_module(self, spec):
        return self._wrapped.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._wrapped.exec_module(module)
        apply_patch(self._patch, module)

    def __getattr__(self, name: str):  # get_source, get_code, is_package, ... for tools and tracebacks
        return getattr(self._wrapped, name)


class SGLangPatchFinder(importlib.abc.MetaPathFinder):
    """Finds the SGLang modules named in PATCHES with the other finders and wraps their loaders."""

    def find_spec(self, fullname, path, target=None):
        patch = PATCHES.get(fullname)
        if patch is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _PatchingLoader(spec.loader, patch)
                return spec
        return None


def install_import_hook() -> None:
    """Called by dflash_sglang_hook.pth at start-up; also patches modules already imported."""
    from dflash_sglang.core.config import hook_disabled

    if hook_disabled():
        return
    if not any(isinstance(finder, SGLangPatchFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, SGLangPatchFinder())
    for name, patch in PATCHES.items():
        module = sys.modules.get(name)
        if module is not None:
            apply_patch(patch, module)
