# SPDX-License-Identifier: Apache-2.0
"""The only module that patches SGLang: it teaches SGLang 0.5.10.post1 the DFLASH algorithm.

SGLang has no plugin entry point for speculative algorithms and parses arguments before user code runs,
in the launching process and again in its spawned scheduler processes. So ``dflash_sglang_hook.pth``
(installed into site-packages) calls :func:`install_import_hook` at every interpreter start-up; the hook
costs one ``sys.meta_path`` entry and imports nothing. When SGLang later imports one of the modules below,
the hook lets it load and then applies that module's patch, once:

* ``sglang.srt.speculative.spec_info`` -- adds ``SpeculativeAlgorithm.DFLASH`` (replaces nothing; the
  member is added to the enum) and wraps ``SpeculativeAlgorithm.create_worker`` so DFLASH builds
  ``dflash_sglang.worker.DFlashWorker``.
* ``sglang.srt.server_args`` -- appends ``DFLASH`` to the ``--speculative-algorithm`` choices in
  ``ServerArgs.add_cli_args`` and wraps ``ServerArgs._handle_speculative_decoding`` to validate the drafter
  against the target and set DFLASH's defaults (``dflash_sglang.server_defaults``).
* ``sglang.srt.models.registry`` -- registers the models of ``dflash_sglang.models`` (the drafter, and
  targets SGLang lacks) with ``ModelRegistry.register``, as ``SGLANG_EXTERNAL_MODEL_PACKAGE`` would.
* ``sglang.srt.layers.attention.torch_native_backend`` -- wraps ``TorchNativeAttnBackend.forward_extend``
  so the CPU backend can run mask-free TARGET_VERIFY passes (upstream supports them on GPU backends only).
* ``sglang.srt.mem_cache.memory_pool`` -- skips ``MHATokenToKVPool._init_kv_copy_and_warmup`` (a Triton
  warm-up for paged KV moves) on CPU devices, where Triton cannot launch.
* ``sglang.srt.managers.tokenizer_manager`` -- wraps ``TokenizerManager._validate_one_request`` so a
  DFLASH server answers requests for options it does not serve (``request_rules.py``) with HTTP 400.
* ``sglang.srt.utils.hf_transformers_utils`` -- adds the Gemma 4 configs (``models/gemma4_config.py``) to
  ``_CONFIG_REGISTRY`` and transformers' ``AutoConfig``: SGLang's pinned transformers 5.3.0 has no ``gemma4``.
* ``sglang.srt.configs.model_config`` -- wraps ``ModelConfig._derive_model_shapes`` and
  ``ModelConfig.get_total_num_kv_heads`` so a Gemma 4 target is served text-only with a KV pool as wide as
  its widest layer (``gemma4_config.adapt_model_config``); other models are left as they are.
* ``sglang.srt.model_executor.cuda_graph_runner`` -- wraps ``CudaGraphRunner.__init__`` and
  ``CudaGraphRunner.get_spec_info`` so a DFLASH server captures both of its block passes (the target's
  verify, with the drafter's features, and the drafter's pass) at decode batch sizes.
* ``sglang.srt.layers.attention.triton_backend`` -- wraps ``TritonAttnBackend``'s two CUDA-graph
  metadata methods so a TARGET_VERIFY pass without a custom mask (DFLASH's chain) can be captured.
* ``sglang.srt.layers.attention.flashinfer_backend`` -- wraps ``FlashInferAttnBackend.forward_extend`` so
  ``ENCODER_ONLY`` layers (the drafter's) attend non-causally in paged passes, as the triton, fa3 and
  torch_native backends already do.

Set ``DFLASH_SGLANG_DISABLE=1`` to leave SGLang untouched. Other SGLang versions get a clear error.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from types import ModuleType
from typing import Callable

SUPPORTED_SGLANG_VERSIONS = ("0.5.10.post1",)
ALGORITHM = "DFLASH"


class UnsupportedSGLangVersion(RuntimeError):
    pass


def check_sglang_version() -> None:
    from importlib.metadata import version

    found = version("sglang")
    if found not in SUPPORTED_SGLANG_VERSIONS:
        raise UnsupportedSGLangVersion(
            f"dflash-sglang supports SGLang {', '.join(SUPPORTED_SGLANG_VERSIONS)}, but {found} is installed: "
            f"pip install sglang=={SUPPORTED_SGLANG_VERSIONS[-1]}, or set DFLASH_SGLANG_DISABLE=1 to run SGLang "
            "without DFLASH")


# ------------------------------------------------------------------------------------------------------
# Patches, one per SGLang module. Each is idempotent.
def patch_spec_info(module: ModuleType) -> None:
    """Adds SpeculativeAlgorithm.DFLASH and routes it to DFlashWorker."""
    algorithm_enum = module.SpeculativeAlgorithm
    if ALGORITHM in algorithm_enum.__members__:
        return
    check_sglang_version()
    value = max(member.value for member in algorithm_enum) + 1
    member = object.__new__(algorithm_enum)
    member._name_ = ALGORITHM
    member._value_ = value
    member.__objclass__ = algorithm_enum
    algorithm_enum._member_map_[ALGORITHM] = member
    algorithm_enum._value2member_map_[value] = member
    algorithm_enum._member_names_.append(ALGORITHM)
    type.__setattr__(algorithm_enum, ALGORITHM, member)
    algorithm_enum.is_dflash = lambda self: self is member

    original_create_worker = algorithm_enum.create_worker

    def create_worker(self, server_args):
        if self is member:
            from dflash_sglang.worker import DFlashWorker

            return DFlashWorker
        return original_create_worker(self, server_args)

    algorithm_enum.create_worker = create_worker


def patch_server_args(module: ModuleType) -> None:
    """Accepts --speculative-algorithm DFLASH and applies DFLASH's defaults and checks."""
    server_args_cls = module.ServerArgs
    if getattr(server_args_cls, "_dflash_patched", False):
        return
    check_sglang_version()
    original_add_cli_args = server_args_cls.add_cli_args
    original_handle = server_args_cls._handle_speculative_decoding

    def add_cli_args(parser) -> None:
        original_add_cli_args(parser)
        for action in parser._actions:
            if "--speculative-algorithm" in action.option_strings and action.choices is not None:
                if ALGORITHM not in action.choices:
                    action.choices = [*action.choices, ALGORITHM]

    def handle_speculative_decoding(self) -> None:
        if self.speculative_algorithm is not None and self.speculative_algorithm.upper() == ALGORITHM:
            from dflash_sglang.server_defaults import apply_dflash_server_defaults

            self.speculative_algorithm = ALGORITHM
            apply_dflash_server_defaults(self)
        original_handle(self)

    server_args_cls.add_cli_args = staticmethod(add_cli_args)
    server_args_cls._handle_speculative_decoding = handle_speculative_decoding
    server_args_cls._dflash_patched = True


