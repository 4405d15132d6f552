# SPDX-License-Identifier: Apache-2.0
"""SGLang's torch_native attention backend (the CPU's), patched: ``TorchNativeAttnBackend.forward_extend`` and
``forward_decode``. This module owns

* DFLASH's TARGET_VERIFY block passes without a tree mask (:func:`block_attention_cpu`: one SDPA call over the
  blocks' queries, where upstream loops over requests with the whole context as queries);
* layers with a sliding window (``layer.sliding_window_size`` >= 0), which upstream attends over the whole
  context, and layers whose KV lives in the window-sized half of SGLang's hybrid ``SWAKVPool`` (row
  ``full_to_swa_index_mapping[slot]``), which upstream reads at full slots: :func:`window_attention`, in every
  pass (extend with prefix-cache hits and chunks, decode, both block passes).

Layers without a window over a plain pool run exactly as before: upstream's extend and decode loops, and
:func:`block_attention_cpu`'s unwindowed SDPA.
"""

from __future__ import annotations

from dflash_sglang.serving.patches import patches

MIN_QUERY_TILE, MAX_QUERY_TILE = 16, 256  # query rows per tile of a windowed pass (see _window_inputs)


@patches(lambda module: module.TorchNativeAttnBackend)
def patch_torch_native_backend(backend) -> None:
    """Wraps ``TorchNativeAttnBackend.forward_extend`` and ``forward_decode``.

    TARGET_VERIFY passes without a custom mask (DFLASH's causal chain, and the drafter's non-causal block): SGLang's
    torch_native backend reads ``extend_prefix_lens``/``extend_seq_lens`` and ``seq_lens`` as the total KV
    length, which a TARGET_VERIFY ForwardBatch does not set (there ``seq_lens`` is the committed prefix). On CPU
    tensors these run :func:`block_attention_cpu`; elsewhere, or with ``DFLASH_BLOCK_ATTENTION=off``, the
    lengths are filled in for the extend path below. Tree-masked verification (EAGLE) is left as upstream has it
    (windows ignored).

    Extend and decode: layers with a sliding window or SWA-pooled KV run :func:`window_attention` (upstream
    ignores both); other layers run upstream's loops, unchanged.
    """
    import torch

    from dflash_sglang.core.config import block_attention_mode

    original_forward_extend, original_forward_decode = backend.forward_extend, backend.forward_decode

    def extend(self, q, k, v, layer, forward_batch, save_kv_cache):
        if layer.is_cross_attention or _layer_window(layer, forward_batch.token_to_kv_pool) is None:
            return original_forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache)
        return window_attention(q, k, v, layer, forward_batch, forward_batch.extend_prefix_lens,
                                forward_batch.extend_seq_lens, _is_causal(layer), save_kv_cache)

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        spec_info = forward_batch.spec_info
        if not forward_batch.forward_mode.is_target_verify():
            return extend(self, q, k, v, layer, forward_batch, save_kv_cache)
        if getattr(spec_info, "custom_mask", 0) is not None:
            return original_forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache)
        if (q.device.type == "cpu" and not layer.is_cross_attention and layer.qk_head_dim == layer.v_head_dim
                and block_attention_mode() == "on"):
            return block_attention_cpu(q, k, v, layer, forward_batch, spec_info.draft_token_num, save_kv_cache)
        saved = forward_batch.seq_lens, forward_batch.extend_prefix_lens, forward_batch.extend_seq_lens
        prefix_lens = forward_batch.seq_lens
        forward_batch.extend_prefix_lens = prefix_lens
        forward_batch.extend_seq_lens = torch.full_like(prefix_lens, spec_info.draft_token_num)
        forward_batch.seq_lens = prefix_lens + spec_info.draft_token_num
        try:
            return extend(self, q, k, v, layer, forward_batch, save_kv_cache)
        finally:
            forward_batch.seq_lens, forward_batch.extend_prefix_lens, forward_batch.extend_seq_lens = saved

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        if layer.is_cross_attention or _layer_window(layer, forward_batch.token_to_kv_pool) is None:
            return original_forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache)
        q = q.reshape(-1, layer.tp_q_head_num * layer.qk_head_dim)  # as upstream: torch.compile may give 3-D q
        seq_lens = forward_batch.seq_lens
        return window_attention(q, k, v, layer, forward_batch, seq_lens - 1, torch.ones_like(seq_lens), True,
                                save_kv_cache)

    backend.forward_extend = forward_extend
    backend.forward_decode = forward_decode


