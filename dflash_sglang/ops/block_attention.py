# SPDX-License-Identifier: Apache-2.0
"""Block attention in Triton: the attention of DFLASH's two block passes on SGLang's triton backend.

Each request brings a block of ``B`` query tokens that attend to the request's cached prefix (paged, through
SGLang's ``kv_indptr`` / ``kv_indices``) and to the block's own ``B`` keys: causally in the target's verify
pass, all of them in the drafter's ``ENCODER_ONLY`` layers. Semantics: :func:`block_attention_ref` in
``ops/reference.py``.

Why not SGLang's extend kernel: it runs one program per (request, query head, 128 query rows) that walks the
whole prefix alone. At decode batch sizes that is a few dozen programs for a 132-SM GPU (32 at batch 1 for
Qwen3-8B), each re-reading its KV head's prefix that its GQA siblings also read: 77 us per layer for a
16-token block over a 512-token prefix on an H100, 2.8 ms of a 9.8 ms verify pass. This is flash-decoding
for a block instead:

* ``_partial``: one program per (request, KV head, split). It holds all ``B x G`` query rows of the KV
  head's ``G`` query heads, so every K/V tile it loads serves all of them (one ``tl.dot`` of ``B*G`` rows).
  Split ``s`` takes the ``s``-th contiguous slice of the prefix; split 0 also takes the block's own keys
  (with the causal mask), so it always holds keys. It loads them before its prefix loop and attends to them
  after it, so the extra tile adds no memory latency to the longest program. With one split (large batches)
  the program writes the output itself; otherwise each live split writes its normalized partial output and
  log-sum-exp (fp32). The prefix loop keeps three K/V tiles in flight where shared memory allows.
* ``_merge``: one program per (request, KV head, 8 query rows) combines the partials of the live splits by their
  log-sum-exp. Partials are written and merged for the KV head's real rows only. (One program per (request, KV
  head) took 12 us per layer at batch 1 on the H100, more than ``_partial``'s 7 us: 8 programs each reading 17
  partials.) Where a KV head has at most 8 real rows (decode: the group's query heads), the merge would be one
  program per KV head anyway, so the last of its splits to finish merges instead (``MERGE_IN_LAST``): each split
  counts itself in at a per-(request, KV head) counter after its stores, and the one that makes the count
  whole reads the others' partials, writes the output and resets the counter to 0. One launch and one
  dependent round trip less per layer.

Gemma-style layers: a sliding ``window`` (SGLang's convention: a query sees the ``window`` keys before it and
itself; non-causal rows also only the ``window`` keys after it) bounds each row's keys, and the prefix loop
starts at the first key the block's first row sees, so a windowed layer reads at most ``window`` prefix keys
whatever the context length. Slot translation: SGLang's ``SWAKVPool`` keeps the sliding layers' K/V in a
window-sized pool, so an optional ``kv_slot_map`` (``full_to_swa_index_mapping``) gives the cache row of each
listed full-pool slot; positions and the window still count by listing offset. The map is read under the K/V
loads' mask, only for the keys the prefix loop loads, so the entries of keys evicted from the window (0, a row
that may hold anything) are never used. Row chunks: a program holds at most ``MAX_TILE_ELEMENTS`` query-row x
head-dim accumulator entries, so wide heads (512) or large groups split a KV head's ``B x G`` rows over several
programs (each re-reads the KV head's keys, mostly from L2).

The split count ``S`` depends only on the batch size and head count (so a CUDA graph captures a fixed grid)
and is a runtime argument (one compiled kernel for every batch size above one split); the prefix slice of
each split is computed on the device from the live prefix length. A partial is ``B*G x head_dim`` fp32
(32 KB for Qwen3-8B), as much as 64 prefix keys of the KV head, so ``S`` stays at two waves of programs or
fewer: at 32 requests over 512-token prefixes the partials' traffic, not the KV's, set the time.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dflash_sglang.ops import _device

LOG2E = 1.4426950408889634
MAX_SPLITS = 16
MERGE_ROWS = 8  # query rows per merge program: at batch 1, 8 KV heads x 8 row groups of a 64-row block
MERGE_COUNTERS = 1 << 16  # split counters allocated at once per device: batch x KV-head units of any graph
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256, 512)
MAX_TILE_ELEMENTS = 64 * 256  # query rows x head dims per program: a [64, 256] fp32 accumulator over 8 warps
STAGE_MARGIN_BYTES = 32 * 1024  # shared memory kept for the score tile and the compiler's scratch
NO_WINDOW = -1


def prefix_tile(head_dim: int) -> int:
    """Prefix keys per K/V tile: 64, or 32 for 512-wide heads (a 64-key bf16 K and V tile pair is 128 KB)."""
    return 32 if head_dim > 256 else 64


def row_tile(block_size: int, group: int, block_d: int) -> int:
    """Query rows per program: the KV head's ``block_size x group`` rows (a power of two, at least 16), capped
    so the fp32 accumulator holds at most ``MAX_TILE_ELEMENTS``."""
    return max(16, min(triton.next_power_of_2(block_size * group), MAX_TILE_ELEMENTS // block_d))


@triton.jit
def _split_size(length, num_splits, BLOCK_N: tl.constexpr):
    """Prefix keys per split: an even share of ``length``, rounded up to whole tiles (at least one tile)."""
    return tl.maximum(((length + num_splits - 1) // num_splits + BLOCK_N - 1) // BLOCK_N * BLOCK_N, BLOCK_N)


@triton.jit
def _prefix_start(length, window, HAS_WINDOW: tl.constexpr):
    """The first prefix key the block's first row sees: ``length - window`` under a window, else 0."""
    if HAS_WINDOW:
        return tl.maximum(length - window, 0)
    return 0