def patch_model_registry(module: ModuleType) -> None:
    """Registers dflash_sglang.models (drafter and extra targets) with SGLang's model registry."""
    registry = module.ModelRegistry
    if getattr(registry, "_dflash_registered", False):
        return
    check_sglang_version()
    registry.register("dflash_sglang.models", overwrite=False)
    registry._dflash_registered = True


def patch_torch_native_backend(module: ModuleType) -> None:
    """Lets ``TorchNativeAttnBackend.forward_extend`` run TARGET_VERIFY passes without a tree mask.

    SGLang's torch_native backend reads ``extend_prefix_lens``/``extend_seq_lens`` and ``seq_lens`` as the
    total KV length, which a TARGET_VERIFY ForwardBatch does not set (there ``seq_lens`` is the committed
    prefix). For verify inputs without a custom mask (DFLASH's causal chain) this fills them in for the
    call; tree-masked verification (EAGLE) is left as upstream has it.
    """
    backend = module.TorchNativeAttnBackend
    if getattr(backend, "_dflash_patched", False):
        return
    original_forward_extend = backend.forward_extend

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        spec_info = forward_batch.spec_info
        if not forward_batch.forward_mode.is_target_verify() or getattr(spec_info, "custom_mask", 0) is not None:
            return original_forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache)
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
    backend._dflash_patched = True