def block_attention_cpu(q, k, v, layer, forward_batch, block_size: int, save_kv_cache: bool):
    """Attention of a TARGET_VERIFY pass on the CPU: each request's ``block_size`` queries against its committed
    prefix and its block, in ONE ``scaled_dot_product_attention`` call for the whole batch.

    Upstream's ``_run_sdpa_forward_extend`` pads every request's queries to its whole KV length (prefix + block)
    so that SDPA's square causal mask lines up, and loops over requests: a verify pass then computes
    (prefix + B)^2 scores per head instead of B * (prefix + B), ~20x the work at a 300-token prefix. Here the
    queries stay B per request; the mask (built once per pass and kept on the ForwardBatch, as are the
    gathered KV slots) lets query i of a request see its keys 0 .. prefix + i (causal layers: the target) or
    all prefix + B (``ENCODER_ONLY``: the drafter), and hides the padding of shorter requests. Layers with a
    sliding window or SWA-pooled KV go to :func:`window_attention` (the same pass, bounded by the window).

    Args:
        q: [bs * B, num_heads * head_dim] (or [bs * B, num_heads, head_dim]); k, v: [bs * B, num_kv_heads,
            head_dim], this layer's block K/V, written to the pool at ``out_cache_loc`` first.
    Returns:
        the attention output in q's shape and dtype.
    """
    import torch
    from torch.nn.functional import scaled_dot_product_attention

    pool = forward_batch.token_to_kv_pool
    causal = _is_causal(layer)
    if _layer_window(layer, pool) is not None:
        prefix_lens = forward_batch.seq_lens
        return window_attention(q, k, v, layer, forward_batch, prefix_lens, torch.full_like(prefix_lens, block_size),
                                causal, save_kv_cache)
    if save_kv_cache:
        pool.set_kv_buffer(layer, forward_batch.out_cache_loc, k, v)
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


def window_attention(q, k, v, layer, forward_batch, prefix_lens, query_lens, causal: bool, save_kv_cache: bool):
    """Attention of a layer with a sliding window (``layer.sliding_window_size``, SGLang's count: the keys
    before the query), or whose KV is in an ``SWAKVPool``'s window-sized half, in any pass.

    Request r's ``query_lens[r]`` queries (q's rows, requests in batch order) sit at positions ``prefix_lens[r]``
    onwards, and its keys at 0 .. ``prefix_lens[r] + query_lens[r] - 1``. A query at position p sees the keys at
    p - window .. p (causal) or at most ``window`` positions from p on either side (non-causal: ``ENCODER_ONLY``
    layers), as ``ops.reference.block_attention_ref``. Only keys inside some query's window are read (an SWA
    pool's rows before it may be evicted: mapping entry 0), through ``full_to_swa_index_mapping`` for SWA
    layers. Queries go in tiles of up to ``MAX_QUERY_TILE`` rows, each with the keys its rows see, through ONE
    ``scaled_dot_product_attention`` call; the tiles' slots and masks are built once per pass (kept on the
    ForwardBatch) for the layers that share (causal, window, SWA).

    Args:
        q: [num_queries, num_heads * head_dim] (or [num_queries, num_heads, head_dim]); k, v: [num_queries,
            num_kv_heads, head_dim] (v: v_head_dim), written to the pool at ``out_cache_loc`` first.
        prefix_lens, query_lens: [bs] int; ``query_lens`` sums to num_queries.
        causal: whether keys after a query are hidden.
    Returns:
        the attention output: q's shape, or [num_queries, num_heads * v_head_dim] where v_head_dim differs.
    """
    from torch.nn.functional import scaled_dot_product_attention

    pool = forward_batch.token_to_kv_pool
    window, swa = _layer_window(layer, pool)
    if save_kv_cache:
        pool.set_kv_buffer(layer, forward_batch.out_cache_loc, k, v)
    query_rows, valid_rows, key_slots, mask = _window_inputs(forward_batch, prefix_lens, query_lens, causal, window,
                                                             swa)
    num_tiles, width = key_slots.shape
    heads, kv_heads, dim, v_dim = layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim, layer.v_head_dim
    query = q.reshape(-1, heads, dim)
    query = query.view(num_tiles, -1, heads, dim) if query_rows is None else query[query_rows]  # [n, T, H, D]
    key = pool.get_key_buffer(layer.layer_id)[key_slots.view(-1)].view(num_tiles, width, kv_heads, dim)
    value = pool.get_value_buffer(layer.layer_id)[key_slots.view(-1)].view(num_tiles, width, kv_heads, v_dim)
    if key.dtype != query.dtype:  # as upstream: SDPA wants one dtype
        key, value = key.to(query.dtype), value.to(query.dtype)
    out = scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                       attn_mask=mask, scale=layer.scaling, enable_gqa=heads != kv_heads)
    out = out.transpose(1, 2).reshape(-1, heads, v_dim)  # [n * T, H, Dv], tiles in query order
    if valid_rows is not None:
        out = out[valid_rows]
    return out.reshape(q.shape) if v_dim == dim else out.reshape(-1, heads * v_dim)


def _is_causal(layer) -> bool:
    from sglang.srt.layers.radix_attention import AttentionType

    return layer.attn_type != AttentionType.ENCODER_ONLY


def _layer_window(layer, pool) -> tuple[int, bool] | None:
    """(window, whether the layer's KV is SWA-pooled) for a layer :func:`window_attention` serves; None for
    a layer without a window over full slots (upstream's paths)."""
    window = layer.sliding_window_size
    window = window if window is not None and window >= 0 else -1
    swa = getattr(pool, "full_to_swa_index_mapping", None) is not None and _is_swa_layer(pool, layer.layer_id)
    if window < 0 and not swa:
        return None
    if window < 0:
        raise NotImplementedError(
            f"layer {layer.layer_id} keeps its KV in the SWA pool but has no sliding window: its earlier keys may "
            "be evicted; give the layer its window (sliding_window_size), or list it as a full-attention layer")
    return window, swa


