# SPDX-License-Identifier: Apache-2.0
"""Gemma 4 targets under SGLang's pinned transformers 5.3.0: the configs registered with SGLang and
transformers, ``ModelConfig`` serving a Gemma 4 text-only with its KV shapes per layer type
(``models/gemma4_config.py``) as a hybrid sliding-window model (``models/gemma4_kv_pool.py``: upstream's
``SWAKVPool``, or with ``--disable-hybrid-swa-memory`` our ``Gemma4KVPool``), the pools sized by what each layer
type and the DFLASH drafter really take, and the triton backend's decode buffers sized for the widest layer.
Other models are left as they are."""

from __future__ import annotations

import contextlib
import functools
import logging

from dflash_sglang.serving.patches import patches

logger = logging.getLogger(__name__)

# Target attention backends that read each layer's shape from the layer and the pool (checked on CPU / GPU).
LAYER_TYPE_POOL_BACKENDS = ("triton", "torch_native")


@patches(lambda module: module)
def patch_hf_transformers_utils(module) -> None:
    """Registers the Gemma 4 configs with SGLang's ``_CONFIG_REGISTRY`` and transformers' ``AutoConfig``."""
    from transformers import AutoConfig

    from dflash_sglang.serving.models.gemma4_config import Gemma4Config, Gemma4TextConfig

    for config_cls in (Gemma4Config, Gemma4TextConfig):
        module._CONFIG_REGISTRY[config_cls.model_type] = config_cls
        try:
            AutoConfig.register(config_cls.model_type, config_cls)
        except ValueError:  # a transformers with its own Gemma 4: SGLang's registry (ours) still wins
            pass


@patches(lambda module: module.ModelConfig)
def patch_model_config(model_config_cls) -> None:
    """Wraps ``ModelConfig._derive_model_shapes``, ``ModelConfig.get_total_num_kv_heads`` (a Gemma 4's
    full-attention layers' KV heads; the sliding layers' are ``get_swa_num_kv_heads``) and
    ``ModelConfig._derive_hybrid_model``: a Gemma 4 with sliding layers is a hybrid sliding-window model, whose
    two layer types keep their own shapes (``is_hybrid_swa_compress``), unless ``--disable-hybrid-swa-memory``
    (upstream decides by a fixed list of architectures)."""
    original_derive_shapes = model_config_cls._derive_model_shapes
    original_num_kv_heads = model_config_cls.get_total_num_kv_heads
    original_derive_hybrid = model_config_cls._derive_hybrid_model

    def derive_hybrid_model(self) -> None:
        original_derive_hybrid(self)
        from dflash_sglang.serving.models.gemma4_config import FULL, SLIDING
        from dflash_sglang.serving.models.gemma4_kv_pool import uses_layer_type_pool

        text = self.hf_text_config
        if uses_layer_type_pool(text) and not self.disable_hybrid_swa_memory:
            self.is_hybrid_swa = self.is_hybrid_swa_compress = True
            self.swa_attention_layer_ids, self.full_attention_layer_ids = text.layer_ids(SLIDING), text.layer_ids(FULL)

    def derive_model_shapes(self) -> None:
        original_derive_shapes(self)
        from dflash_sglang.serving.models.gemma4_config import adapt_model_config

        adapt_model_config(self)

    def get_total_num_kv_heads(self) -> int:
        from dflash_sglang.serving.models.gemma4_config import FULL, Gemma4TextConfig

        if isinstance(self.hf_text_config, Gemma4TextConfig):
            return self.hf_text_config.kv_shape(FULL)[0]
        return original_num_kv_heads(self)

    model_config_cls._derive_model_shapes = derive_model_shapes
    model_config_cls.get_total_num_kv_heads = get_total_num_kv_heads
    model_config_cls._derive_hybrid_model = derive_hybrid_model


@patches(lambda module: module)
def patch_update_config(module) -> None:
    """Wraps ``adjust_config_with_unaligned_cpu_tp`` (``configs/update_config.py``), which SGLang's ModelRunner runs
    on CPU devices: where the KV heads do not divide by ``--tp-size`` it pads the config's KV heads and query heads
    (and pads the MLP sizes). For a Gemma 4 it would read the full-attention layers' KV heads alone (26B-A4B: 2, so
    8 query heads become 32 at TP 4) and rewrite ``num_attention_heads`` for every layer; Gemma 4 instead splits its
    heads as on the GPU (``QKVParallelLinear`` replicates KV heads that are fewer than the ranks, and
    ``gemma4_config.check_servable`` refuses sizes that do not divide), so its config is left as written. Any
    other model is adjusted as upstream."""
    original_adjust = module.adjust_config_with_unaligned_cpu_tp

    def adjust_config_with_unaligned_cpu_tp(model_config, load_config, tp_size):
        from dflash_sglang.serving.models.gemma4_config import Gemma4TextConfig

        if isinstance(model_config.hf_text_config, Gemma4TextConfig):
            return model_config
        return original_adjust(model_config, load_config, tp_size)

    module.adjust_config_with_unaligned_cpu_tp = adjust_config_with_unaligned_cpu_tp