def patch_memory_pool(module: ModuleType) -> None:
    """Skips ``MHATokenToKVPool._init_kv_copy_and_warmup`` on CPU devices.

    SGLang turns the pool's KV-copy kernel on whenever speculative decoding is on and warms it up with a
    Triton launch, which cannot run without a GPU. The copy only moves KV between pages for page sizes > 1,
    which DFLASH does not use; on the GPU nothing changes.
    """
    pool = module.MHATokenToKVPool
    if getattr(pool, "_dflash_patched", False):
        return
    original_init_kv_copy = pool._init_kv_copy_and_warmup

    def init_kv_copy_and_warmup(self) -> None:
        if str(self.device).startswith("cpu"):
            self._kv_copy_config = None
            return
        original_init_kv_copy(self)

    pool._init_kv_copy_and_warmup = init_kv_copy_and_warmup
    pool._dflash_patched = True


def patch_tokenizer_manager(module: ModuleType) -> None:
    """Wraps ``TokenizerManager._validate_one_request`` to refuse options DFLASH does not serve (HTTP 400)."""
    manager = module.TokenizerManager
    if getattr(manager, "_dflash_patched", False):
        return
    original_validate = manager._validate_one_request

    def validate_one_request(self, obj, input_ids):
        original_validate(self, obj, input_ids)
        if self.server_args.speculative_algorithm == ALGORITHM and hasattr(obj, "return_logprob"):
            from dflash_sglang.request_rules import check_request

            check_request(obj.sampling_params, obj.return_logprob, getattr(obj, "custom_logit_processor", None))

    manager._validate_one_request = validate_one_request
    manager._dflash_patched = True


def patch_hf_transformers_utils(module: ModuleType) -> None:
    """Registers the Gemma 4 configs with SGLang's ``_CONFIG_REGISTRY`` and transformers' ``AutoConfig``."""
    registry = module._CONFIG_REGISTRY
    if "gemma4" in registry:
        return
    check_sglang_version()
    from transformers import AutoConfig

    from dflash_sglang.models.gemma4_config import Gemma4Config, Gemma4TextConfig

    for config_cls in (Gemma4Config, Gemma4TextConfig):
        registry[config_cls.model_type] = config_cls
        try:
            AutoConfig.register(config_cls.model_type, config_cls)
        except ValueError:  # a transformers with its own Gemma 4: SGLang's registry (ours) still wins
            pass


def patch_model_config(module: ModuleType) -> None:
    """Adapts ``ModelConfig`` to Gemma 4 targets (text-only, KV pool shape); no-op for other models."""
    model_config_cls = module.ModelConfig
    if getattr(model_config_cls, "_dflash_patched", False):
        return
    check_sglang_version()
    original_derive_shapes = model_config_cls._derive_model_shapes
    original_num_kv_heads = model_config_cls.get_total_num_kv_heads

    def derive_model_shapes(self) -> None:
        original_derive_shapes(self)
        from dflash_sglang.models.gemma4_config import adapt_model_config

        adapt_model_config(self)

    def get_total_num_kv_heads(self) -> int:
        pool_heads = getattr(self.hf_text_config, "kv_pool_num_heads", None)  # Gemma4TextConfig only
        return pool_heads if pool_heads is not None else original_num_kv_heads(self)

    model_config_cls._derive_model_shapes = derive_model_shapes
    model_config_cls.get_total_num_kv_heads = get_total_num_kv_heads
    model_config_cls._dflash_patched = True
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


def _is_dflash(model_runner) -> bool:
    return model_runner.server_args.speculative_algorithm == ALGORITHM