def _is_swa_layer(pool, layer_id: int) -> bool:
    from sglang.srt.mem_cache.swa_memory_pool import SWAKVPool

    return isinstance(pool, SWAKVPool) and pool.layers_mapping[layer_id][1]


def _pass_cache(forward_batch) -> dict:
    """Inputs built once per pass and read by every layer, by (causal, window, SWA pool)."""
    cache = getattr(forward_batch, "_dflash_attention_inputs", None)
    if cache is None:
        cache = forward_batch._dflash_attention_inputs = {}
    return cache


def _block_attention_inputs(forward_batch, block_size: int, causal: bool):
    """Per pass (every layer reads the same): the KV slots of each request's prefix + block, [bs, max_len]
    int64 (past a shorter request's length, whatever its ``req_to_token`` row holds: pool slots, masked), and
    the [bs, 1, B, max_len] bool mask (None where nothing is hidden)."""
    import torch

    cache = _pass_cache(forward_batch)
    if (causal, -1, False) in cache:
        return cache[causal, -1, False]
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
    cache[causal, -1, False] = key_slots, mask
    return key_slots, mask


def _window_inputs(forward_batch, prefix_lens, query_lens, causal: bool, window: int, swa: bool):
    """Per pass: the query tiles of :func:`window_attention`. A tile holds up to T consecutive queries of one
    request (positions a .. b - 1) and the keys they see, positions max(0, a - window) .. b - 1 (causal; else up
    to b - 1 + window within the request), so it reads T + window keys at most (2 window non-causal). T is the
    window + 1 within [MIN_QUERY_TILE, MAX_QUERY_TILE] (at most half a tile's scores hidden for windows that
    fit), and at most the longest request's query count (a decode pass: 1, a block pass: B).

    Returns (query_rows, valid_rows, key_slots, mask): query_rows [n, T] int64, q's row of each tile row (a
    padding row repeats its tile's last query), or None where the tiles are q's rows in order; valid_rows
    [n * T] bool, the non-padding rows (None where all are); key_slots [n, K] int64, the keys' rows in the
    layer's buffer (SWA rows where ``swa``; a padding column repeats its tile's last key, so every row read is
    live); mask [n, 1, T, K] bool, None where nothing is hidden.
    """
    import torch

    cache = _pass_cache(forward_batch)
    if (causal, window, swa) in cache:
        return cache[causal, window, swa]
    device = forward_batch.req_pool_indices.device
    prefix = prefix_lens.to(device=device, dtype=torch.int64)
    counts = query_lens.to(device=device, dtype=torch.int64)
    tile = min(max(1, int(counts.max())), max(MIN_QUERY_TILE, min(MAX_QUERY_TILE, window + 1)))
    tiles_per_request = (counts + tile - 1) // tile
    request = torch.repeat_interleave(torch.arange(len(counts), device=device), tiles_per_request)  # [n]
    first_tile = torch.cumsum(tiles_per_request, 0) - tiles_per_request
    offset = (torch.arange(len(request), device=device) - first_tile[request]) * tile  # first query in the request
    query_first = prefix[request] + offset  # positions
    query_end = prefix[request] + torch.minimum(offset + tile, counts[request])
    key_first = (query_first - window).clamp(min=0)
    key_end = query_end if causal else torch.minimum((prefix + counts)[request], query_end + window)
    width = int((key_end - key_first).max())
    rows, columns = torch.arange(tile, device=device), torch.arange(width, device=device)
    query_valid = query_first[:, None] + rows < query_end[:, None]  # [n, T]
    query_positions = torch.minimum(query_first[:, None] + rows, query_end[:, None] - 1)
    key_valid = key_first[:, None] + columns < key_end[:, None]  # [n, K]
    key_positions = torch.minimum(key_first[:, None] + columns, key_end[:, None] - 1)
    distance = query_positions[:, :, None] - key_positions[:, None, :]  # [n, T, K]
    visible = key_valid[:, None, :] & (distance <= window) & (distance >= (0 if causal else -window))
    req_to_token = forward_batch.req_to_token_pool.req_to_token
    key_slots = req_to_token[forward_batch.req_pool_indices[request].to(torch.int64)[:, None], key_positions]
    key_slots = key_slots.to(torch.int64)
    if swa:
        key_slots = forward_batch.token_to_kv_pool.full_to_swa_index_mapping[key_slots].to(torch.int64)
    if bool(query_valid.all()):  # every tile full: tile rows are q's rows in order
        query_rows = valid_rows = None
    else:
        query_start = torch.cumsum(counts, 0) - counts
        query_rows = (query_start - prefix)[request][:, None] + query_positions
        valid_rows = query_valid.view(-1)
    mask = None if bool(visible.all()) else visible[:, None]
    cache[causal, window, swa] = query_rows, valid_rows, key_slots, mask
    return query_rows, valid_rows, key_slots, mask
