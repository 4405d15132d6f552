# SPDX-License-Identifier: Apache-2.0
"""The Gemma 4 target's KV pool: every layer at its own shape, in SGLang's ``SWAKVPool``.

Gemma 4's sliding and full-attention layers differ in KV heads and head size (31B: 16 x 256 sliding,
4 x 512 full; 26B-A4B: 8 x 256 and 2 x 512). SGLang 0.5.10.post1's ``SWAKVPool``
(``mem_cache/swa_memory_pool.py``) already keeps two ``MHATokenToKVPool`` sub-pools, one per layer type, each
with its own ``head_num`` / ``head_dim`` / ``v_head_dim`` (upstream passes ``swa_head_num``, ``swa_head_dim``,
``swa_v_head_dim`` for ``is_hybrid_swa_compress`` models, MiMo-V2-Flash), and routes ``get_key_buffer`` /
``get_value_buffer`` / ``set_kv_buffer`` by layer id. :class:`Gemma4KVPool` uses it with both sub-pools at the
same size and the SAME slot indices (no full-to-SWA index mapping): the model runner keeps its plain
``TokenToKVPoolAllocator`` and radix cache, and every other user of slot indices (the DFLASH worker, the
drafter's pool, the attention backends' ``req_to_token`` gathers) is unchanged. Layer ``i``'s buffers are
``[size + page_size, kv_heads(i), head_dim(i)]``.

Not done yet: sliding layers in a window-sized sub-pool. SGLang turns that on for its hybrid-SWA models
(``ModelConfig.is_hybrid_swa``: gpt-oss, Llama 4, MiMo-V2-Flash, Step-3.5; Gemma 2/3 have it switched off in
``ServerArgs``): ``SWATokenToKVPoolAllocator`` gives each token a full slot and a SWA slot
(``full_to_swa_index_mapping``), ``SWARadixCache`` keeps tombstones for evicted SWA KV, and
``ScheduleBatch._evict_swa`` frees a running request's SWA slots below ``seq_len - window``; the pool split is
``--swa-full-tokens-ratio`` (SWA slots / full slots, default 0.8). For Gemma 4 with DFLASH that needs:

1. config: ``is_hybrid_swa`` and the two layer-id lists set in ``ModelConfig._derive_hybrid_model`` (an
   architecture list upstream), ``is_hybrid_swa_compress`` so ``_init_pools`` passes the sliding shapes, read
   from ``hf_text_config.swa_head_dim`` / ``swa_v_head_dim`` / ``v_head_dim`` (Gemma4TextConfig's ``head_dim``
   is the sliding one: these need the two shapes apart); this module's pool and cell size then go away;
2. workers: allocation (``alloc_token_slots``) and ``free`` of block slots already go through the allocator
   and so through both slot spaces; what is missing is eviction: SGLang evicts in ``alloc_for_decode``, which
   DFLASH's workers bypass, so each step must call ``batch._evict_swa(req, committed_len)`` (v1) or, under the
   overlap scheduler, evict below the host's lagging committed length minus the window (the step in flight
   reads keys at or above the device's length minus the window, and freed SWA slots are rewritten only by
   later steps on the same stream). The drafter's pool stays indexed by full slots (its layers attend the
   whole context), at ``max_total_num_tokens`` full slots;
3. attention: sliding layers must read SWA slots: upstream triton builds translated
   ``window_kv_indptr`` / ``window_kv_indices`` (``update_sliding_window_buffer``), so the block kernel's
   sliding-layer path must read those (not ``kv_indices``) eagerly and in its CUDA-graph replay; writes are
   translated by ``SWAKVPool.set_kv_buffer`` (``ForwardBatch.out_cache_loc_swa``, or a gather through the
   mapping inside graphs captured while ``swa_loc`` is still None); torch_native (CPU) translates nothing and
   ignores windows, so it needs a patch that reads each sliding layer's last ``window`` tokens through the
   mapping;
4. tests: lossless DFLASH vs plain decoding past the window (prompts > 1024 tokens) on the GPU, and radix-cache
   hits on evicted prefixes. At ``--swa-full-tokens-ratio`` r the 31B takes 81920 + r x 819200 bytes per full
   slot (bf16), e.g. r = 0.1: 5.5x the tokens of this pool.
"""

from __future__ import annotations

import logging

import torch

from sglang.srt.mem_cache.swa_memory_pool import SWAKVPool

from dflash_sglang.serving.models.gemma4_config import FULL, SLIDING, Gemma4TextConfig

logger = logging.getLogger(__name__)


def uses_layer_type_pool(config) -> bool:
    """Whether a model's KV pool is a :class:`Gemma4KVPool`: a Gemma 4 text config with sliding layers
    (a Gemma 4 with full-attention layers only has one shape, which SGLang's own pool serves)."""
    return isinstance(config, Gemma4TextConfig) and bool(config.layer_ids(SLIDING))


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
        logger.info("Gemma 4 KV pool: %d tokens; sliding layers %s: %d x %d; full layers %s: %d x %d; K+V %.2f GB",
                    size, config.layer_ids(SLIDING), swa_heads, swa_dim, config.layer_ids(FULL), full_heads,
                    full_dim, self.mem_usage)

    @property
    def max_v_head_dim(self) -> int:
        return max(self.full_kv_pool.v_head_dim, self.swa_kv_pool.v_head_dim)

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