def patch_cuda_graph_runner(module: ModuleType) -> None:
    """CUDA graphs for DFLASH's two block passes (upstream: ``CudaGraphRunner.__init__`` branches on
    ``spec_algorithm.is_eagle() / is_standalone() / is_ngram()``; ``get_spec_info`` builds their inputs)."""
    runner_cls = module.CudaGraphRunner
    if getattr(runner_cls, "_dflash_patched", False):
        return
    original_init = runner_cls.__init__
    original_get_spec_info = runner_cls.get_spec_info

    def __init__(self, model_runner) -> None:
        if not _is_dflash(model_runner):
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
        if not _is_dflash(self.model_runner):
            return original_get_spec_info(self, num_tokens)
        from dflash_sglang.info import DFlashVerifyInput

        return DFlashVerifyInput(None, self.num_tokens_per_bs, self._dflash_hidden_mode)

    runner_cls.__init__ = __init__
    runner_cls.get_spec_info = get_spec_info
    runner_cls._dflash_patched = True


class _WithoutCustomMask:
    """A verify input as TritonAttnBackend's CUDA-graph methods read it, for a chain with no custom mask:
    an empty mask, so the copy into the graph's mask buffer is a no-op."""

    def __init__(self, spec_info) -> None:
        import torch

        self._spec_info = spec_info
        self.custom_mask = torch.empty(0, dtype=torch.bool)

    def __getattr__(self, name: str):
        return getattr(self._spec_info, name)


def patch_triton_backend(module: ModuleType) -> None:
    """Lets ``TritonAttnBackend`` capture and replay TARGET_VERIFY graphs for verify inputs without a custom
    mask: upstream's ``init_forward_metadata_capture_cuda_graph`` / ``..._replay_cuda_graph`` copy
    ``spec_info.custom_mask`` into a buffer (EAGLE trees always have one). With no mask the captured
    attention is the same causal-chain (or ENCODER_ONLY non-causal) kernel as the eager pass."""
    backend = module.TritonAttnBackend
    if getattr(backend, "_dflash_patched", False):
        return
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
    backend._dflash_patched = True


def patch_flashinfer_backend(module: ModuleType) -> None:
    """Makes ``FlashInferAttnBackend.forward_extend`` honour ``AttentionType.ENCODER_ONLY`` in its paged path,
    which upstream runs with ``causal=not layer.is_cross_attention`` (its ragged path already honours it).
    Without this a flashinfer drafter attends causally: outputs stay lossless, acceptance silently drops."""
    backend = module.FlashInferAttnBackend
    if getattr(backend, "_dflash_patched", False):
        return
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
    backend._dflash_patched = True


PATCHES: dict[str, Callable[[ModuleType], None]] = {
    "sglang.srt.speculative.spec_info": patch_spec_info,
    "sglang.srt.server_args": patch_server_args,
    "sglang.srt.models.registry": patch_model_registry,
    "sglang.srt.layers.attention.torch_native_backend": patch_torch_native_backend,
    "sglang.srt.mem_cache.memory_pool": patch_memory_pool,
    "sglang.srt.managers.tokenizer_manager": patch_tokenizer_manager,
    "sglang.srt.utils.hf_transformers_utils": patch_hf_transformers_utils,
    "sglang.srt.configs.model_config": patch_model_config,
    "sglang.srt.model_executor.cuda_graph_runner": patch_cuda_graph_runner,
    "sglang.srt.layers.attention.triton_backend": patch_triton_backend,
    "sglang.srt.layers.attention.flashinfer_backend": patch_flashinfer_backend,
}


# ------------------------------------------------------------------------------------------------------
# The import hook.
class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, wrapped: importlib.abc.Loader, patch: Callable[[ModuleType], None]) -> None:
        self._wrapped = wrapped
        self._patch = patch

    def create_module(self, spec):
        return self._wrapped.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._wrapped.exec_module(module)
        self._patch(module)

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
    from dflash_sglang.config import hook_disabled

    if hook_disabled():
        return
    if not any(isinstance(finder, SGLangPatchFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, SGLangPatchFinder())
    for name, patch in PATCHES.items():
        module = sys.modules.get(name)
        if module is not None:
            patch(module)
