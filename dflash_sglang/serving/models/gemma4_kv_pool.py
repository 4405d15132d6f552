# SPDX-License-Identifier: Apache-2.0
"""The Gemma 4 target's KV memory: sliding layers in a window-sized pool, no layer padded to another's shape.

Gemma 4's sliding and full-attention layers differ in KV heads and head size (31B: 16 x 256 sliding,
4 x 512 full; 26B-A4B: 8 x 256 and 2 x 512), and a sliding layer only reads the last ``sliding_window`` tokens
of a request. By default a Gemma 4 target is served as SGLang 0.5.10.post1 serves its own hybrid sliding-window
models (gpt-oss, MiMo-V2-Flash; ``mem_cache/swa_memory_pool.py``): ``patches/gemma4.py`` marks the model config
``is_hybrid_swa`` (with ``is_hybrid_swa_compress``, so each layer type keeps its own shape), and upstream then
builds an ``SWAKVPool`` (full layers: ``full`` slots; sliding layers: ``swa = ratio x full`` slots), the
``SWATokenToKVPoolAllocator`` (a token gets a full slot and a sliding slot, ``full_to_swa_index_mapping``) and
the ``SWARadixCache``. ``ratio`` is ``--swa-full-tokens-ratio``. Sliding slots below a request's window are
freed as it decodes: by upstream for plain decoding, by ``kv_slots.evict_swa_slots`` for DFLASH, whose workers
bypass upstream's decode allocation. The drafter's pool stays indexed by full slots (its layers read the whole
context) and has ``full`` rows.

:func:`split_swa_tokens` is the memory split (upstream's ``_resolve_hybrid_swa_tokens`` plus the drafter's KV,
which a DFLASH server keeps per full slot): it replaces upstream's for Gemma 4.

``--disable-hybrid-swa-memory`` keeps :class:`Gemma4KVPool`: both layer types at their own shapes in one slot
space (``SWAKVPool`` with ``size_swa == size`` and no index mapping), under SGLang's plain allocator and radix
cache.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import torch

from sglang.srt.mem_cache.swa_memory_pool import SWAKVPool

from dflash_sglang.core.config import DFlashDraftConfig
from dflash_sglang.serving.models.gemma4_config import FULL, SLIDING, Gemma4TextConfig

logger = logging.getLogger(__name__)


def uses_layer_type_pool(config) -> bool:
    """Whether a model's KV layers come in two types (an ``SWAKVPool``: the hybrid one or :class:`Gemma4KVPool`): a
    Gemma 4 text config with sliding layers (a Gemma 4 with full-attention layers only has one shape, which
    SGLang's own pool serves)."""
    return isinstance(config, Gemma4TextConfig) and bool(config.layer_ids(SLIDING))


def draft_kv_bytes_per_token(draft: DFlashDraftConfig, element_size: int, tp_size: int) -> int:
    """K + V bytes a DFLASH drafter's pool takes per full slot on one of ``tp_size`` attention ranks."""
    return draft.num_hidden_layers * 2 * max(1, draft.num_key_value_heads // tp_size) * draft.head_dim * element_size


def split_swa_tokens(capacity: int, config: Gemma4TextConfig, element_size: int, tp_size: int, ratio: float,
                     page_size: int, draft_bytes: int = 0) -> tuple[int, int]:
    """(full slots, sliding slots) for memory that holds ``capacity`` tokens at ``kv_bytes_per_token +
    draft_bytes`` each: ``full x (F + ratio x S + D) = capacity x (F + S + D)``, where F and S are the full and
    sliding layers' bytes per token and D the drafter's; ``sliding = ratio x full``; both page-aligned."""
    full_bytes = config.layer_type_kv_bytes(FULL, element_size, tp_size)
    swa_bytes = config.layer_type_kv_bytes(SLIDING, element_size, tp_size)
    memory = capacity * (full_bytes + swa_bytes + draft_bytes)
    full = int(memory / (full_bytes + ratio * swa_bytes + draft_bytes)) // page_size * page_size
    return full, int(full * ratio) // page_size * page_size


@contextlib.contextmanager
def sliding_slots_translated_once(forward_batch) -> Iterator[None]:
    """Within it, every sliding layer of a hybrid pool writes its K/V at one translation of the batch's slots.

    ``SWAKVPool.set_kv_buffer`` translates ``out_cache_loc`` to sliding-pool slots in each sliding layer (a gather
    and an int32 copy: two kernels a layer) unless the pool's ``swa_loc`` is set. SGLang sets it from
    ``ForwardBatch.out_cache_loc_swa`` in eager forwards only (``ModelRunner._forward_raw``); a captured CUDA
    graph (``CudaGraphRunner`` builds no such batch) repeated the translation in all 25 sliding layers of
    Gemma-4-26B-A4B. Entered around the layers of a forward, this sets ``swa_loc`` to the batch's translation
    (computed here, inside the graph when capturing, unless the batch brings it) and restores the pool's previous
    value on exit. A pool without a full-to-sliding mapping (one slot space) or a batch without slots: no-op.
    Under dynamo (SGLang's piecewise CUDA graphs trace the model; their runner sets ``swa_loc`` itself): no-op,
    the allocator's mapping being a ``weakref.proxy`` dynamo cannot inspect."""
    if torch.compiler.is_compiling():
        yield
        return
    pool = forward_batch.token_to_kv_pool
    slots = forward_batch.out_cache_loc
    if not isinstance(pool, SWAKVPool) or pool.full_to_swa_index_mapping is None or slots is None:
        yield
        return
    previous = pool.swa_loc
    translated = forward_batch.out_cache_loc_swa
    pool.set_swa_loc(pool.translate_loc_from_full_to_swa(slots) if translated is None else translated)
    try:
        yield
    finally:
        pool.set_swa_loc(previous)


class Gemma4KVPool(SWAKVPool):
    """``SWAKVPool`` with one slot space: slot ``s`` of a sliding layer is slot ``s`` of a full layer.

    Invariant: ``size_swa == size`` and ``full_to_swa_index_mapping is None``, so ``set_kv_buffer`` writes
    sliding layers at the given slots and translation to SWA slots is the identity.
    """

    def __init__(self, config: Gemma4TextConfig, size: int, page_size: int, dtype: torch.dtype, device: str,
                 tp_size: int, enable_alt_stream: bool = True, enable_kv_cache_copy: bool = False) -> None:
        full_heads, full_dim = config.kv_shape(FULL, tp_size)  # this rank's heads
        swa_heads, swa_dim = config.kv_shape(SLIDING, tp_size)
        super().__init__(size=size, size_swa=size, page_size=page_size, dtype=dtype, head_num=full_heads,
                         head_dim=full_dim, v_head_dim=full_dim, swa_head_num=swa_heads, swa_head_dim=swa_dim,
                         swa_v_head_dim=swa_dim, swa_attention_layer_ids=config.layer_ids(SLIDING),
                         full_attention_layer_ids=config.layer_ids(FULL), enable_kvcache_transpose=False,
                         device=device, enable_alt_stream=enable_alt_stream,
                         enable_kv_cache_copy=enable_kv_cache_copy)

    def translate_loc_from_full_to_swa(self, kv_indices: torch.Tensor) -> torch.Tensor:
        return kv_indices  # one slot space (class invariant)

    def get_cpu_copy(self, indices):
        return {"full": self.full_kv_pool.get_cpu_copy(indices), "swa": self.swa_kv_pool.get_cpu_copy(indices)}

    def load_cpu_copy(self, kv_cache_cpu, indices) -> None:
        self.full_kv_pool.load_cpu_copy(kv_cache_cpu["full"], indices)
        self.swa_kv_pool.load_cpu_copy(kv_cache_cpu["swa"], indices)


def build_pool(config: Gemma4TextConfig, tp_size: int, size: int, *, page_size: int, dtype: torch.dtype, head_num: int,
               head_dim: int, layer_num: int, device: str, enable_memory_saver: bool, start_layer=None,
               end_layer=None, enable_alt_stream: bool = True, enable_kv_cache_copy: bool = False) -> Gemma4KVPool:
    """Takes ``MHATokenToKVPool``'s arguments (as ``ModelRunner._init_pools`` passes them) and builds the
    Gemma 4 pool instead, for one of ``tp_size`` attention ranks; the uniform ``head_num`` / ``head_dim`` are
    ignored (each layer type has its own)."""
    if layer_num != config.num_hidden_layers or start_layer not in (None, 0):
        raise NotImplementedError(f"Gemma 4 KV pool: layers {start_layer}..{end_layer} of "
                                  f"{config.num_hidden_layers}; pipeline parallelism is not supported")
    if enable_memory_saver:
        logger.warning("Gemma 4 KV pool: --enable-memory-saver does not cover it (SGLang's SWAKVPool turns it off)")
    return Gemma4KVPool(config, size, page_size, dtype, device, tp_size, enable_alt_stream, enable_kv_cache_copy)