@triton.jit
def _prefix_length(kv_indptr, req, start, BLOCK_SIZE: tl.constexpr, LISTED_BLOCK: tl.constexpr):
    """The prefix keys of request ``req``: its listing, less the block's own ``BLOCK_SIZE`` keys at the listing's
    end where the listing holds them (``LISTED_BLOCK``: SGLang's decode listing ends with the token decoded)."""
    length = tl.load(kv_indptr + req + 1) - start
    if LISTED_BLOCK:
        length -= BLOCK_SIZE
    return length


@triton.jit
def _store_rows(O, values, req, kv_head, rows, dims, stride_o_tok, stride_o_head,
                BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Writes rows (token * GROUP + query head in the group) of a KV head's output in O's dtype."""
    token = rows // GROUP
    o_offsets = (req * BLOCK_SIZE + token)[:, None] * stride_o_tok \
        + (kv_head * GROUP + rows % GROUP)[:, None] * stride_o_head + dims[None, :]
    tl.store(O + o_offsets, values.to(O.dtype.element_ty),
             mask=(rows < BLOCK_SIZE * GROUP)[:, None] & (dims < HEAD_DIM)[None, :])


@triton.jit
def _attend_tile(q, k, v, visible, m_i, l_i, acc, qk_scale):
    """One online-softmax step: the rows of ``q`` attend to the ``visible`` keys of one K/V tile; returns the
    updated running max (log2 domain), normalizer and unnormalized output."""
    s = tl.where(visible, tl.dot(q, tl.trans(k)) * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_base = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen no key yet (windows) stays 0
    alpha = tl.exp2(m_i - m_base)
    p = tl.exp2(s - m_base[:, None])
    return m_new, l_i * alpha + tl.sum(p, 1), acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)


@triton.jit
def _live_count(keys, per_split, num_splits):
    """Splits that hold prefix keys, of ``keys`` keys at ``per_split`` a split (split 0 always: it holds the block's
    keys)."""
    return tl.minimum(num_splits, tl.cdiv(keys, per_split))


@triton.jit
def _live_splits(kv_indptr, req, num_splits, window, BLOCK_SIZE: tl.constexpr, HAS_WINDOW: tl.constexpr,
                 LISTED_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr):
    """:func:`_live_count` of request ``req``, from its listing."""
    length = _prefix_length(kv_indptr, req, tl.load(kv_indptr + req), BLOCK_SIZE, LISTED_BLOCK)
    keys = length - _prefix_start(length, window, HAS_WINDOW)
    return _live_count(keys, _split_size(keys, num_splits, BLOCK_N), num_splits)


@triton.jit
def _merge_split(O_part, Lse_part, part, local_rows, rows_ok, dims, m_i, l_i, acc, BLOCK_M: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    """Folds split partial ``part`` into the running max (log2), normalizer and output of the rows."""
    lse = tl.load(Lse_part + part * BLOCK_M + local_rows, mask=rows_ok, other=float("-inf"), cache_modifier=".cg")
    out = tl.load(O_part + part * BLOCK_M * BLOCK_D + local_rows[:, None] * BLOCK_D + dims[None, :],
                  mask=rows_ok[:, None], other=0.0, cache_modifier=".cg")
    m_new = tl.maximum(m_i, lse)
    alpha = tl.exp2(m_i - m_new)
    weight = tl.exp2(lse - m_new)
    return m_new, l_i * alpha + weight, acc * alpha[:, None] + out * weight[:, None]


@triton.jit
def _merged_rows(O_part, Lse_part, first, live_splits, local_rows, rows_ok, dims, ROWS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, UNROLLED_SPLITS: tl.constexpr):
    """The output of rows ``local_rows`` of one (request, unit): the partials of splits ``first`` onwards
    combined by their log-sum-exp. Loads bypass L1 (``.cg``): other programs wrote them during this launch.
    ``UNROLLED_SPLITS`` > 0: the loop over splits unrolled to that many steps (masked past ``live_splits``), so
    that its loads issue together (few rows: a few registers each); 0: a loop over the live splits."""
    # Split 0 holds the block's keys (each row sees its own): its log-sum-exp is finite for every row, so no
    # -inf - -inf below; a later split a row saw nothing of (or a masked one) has lse -inf: weight 0.
    m_i = tl.load(Lse_part + first * BLOCK_M + local_rows, mask=rows_ok, other=0.0, cache_modifier=".cg")
    l_i = tl.full([ROWS], 1.0, tl.float32)
    acc = tl.load(O_part + first * BLOCK_M * BLOCK_D + local_rows[:, None] * BLOCK_D + dims[None, :],
                  mask=rows_ok[:, None], other=0.0, cache_modifier=".cg")
    if UNROLLED_SPLITS > 0:
        for split in tl.static_range(1, UNROLLED_SPLITS):
            m_i, l_i, acc = _merge_split(O_part, Lse_part, first + split, local_rows, rows_ok & (split < live_splits),
                                         dims, m_i, l_i, acc, BLOCK_M, BLOCK_D)
    else:
        for split in range(1, live_splits):  # the splits past the prefix's end wrote nothing
            m_i, l_i, acc = _merge_split(O_part, Lse_part, first + split, local_rows, rows_ok, dims, m_i, l_i, acc,
                                         BLOCK_M, BLOCK_D)
    return acc / l_i[:, None]


@triton.jit(do_not_specialize=["num_splits", "window"])
def _partial(Q, K_block, V_block, K_cache, V_cache, kv_indptr, kv_indices, kv_slot_map, O_part, Lse_part, O,
             Split_counters, qk_scale, num_splits, window, stride_q_tok, stride_q_head, stride_kb_tok, stride_kb_head,
             stride_vb_tok, stride_vb_head, stride_kc_slot, stride_kc_head, stride_vc_slot, stride_vc_head,
             stride_o_tok, stride_o_head, BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
             CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SLOT_MAP: tl.constexpr, LISTED_BLOCK: tl.constexpr,
             ROW_CHUNKS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_KB: tl.constexpr, DIRECT: tl.constexpr, MERGE_IN_LAST: tl.constexpr, FOLD_ROWS: tl.constexpr,
             FOLD_SPLITS: tl.constexpr):
    req = tl.program_id(0)
    unit = tl.program_id(1)  # (KV head, chunk of its query rows)
    kv_head = unit // ROW_CHUNKS
    split = tl.program_id(2)
    num_units = tl.num_programs(1)

    start = tl.load(kv_indptr + req)
    length = _prefix_length(kv_indptr, req, start, BLOCK_SIZE, LISTED_BLOCK)
    first = _prefix_start(length, window, HAS_WINDOW)
    per_split = _split_size(length - first, num_splits, BLOCK_N)
    lo = first + split * per_split
    hi = tl.minimum(lo + per_split, length)
    live = (split == 0) | (lo < length)  # a split past the prefix's end has no keys and writes nothing

    local_rows = tl.arange(0, BLOCK_M)
    rows = (unit % ROW_CHUNKS) * BLOCK_M + local_rows  # row = token * GROUP + (query head within the group)
    token = rows // GROUP
    row_ok = rows < BLOCK_SIZE * GROUP
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    q_offsets = (req * BLOCK_SIZE + token)[:, None] * stride_q_tok \
        + (kv_head * GROUP + rows % GROUP)[:, None] * stride_q_head + dims[None, :]
    q = tl.load(Q + q_offsets, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)

    # Split 0 also attends to the block's own keys. Their loads are issued before the prefix loop and used after
    # it, so their latency hides behind the loop instead of lengthening split 0, the longest program.
    block_cols = tl.arange(0, BLOCK_KB)
    block_ok = (block_cols < BLOCK_SIZE)[:, None] & dim_ok[None, :] & (split == 0)
    block_tok = req * BLOCK_SIZE + block_cols
    k_block = tl.load(K_block + block_tok[:, None] * stride_kb_tok + kv_head * stride_kb_head + dims[None, :],
                      mask=block_ok, other=0.0)
    v_block = tl.load(V_block + block_tok[:, None] * stride_vb_tok + kv_head * stride_vb_head + dims[None, :],
                      mask=block_ok, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < hi
        slots = tl.load(kv_indices + start + cols, mask=col_ok, other=0).to(tl.int64)
        if HAS_SLOT_MAP:  # the listing holds full-pool slots; this cache is indexed by their mapped rows
            slots = tl.load(kv_slot_map + slots, mask=col_ok, other=0).to(tl.int64)
        tile_ok = col_ok[:, None] & dim_ok[None, :]
        k = tl.load(K_cache + slots[:, None] * stride_kc_slot + kv_head * stride_kc_head + dims[None, :],
                    mask=tile_ok, other=0.0)
        v = tl.load(V_cache + slots[:, None] * stride_vc_slot + kv_head * stride_vc_head + dims[None, :],
                    mask=tile_ok, other=0.0)
        visible = col_ok[None, :]
        if HAS_WINDOW:  # key c is window keys or fewer before row token's query (at position length + token)
            visible = visible & (cols[None, :] + window >= length + token[:, None])
        m_i, l_i, acc = _attend_tile(q, k, v, visible, m_i, l_i, acc, qk_scale)
    if split == 0:  # each row sees its own key: m_i is finite after this even with no prefix
        visible = (block_cols < BLOCK_SIZE)[None, :]
        if CAUSAL:
            visible = visible & (block_cols[None, :] <= token[:, None])
        if HAS_WINDOW:
            distance = token[:, None] - block_cols[None, :]
            visible = visible & (distance <= window) & (-distance <= window)
        m_i, l_i, acc = _attend_tile(q, k_block, v_block, visible, m_i, l_i, acc, qk_scale)

    if DIRECT:  # one split: this program saw every key
        _store_rows(O, acc / l_i[:, None], req, kv_head, rows, dims, stride_o_tok, stride_o_head,
                    BLOCK_SIZE, GROUP, HEAD_DIM)
    else:
        part = (req * num_units + unit) * num_splits + split
        seen = live & (l_i > 0)  # under a window a split may hold no key a row sees: lse -inf, output 0
        l_safe = tl.where(seen, l_i, 1.0)
        # only the KV head's real rows: at decode 2 of a 16-row tile for Gemma-4-26B-A4B's sliding layers
        tl.store(O_part + part * BLOCK_M * BLOCK_D + local_rows[:, None] * BLOCK_D + dims[None, :],
                 acc / l_safe[:, None], mask=live & row_ok[:, None])
        tl.store(Lse_part + part * BLOCK_M + local_rows, tl.where(seen, m_i + tl.log2(l_safe), float("-inf")),
                 mask=live & row_ok)
        if MERGE_IN_LAST:  # every split counts in, live or not; the last one to do so merges
            counter = Split_counters + req * num_units + unit
            tl.debug_barrier()  # all of this program's stores issued before the release below
            if tl.atomic_add(counter, 1, sem="acq_rel") == num_splits - 1:
                tl.store(counter, 0)  # at rest for the next launch (kernel boundaries order it)
                live_splits = _live_count(length - first, per_split, num_splits)
                fold_rows = tl.arange(0, FOLD_ROWS)  # the unit's real rows (its only row chunk)
                merged = _merged_rows(O_part, Lse_part, part - split, live_splits, fold_rows,
                                      fold_rows < BLOCK_SIZE * GROUP, dims, FOLD_ROWS, BLOCK_M, BLOCK_D, FOLD_SPLITS)
                _store_rows(O, merged, req, kv_head, fold_rows, dims, stride_o_tok, stride_o_head,
                            BLOCK_SIZE, GROUP, HEAD_DIM)


@triton.jit(do_not_specialize=["num_splits", "window"])
def _merge(O_part, Lse_part, O, kv_indptr, num_splits, window, stride_o_tok, stride_o_head,
           BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_WINDOW: tl.constexpr,
           LISTED_BLOCK: tl.constexpr, ROW_CHUNKS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
           BLOCK_N: tl.constexpr, MERGE_ROWS: tl.constexpr):
    req = tl.program_id(0)
    unit = tl.program_id(1)
    kv_head = unit // ROW_CHUNKS
    num_units = tl.num_programs(1)
    local_rows = tl.program_id(2) * MERGE_ROWS + tl.arange(0, MERGE_ROWS)
    rows = (unit % ROW_CHUNKS) * BLOCK_M + local_rows
    dims = tl.arange(0, BLOCK_D)
    live_splits = _live_splits(kv_indptr, req, num_splits, window, BLOCK_SIZE, HAS_WINDOW, LISTED_BLOCK, BLOCK_N)
    merged = _merged_rows(O_part, Lse_part, (req * num_units + unit) * num_splits, live_splits, local_rows,
                          rows < BLOCK_SIZE * GROUP, dims, MERGE_ROWS, BLOCK_M, BLOCK_D, 0)
    _store_rows(O, merged, req, kv_head, rows, dims, stride_o_tok, stride_o_head, BLOCK_SIZE, GROUP, HEAD_DIM)


def partial_warps(block_m: int, block_d: int) -> int:
    """Warps of a ``_partial`` program: 8 for a [BLOCK_M, BLOCK_D] fp32 accumulator of ``MAX_TILE_ELEMENTS``
    (fewer would spill), else 4."""
    return 8 if block_m * block_d >= MAX_TILE_ELEMENTS else 4


def pipeline_stages(block_d: int, itemsize: int, shared_memory: int) -> int:
    """K/V tiles in flight in ``_partial``'s prefix loop: 3 where the device's shared memory holds three K and
    V tile pairs plus a margin for the kernel's other buffers, else 2. (In CUDA graphs on an H200, Qwen3-8B
    heads, 3 stages against 2 took 10-26% off every shape in ``bench_block_attention.py --graph``.)"""
    tile_pair = 2 * prefix_tile(block_d) * block_d * itemsize
    return 3 if 3 * tile_pair + STAGE_MARGIN_BYTES <= shared_memory else 2


def split_count(batch_size: int, num_kv_heads: int, num_sms: int) -> int:
    """Prefix splits per (request, KV head): at most two waves of programs over the GPU's SMs (measured in
    CUDA graphs on an H200, Qwen3-8B heads: the best of 1-16 splits, or within 1% of it, at 1, 8 and 32
    requests over 512- and 4096-token prefixes)."""
    return max(1, min(MAX_SPLITS, 2 * num_sms // (batch_size * num_kv_heads)))


_split_counters: dict[torch.device, list[torch.Tensor]] = {}


def split_counters(device: torch.device, count: int) -> torch.Tensor:
    """``count`` zeroed int32 counters on ``device`` for ``_partial``'s last-split merge; each launch leaves them
    at 0. One buffer serves every call (kernels on a stream run one after another; CUDA graphs keep the address
    they captured), so it is allocated once, ``MERGE_COUNTERS`` wide, and never freed: a graph may hold it."""
    buffers = _split_counters.setdefault(device, [])
    if not buffers or buffers[-1].numel() < count:
        buffers.append(torch.zeros(max(count, MERGE_COUNTERS), dtype=torch.int32, device=device))
    return buffers[-1]


def _check_slot_map(kv_slot_map, device: torch.device) -> None:
    if not isinstance(kv_slot_map, torch.Tensor):
        raise TypeError(f"block_attention: kv_slot_map must be a tensor (SGLang's full_to_swa_index_mapping) or "
                        f"None, got {type(kv_slot_map).__name__}")
    if kv_slot_map.device != device:
        raise ValueError(f"block_attention: kv_slot_map is on {kv_slot_map.device} but kv_indices is on {device}: "
                         "move it there")
    if kv_slot_map.dim() != 1 or kv_slot_map.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"block_attention: kv_slot_map must be a 1-D int32/int64 tensor [full_slots], got "
                         f"{kv_slot_map.dtype} of shape {tuple(kv_slot_map.shape)}")
    if kv_slot_map.stride(0) != 1:
        raise ValueError("block_attention: kv_slot_map must be contiguous: pass kv_slot_map.contiguous()")


def block_attention(q: torch.Tensor, k_block: torch.Tensor, v_block: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, kv_indptr: torch.Tensor, kv_indices: torch.Tensor, *, block_size: int,
                    causal: bool, sm_scale: float, window: int = NO_WINDOW, out: torch.Tensor | None = None,
                    splits: int | None = None, kv_slot_map: torch.Tensor | None = None,
                    listed_block: bool = False) -> torch.Tensor:
    """Attention of ``bs`` blocks of ``block_size`` query tokens; see ``block_attention_ref`` for the shapes.

    ``q`` [bs * B, Hq, D] and ``k_block``, ``v_block`` [bs * B, Hkv, D] may be strided views (unit stride in
    the last dim); ``k_cache``, ``v_cache`` [slots, Hkv, D]; ``kv_indptr`` [bs + 1] int32 and ``kv_indices``
    (int32/int64) list each request's prefix slots (under a ``window``, its last keys at least). ``window``:
    keys a query sees on each side of it (SGLang's ``sliding_window_size``), -1 for all. ``splits``: prefix
    splits per (request, KV head), by default :func:`split_count` for this device. ``kv_slot_map``
    [full_slots] int32/int64 (contiguous): the listed key at ``kv_indices[j]`` is cache row
    ``kv_slot_map[kv_indices[j]]`` (SGLang's full-to-SWA slot translation); read only for the keys the kernel
    loads, those the block's first row sees onwards. None: the listing holds cache rows. ``listed_block``: each
    request's listing ends with its block's ``block_size`` keys (as SGLang's decode listing ends with the token
    being decoded, written to the cache before attention); the kernel reads the prefix before them from the cache
    and the block's keys from ``k_block`` / ``v_block``. Returns ``out`` (or a new tensor) [bs * B, Hq, D].
    """
    batch_size = kv_indptr.numel() - 1
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_block.shape[1]
    group = num_heads // num_kv_heads
    if num_tokens != batch_size * block_size or num_heads != group * num_kv_heads:
        raise ValueError(f"block_attention: q {tuple(q.shape)} is not {batch_size} blocks of {block_size} tokens "
                         f"with a multiple of {num_kv_heads} KV heads")
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"block_attention: head_dim {head_dim} not in {SUPPORTED_HEAD_DIMS}")
    for name, tensor in (("q", q), ("k_block", k_block), ("v_block", v_block), ("k_cache", k_cache),
                         ("v_cache", v_cache)):
        if tensor.stride(-1) != 1:
            raise ValueError(f"block_attention: {name} needs unit stride in its last dim")
    if kv_slot_map is not None:
        _check_slot_map(kv_slot_map, kv_indices.device)
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    block_d = triton.next_power_of_2(head_dim)
    block_m = row_tile(block_size, group, block_d)
    row_chunks = triton.cdiv(block_size * group, block_m)
    units = num_kv_heads * row_chunks
    splits = splits or split_count(batch_size, units, _device.num_sms(q.device))
    if not 1 <= splits <= MAX_SPLITS:
        raise ValueError(f"block_attention: splits must be in 1..{MAX_SPLITS}, got {splits}")
    direct = splits == 1
    parts = 0 if direct else batch_size * units * splits
    unit_rows = min(block_m, block_size * group)  # a unit's real rows: only they have partials
    merge_in_last = not direct and unit_rows <= MERGE_ROWS
    counters = split_counters(q.device, batch_size * units) if merge_in_last else None
    o_part = torch.empty(parts, block_m, block_d, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(parts, block_m, dtype=torch.float32, device=q.device)
    has_window = window is not None and window >= 0
    shape = dict(BLOCK_SIZE=block_size, GROUP=group, HEAD_DIM=head_dim, HAS_WINDOW=has_window,
                 LISTED_BLOCK=listed_block, ROW_CHUNKS=row_chunks, BLOCK_M=block_m, BLOCK_D=block_d,
                 BLOCK_N=prefix_tile(block_d))
    window_arg = window if has_window else 0
    num_warps = partial_warps(block_m, block_d)
    num_stages = pipeline_stages(block_d, q.element_size(), _device.shared_memory_per_block(q.device))
    # No map: None specializes the pointer away, so the kernel is the unmapped one, argument for argument.
    _partial[(batch_size, units, splits)](
        q, k_block, v_block, k_cache, v_cache, kv_indptr, kv_indices, kv_slot_map, o_part, lse_part, out, counters,
        sm_scale * LOG2E, splits, window_arg, q.stride(0), q.stride(1), k_block.stride(0), k_block.stride(1),
        v_block.stride(0), v_block.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0),
        v_cache.stride(1), out.stride(0), out.stride(1), CAUSAL=causal, HAS_SLOT_MAP=kv_slot_map is not None,
        BLOCK_KB=max(16, triton.next_power_of_2(block_size)), DIRECT=direct, MERGE_IN_LAST=merge_in_last,
        FOLD_ROWS=triton.next_power_of_2(unit_rows), FOLD_SPLITS=MAX_SPLITS, **shape, num_warps=num_warps,
        num_stages=num_stages)
    if not direct and not merge_in_last:  # merge programs for a unit's real rows only
        merge_rows = min(MERGE_ROWS, triton.next_power_of_2(unit_rows))
        _merge[(batch_size, units, triton.cdiv(unit_rows, merge_rows))](
            o_part, lse_part, out, kv_indptr, splits, window_arg, out.stride(0), out.stride(1), **shape,
            MERGE_ROWS=merge_rows, num_warps=4)
    return out