@patches(lambda module: module)
def patch_kv_cache_mixin(module) -> None:
    """Wraps three ``ModelRunnerKVCacheMixin`` methods for a Gemma 4 target with sliding layers:

    * ``get_cell_size_per_token`` (the bytes per token that ``profile_max_num_token`` divides the free memory
      by): the sum over layers at each layer's shape (upstream's uniform ``heads x (head_dim + v_head_dim) x
      layers`` counts every layer at the full layers' shape), plus a DFLASH drafter's KV per token;
    * ``_resolve_hybrid_swa_tokens`` (the split into full and sliding slots): ``gemma4_kv_pool.split_swa_tokens``,
      which also keeps the drafter's pool (one row per full slot) inside the profiled memory;
    * ``_init_pools``: the hybrid pool as upstream builds it, checked; with ``--disable-hybrid-swa-memory`` the
      pool built through ``MHATokenToKVPool`` is a ``Gemma4KVPool`` instead (allocator, radix cache and
      everything else as upstream)."""
    mixin = module.ModelRunnerKVCacheMixin
    original_cell_size = mixin.get_cell_size_per_token
    original_resolve_swa = mixin._resolve_hybrid_swa_tokens
    original_init_pools = mixin._init_pools

    def get_cell_size_per_token(self, num_layers: int) -> int:
        from dflash_sglang.serving.models.gemma4_kv_pool import uses_layer_type_pool

        config = self.model_config.hf_text_config
        if self.use_mla_backend or not uses_layer_type_pool(config):
            return original_cell_size(self, num_layers)
        # per attention-TP rank, as upstream counts its heads (the mixin module's get_attention_tp_size)
        element_size = _element_size(self.kv_cache_dtype)
        return config.kv_bytes_per_token(element_size, module.get_attention_tp_size()) + _draft_bytes(self, module)

    def resolve_hybrid_swa_tokens(self, token_capacity: int) -> tuple[int, int, int]:
        from dflash_sglang.serving.models.gemma4_kv_pool import split_swa_tokens, uses_layer_type_pool

        config = self.model_config.hf_text_config
        if not uses_layer_type_pool(config):
            return original_resolve_swa(self, token_capacity)
        ratio = self.server_args.swa_full_tokens_ratio
        full, swa = split_swa_tokens(token_capacity, config, _element_size(self.kv_cache_dtype),
                                     module.get_attention_tp_size(), ratio, self.server_args.page_size,
                                     _draft_bytes(self, module))
        logger.info("Gemma 4 KV pool: %d full slots, %d sliding slots (--swa-full-tokens-ratio %s), sliding "
                    "window %s", full, swa, ratio, self.sliding_window_size)
        return full, full, swa

    def init_pools(self) -> None:
        from sglang.srt.mem_cache.swa_memory_pool import SWAKVPool

        from dflash_sglang.serving.models.gemma4_config import FULL, SLIDING
        from dflash_sglang.serving.models.gemma4_kv_pool import Gemma4KVPool, build_pool, uses_layer_type_pool

        config = self.model_config.hf_text_config
        if not uses_layer_type_pool(config):
            return original_init_pools(self)
        _check_layer_type_pool_options(self)
        if self.is_hybrid_swa:
            original_init_pools(self)
            expected = "SGLang's SWAKVPool"
            built = type(self.token_to_kv_pool) is SWAKVPool
        else:
            with _replaced(module, "MHATokenToKVPool", functools.partial(build_pool, config,
                                                                         module.get_attention_tp_size())):
                original_init_pools(self)
            expected, built = "its per-layer-type KV pool", isinstance(self.token_to_kv_pool, Gemma4KVPool)
        if not built:
            raise NotImplementedError(f"Gemma 4 needs {expected}, but these server options built a "
                                      f"{type(self.token_to_kv_pool).__name__} (fp4 KV cache, double sparsity "
                                      "and NPU pools are not supported for Gemma 4)")
        pool = self.token_to_kv_pool
        logger.info("Gemma 4 KV pool: sliding layers %s: %d x %d, %d slots; full layers %s: %d x %d, %d slots; "
                    "K+V %.2f GB", config.layer_ids(SLIDING), pool.swa_kv_pool.head_num, pool.swa_kv_pool.head_dim,
                    pool.size_swa, config.layer_ids(FULL), pool.full_kv_pool.head_num, pool.full_kv_pool.head_dim,
                    pool.size, pool.mem_usage)

    mixin.get_cell_size_per_token = get_cell_size_per_token
    mixin._resolve_hybrid_swa_tokens = resolve_hybrid_swa_tokens
    mixin._init_pools = init_pools


def _element_size(dtype) -> int:
    import torch

    return torch._utils._element_size(dtype)


def _draft_bytes(runner, module) -> int:
    """The DFLASH drafter's KV bytes per full slot when ``runner`` is a DFLASH target's, else 0."""
    server_args = runner.server_args
    if runner.is_draft_worker or server_args.speculative_algorithm != "DFLASH":
        return 0
    from dflash_sglang.serving.models.gemma4_kv_pool import draft_kv_bytes_per_token
    from dflash_sglang.serving.server_defaults import load_draft_config

    return draft_kv_bytes_per_token(load_draft_config(server_args), _element_size(runner.kv_cache_dtype),
                                    module.get_attention_tp_size())


def _check_layer_type_pool_options(runner) -> None:
    server_args = runner.server_args
    for option, used in (("--enable-hierarchical-cache", server_args.enable_hierarchical_cache),
                         ("--disaggregation-mode", server_args.disaggregation_mode != "null")):
        if used:
            raise NotImplementedError(f"Gemma 4 with {option}: its host / transfer KV buffers assume one KV shape "
                                      "for all layers, and Gemma 4 keeps one per layer type")
    if runner.is_draft_worker and server_args.speculative_draft_attention_backend:
        backends = {server_args.speculative_draft_attention_backend}
    else:
        backends = set(server_args.get_attention_backends())
    unsupported = sorted(backends - set(LAYER_TYPE_POOL_BACKENDS))
    if unsupported:
        raise NotImplementedError(
            f"Gemma 4 with attention backend {', '.join(unsupported)}: its sliding and full-attention layers have "
            f"their own KV head counts and head sizes (up to 512), which the {'/'.join(LAYER_TYPE_POOL_BACKENDS)} "
            "backends read per layer; pass --attention-backend triton (GPU) or torch_native (CPU)")


@contextlib.contextmanager
def _replaced(module, name: str, value):
    """``module.<name> = value`` for the duration (the scheduler process builds its pools on one thread)."""
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)


@patches(lambda module: module)
def patch_attention_registry(module) -> None:
    """Wraps the ``"triton"`` entry of ``ATTENTION_BACKENDS``:

    * over a Gemma 4 target's ``SWAKVPool`` it builds a ``TritonAttnBackend`` whose decode partials fit every
      layer. Upstream sizes them ``[tokens, heads, kv_splits, v_head_dim]`` with layer 0's ``v_head_dim`` (a
      sliding layer, 256: too small for the 512 of full layers), and its decode kernels locate a split's
      log-sum-exp by dividing the partials' strides by the layer's ``v_head_dim``, so each layer gets a
      contiguous view of exactly its width over a buffer sized for the widest;
    * for a DFLASH drafter, whose pool is indexed by the target's full slots but which shares the target's
      allocator, the backend gets no allocator: upstream translates a sliding layer's window listing into
      sliding-pool slots whenever its allocator can (``update_sliding_window_buffer``), which over the
      drafter's pool would read the wrong keys."""
    original_create = module.ATTENTION_BACKENDS["triton"]

    def create_triton_backend(runner):
        from sglang.srt.mem_cache.swa_memory_pool import SWAKVPool

        from dflash_sglang.serving.models.gemma4_kv_pool import uses_layer_type_pool

        pool = runner.token_to_kv_pool
        if (isinstance(pool, SWAKVPool) and uses_layer_type_pool(runner.model_config.hf_text_config)
                and not runner.server_args.enable_double_sparsity):
            return _layer_type_triton_backend()(runner)
        backend = original_create(runner)
        if runner.is_draft_worker and not isinstance(pool, SWAKVPool):
            backend.token_to_kv_pool_allocator = None
        return backend

    module.ATTENTION_BACKENDS["triton"] = create_triton_backend


@functools.cache
def _layer_type_triton_backend():
    from sglang.srt.layers.attention.triton_backend import TritonAttnBackend

    class LayerTypeTritonAttnBackend(TritonAttnBackend):
        """``TritonAttnBackend`` over a Gemma 4 ``SWAKVPool`` (see ``patch_attention_registry``)."""

        def __init__(self, model_runner, *args, **kwargs) -> None:
            super().__init__(model_runner, *args, **kwargs)
            pool = model_runner.token_to_kv_pool
            self.v_head_dim = max(pool.full_kv_pool.v_head_dim, pool.swa_kv_pool.v_head_dim)  # sizes the partials

        def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, sinks=None):
            metadata = self.forward_metadata
            partials = metadata.attn_logits  # [tokens, heads, kv_splits, max v_head_dim] fp32, contiguous
            if partials.shape[-1] == layer.v_head_dim:
                return super().forward_decode(q, k, v, layer, forward_batch, save_kv_cache, sinks)
            rows = partials.numel() // partials.shape[-1]
            metadata.attn_logits = partials.view(-1)[:rows * layer.v_head_dim].view(*partials.shape[:-1], -1)
            try:
                return super().forward_decode(q, k, v, layer, forward_batch, save_kv_cache, sinks)
            finally:
                metadata.attn_logits = partials

    return LayerTypeTritonAttnBackend
