# SPDX-License-Identifier: Apache-2.0
"""block_attention: the reference pinned by closed-form cases and an independent SDPA oracle (CPU), then the
Triton kernel against the reference on random paged inputs: on the GPU where there is one, else on the CPU
through Triton's interpreter (float16 only: the interpreter has no bfloat16 dot). The interpreter must be on
before Triton is first imported, so on a CPU machine ``test_kernel_in_triton_interpreter`` runs this module's
kernel tests in a child pytest with ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

from types import ModuleType

import pytest
import torch

from child_pytest import CUDA, triton_interpreter_rerun, triton_kernel_device

from dflash_sglang.ops.reference import block_attention_ref

DEVICE = "cuda" if CUDA else "cpu"


def _inputs(lengths: list[int], block_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
            dtype: torch.dtype, device: str = "cpu", seed: int = 0) -> dict:
    """Random q (as a strided view of a fused qkv, as SGLang passes it), block K/V, a paged cache whose
    prefixes sit at shuffled slots, and the kv_indptr / kv_indices that list them."""
    generator = torch.Generator().manual_seed(seed)
    num_slots = sum(lengths) + 64
    tokens = len(lengths) * block_size
    qkv = torch.randn(tokens, num_heads + 2 * num_kv_heads, head_dim, generator=generator).to(dtype).to(device)
    kv_indptr = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    kv_indptr[1:] = torch.tensor(lengths).cumsum(0)
    return {
        "q": qkv[:, :num_heads], "k_block": qkv[:, num_heads:num_heads + num_kv_heads],
        "v_block": qkv[:, num_heads + num_kv_heads:],
        "k_cache": torch.randn(num_slots, num_kv_heads, head_dim, generator=generator).to(dtype).to(device),
        "v_cache": torch.randn(num_slots, num_kv_heads, head_dim, generator=generator).to(dtype).to(device),
        "kv_indptr": kv_indptr.to(device),
        "kv_indices": torch.randperm(num_slots, generator=generator)[:int(kv_indptr[-1])].to(device),
        "block_size": block_size, "sm_scale": head_dim ** -0.5,
    }


def _swa_pool(args: dict, window: int, map_dtype: torch.dtype, seed: int = 0) -> dict:
    """``args`` with the cache moved into a sliding-window sub-pool as SGLang's ``SWAKVPool`` keeps it:
    ``kv_indices`` still list full-pool slots, ``kv_slot_map`` gives each one's row in a smaller pool of shuffled
    rows. Under a ``window`` the keys before each request's window are evicted (map entry 0). Every pool row no
    live key owns, row 0 included, holds NaN: a kernel that reads one writes NaN."""
    device = args["k_cache"].device
    indptr, listed = args["kv_indptr"].cpu().tolist(), args["kv_indices"].cpu().long()
    firsts = [start + max(end - start - window, 0) if window >= 0 else start  # a request's first live key
              for start, end in zip(indptr[:-1], indptr[1:])]
    live = torch.cat([listed[first:end] for first, end in zip(firsts, indptr[1:])])
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randperm(len(live) + 8, generator=generator)[:len(live)] + 1  # a pool with spare rows past 0
    slot_map = torch.zeros(args["k_cache"].shape[0], dtype=map_dtype)
    slot_map[live] = rows.to(map_dtype)
    pool = {}
    for name in ("k_cache", "v_cache"):
        cache = args[name].cpu()
        pool[name] = torch.full((len(live) + 9, *cache.shape[1:]), float("nan"), dtype=cache.dtype)
        pool[name][rows] = cache[live]
    return {**args, "k_cache": pool["k_cache"].to(device), "v_cache": pool["v_cache"].to(device),
            "kv_slot_map": slot_map.to(device)}


def _on_cpu(args: dict) -> dict:
    return {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in args.items()}


# ------------------------------------------------------------------------------------------------------
# Reference pins (CPU).


def test_ref_zero_queries_average_the_visible_values():
    """q = 0 gives uniform attention: each output is the mean of the values the row may see. Causal row t sees
    the prefix and block keys 0..t; non-causal rows see all of them."""
    args = _inputs([3, 0], block_size=4, num_heads=2, num_kv_heads=1, head_dim=64, dtype=torch.float32)
    args["q"] = torch.zeros_like(args["q"])
    for causal in (True, False):
        out = block_attention_ref(**args, causal=causal)
        for request, prefix_len in enumerate([3, 0]):
            start = int(args["kv_indptr"][request])
            prefix = args["v_cache"][args["kv_indices"][start:start + prefix_len], 0]
            block = args["v_block"][request * 4:(request + 1) * 4, 0]
            for t in range(4):
                visible = torch.cat([prefix, block[:t + 1] if causal else block])
                for head in range(2):  # both query heads read KV head 0
                    torch.testing.assert_close(out[request * 4 + t, head], visible.mean(0))


def test_ref_window_bounds_each_row_to_its_last_keys():
    """q = 0 under a window of 2 (SGLang's count: the two keys before a query, and itself): causal row t of a
    block after a 5-key prefix sits at position 5 + t and averages the values at positions 3 + t .. 5 + t;
    a non-causal row also sees the two block keys after it."""
    args = _inputs([5], block_size=4, num_heads=1, num_kv_heads=1, head_dim=64, dtype=torch.float32)
    args["q"] = torch.zeros_like(args["q"])
    values = torch.cat([args["v_cache"][args["kv_indices"][:5], 0], args["v_block"][:, 0]])  # by position
    for causal in (True, False):
        out = block_attention_ref(**args, causal=causal, window=2)
        for t in range(4):
            last = 5 + t if causal else min(5 + t + 2, 8)
            torch.testing.assert_close(out[t, 0], values[3 + t:last + 1].mean(0))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [-1, 3, 20])
def test_ref_matches_sdpa(causal, window):
    lengths, block, heads, kv_heads = [5, 0, 17], 8, 8, 2
    args = _inputs(lengths, block, heads, kv_heads, head_dim=64, dtype=torch.float32, seed=1)
    out = block_attention_ref(**args, causal=causal, window=window)
    for request, prefix_len in enumerate(lengths):
        start = int(args["kv_indptr"][request])
        rows = slice(request * block, (request + 1) * block)
        slots = args["kv_indices"][start:start + prefix_len]
        keys = torch.cat([args["k_cache"][slots], args["k_block"][rows]]).transpose(0, 1)  # [Hkv, S, D]
        values = torch.cat([args["v_cache"][slots], args["v_block"][rows]]).transpose(0, 1)
        mask = torch.ones(block, prefix_len + block, dtype=torch.bool)
        if causal:
            mask[:, prefix_len:] = torch.ones(block, block, dtype=torch.bool).tril()
        if window >= 0:  # transformers' sliding window of window + 1 positions (the query's own included)
            mask &= torch.ones_like(mask).tril(prefix_len + window).triu(prefix_len - window)
        expected = torch.nn.functional.scaled_dot_product_attention(
            args["q"][rows].transpose(0, 1), keys, values, attn_mask=mask, enable_gqa=True)
        torch.testing.assert_close(out[rows], expected.transpose(0, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [-1, 3, 20])
@pytest.mark.parametrize("map_dtype", [torch.int32, torch.int64], ids=str)
def test_ref_slot_map_reads_the_mapped_rows(causal, window, map_dtype):
    """Through ``kv_slot_map`` over a shuffled sub-pool the reference gives exactly what it gives on the full
    cache: same keys, same positions, same window; the evicted keys' entries (0, a NaN row) are never read."""
    args = _inputs([5, 0, 17], 8, 8, 2, head_dim=64, dtype=torch.float32, seed=2)
    mapped = _swa_pool(args, window, map_dtype, seed=3)
    if window == 3:  # 17 - 3 keys of the last request evicted
        assert (mapped["kv_slot_map"][args["kv_indices"][5:5 + 14]] == 0).all()
    expected = block_attention_ref(**args, causal=causal, window=window)
    out = block_attention_ref(**mapped, causal=causal, window=window)
    assert torch.equal(out, expected)


# ------------------------------------------------------------------------------------------------------
# The kernel against the reference.


@pytest.fixture(scope="module")
def kernels() -> ModuleType:
    """``ops.block_attention``, compiled for the GPU or run by Triton's interpreter."""
    triton_kernel_device()
    pytest.importorskip("triton")
    from dflash_sglang.ops import block_attention

    return block_attention


test_kernel_in_triton_interpreter = triton_interpreter_rerun(__file__)


DTYPES = [torch.float16, torch.bfloat16] if CUDA else [torch.float16]
# (prefix lengths, block size, query heads, KV heads, head_dim): GQA groups 1-8, blocks 5-16, empty and
# multi-tile prefixes, a batch wider than the split count.
CASES = [
    ([150], 16, 32, 8, 128),
    ([0, 70, 129], 16, 4, 2, 64),
    ([33, 1], 8, 2, 2, 64),
    ([200], 5, 8, 1, 128),
    ([64, 65], 16, 2, 1, 256),
    ([40, 0], 16, 16, 2, 512),  # Gemma 4 global layers (GQA 8:1, 512-wide heads): 4 row chunks per KV head
    ([70, 3], 16, 4, 1, 32),  # the golden fixtures' narrow heads (tl.dot's smallest K is 16)
]
if CUDA:
    CASES += [([513] * 8, 16, 32, 8, 128), (list(range(0, 3000, 97)), 16, 32, 8, 128), ([4097], 16, 64, 8, 128),
              ([700, 3], 16, 32, 16, 256), ([1500] * 3, 16, 32, 4, 512)]
# (prefix lengths, block size, query heads, KV heads, head_dim, window): windows shorter than the prefix, than
# the block, and longer than both.
WINDOW_CASES = [
    ([150, 9, 0], 16, 4, 2, 64, 40),
    ([70], 8, 2, 1, 128, 3),
    ([33, 100], 16, 4, 1, 512, 50),
]
if CUDA:
    WINDOW_CASES += [([3000, 1100, 1024, 17], 16, 32, 16, 256, 1023), ([2500], 16, 32, 16, 512, 1023)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"bs{len(c[0])}-B{c[1]}-h{c[2]}-kv{c[3]}-d{c[4]}")
@pytest.mark.parametrize("splits", [None, 1, 3, 16])
def test_kernel_matches_reference(kernels, case, causal, dtype, splits):
    lengths, block, heads, kv_heads, head_dim = case
    args = _inputs(lengths, block, heads, kv_heads, head_dim, dtype, device=DEVICE, seed=len(lengths) + head_dim)
    out = kernels.block_attention(**args, causal=causal, splits=splits)
    expected = block_attention_ref(**{k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in args.items()},
                                   causal=causal)
    assert out.shape == expected.shape and out.dtype == dtype
    tolerance = 2e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(out.cpu(), expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("case", WINDOW_CASES,
                         ids=lambda c: f"bs{len(c[0])}-B{c[1]}-h{c[2]}-kv{c[3]}-d{c[4]}-w{c[5]}")
@pytest.mark.parametrize("splits", [None, 1, 5])
def test_kernel_matches_reference_under_a_window(kernels, case, causal, dtype, splits):
    lengths, block, heads, kv_heads, head_dim, window = case
    args = _inputs(lengths, block, heads, kv_heads, head_dim, dtype, device=DEVICE, seed=window)
    out = kernels.block_attention(**args, causal=causal, window=window, splits=splits)
    expected = block_attention_ref(**{k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in args.items()},
                                   causal=causal, window=window)
    tolerance = 2e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(out.cpu(), expected, rtol=tolerance, atol=tolerance)


# (prefix lengths, block size, query heads, KV heads, head_dim, window) for a sliding-window sub-pool: windows
# shorter than a prefix (its earlier keys evicted), none (a shuffled pool); GQA and wide heads on the GPU.
SLOT_MAP_CASES = [
    ([150, 9, 0], 16, 4, 2, 64, 40),
    ([70, 5], 8, 2, 1, 128, -1),
    ([60], 4, 2, 1, 256, 20),
]
if CUDA:
    SLOT_MAP_CASES += [([150], 16, 32, 8, 128, -1), ([40, 0], 16, 16, 2, 512, -1),
                       ([3000, 1100, 1024, 17], 16, 32, 16, 256, 1023), ([2500], 16, 32, 16, 512, 1023)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("case", SLOT_MAP_CASES,
                         ids=lambda c: f"bs{len(c[0])}-B{c[1]}-h{c[2]}-kv{c[3]}-d{c[4]}-w{c[5]}")
@pytest.mark.parametrize(("splits", "map_dtype"), [(1, torch.int64), (3, torch.int32)], ids=["s1-i64", "s3-i32"])
def test_kernel_matches_reference_through_a_slot_map(kernels, case, causal, dtype, splits, map_dtype):
    """With ``kv_slot_map`` over a sub-pool whose unowned rows (row 0, where evicted keys point) are NaN: the
    reference's output, and bit for bit the kernel's own on the full cache (same keys in the same order)."""
    lengths, block, heads, kv_heads, head_dim, window = case
    args = _inputs(lengths, block, heads, kv_heads, head_dim, dtype, device=DEVICE, seed=head_dim + 1)
    mapped = _swa_pool(args, window, map_dtype, seed=len(lengths))
    out = kernels.block_attention(**mapped, causal=causal, window=window, splits=splits)
    expected = block_attention_ref(**_on_cpu(mapped), causal=causal, window=window)
    assert not expected.isnan().any()
    tolerance = 2e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(out.cpu(), expected, rtol=tolerance, atol=tolerance)
    assert torch.equal(out, kernels.block_attention(**args, causal=causal, window=window, splits=splits))


def _with_listed_block(args: dict) -> dict:
    """``args`` as SGLang's decode lists a batch: each request's block K/V written to the cache at fresh slots that
    end its listing (``listed_block``)."""
    block, indptr = args["block_size"], args["kv_indptr"].cpu().tolist()
    k_cache, v_cache, listed = args["k_cache"].cpu(), args["v_cache"].cpu(), args["kv_indices"].cpu().long()
    fresh = torch.arange(k_cache.shape[0], k_cache.shape[0] + (len(indptr) - 1) * block)
    indices = torch.cat([torch.cat([listed[start:end], fresh[r * block:(r + 1) * block]])
                         for r, (start, end) in enumerate(zip(indptr[:-1], indptr[1:]))])
    device = args["k_cache"].device
    return {**args, "k_cache": torch.cat([k_cache, args["k_block"].cpu()]).to(device),
            "v_cache": torch.cat([v_cache, args["v_block"].cpu()]).to(device),
            "kv_indptr": (args["kv_indptr"].cpu() + block * torch.arange(len(indptr), dtype=torch.int32)).to(device),
            "kv_indices": indices.to(device)}


# (prefix lengths, block size, query heads, KV heads, head_dim, window): decode (blocks of one token) on Gemma 4's
# layer types, and a 16-token block.
LISTED_CASES = [
    ([150, 9, 0], 1, 4, 2, 64, 40),
    ([70, 3], 1, 16, 2, 512, -1),
    ([33, 100], 16, 4, 1, 128, 50),
    ([24, 3], 1, 4, 2, 16, 7),  # the golden fixtures' sliding layers: a window of 8, heads 16 wide
    ([90, 40], 1, 2, 2, 64, -1),  # one query row per KV head: one-row partials and merges
]
if CUDA:
    LISTED_CASES += [([512], 1, 16, 8, 256, 1023), ([512] * 8, 1, 16, 2, 512, -1), ([3000, 5], 1, 32, 16, 256, 1023)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", LISTED_CASES,
                         ids=lambda c: f"bs{len(c[0])}-B{c[1]}-h{c[2]}-kv{c[3]}-d{c[4]}-w{c[5]}")
@pytest.mark.parametrize("slot_map", [False, True], ids=["cache", "swa-pool"])
@pytest.mark.parametrize("splits", [None, 4])
def test_kernel_reads_a_listing_that_ends_with_the_block(kernels, case, dtype, slot_map, splits):
    """``listed_block``: the listing holds the block's keys last (SGLang's decode listing); the output is the
    reference's over the prefix before them, through a sliding sub-pool too (keys before the decoded token's window
    evicted to NaN rows). Split decodes merge in their last split: its counters are back at 0 after each call."""
    lengths, block, heads, kv_heads, head_dim, window = case
    args = _inputs(lengths, block, heads, kv_heads, head_dim, dtype, device=DEVICE, seed=head_dim + block)
    listed = _with_listed_block(args)
    if slot_map:
        listed = _swa_pool(listed, window + block if window >= 0 else -1, torch.int32)
    out = kernels.block_attention(**listed, causal=True, window=window, listed_block=True, splits=splits)
    expected = block_attention_ref(**_on_cpu(args), causal=True, window=window)
    tolerance = 2e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(out.cpu(), expected, rtol=tolerance, atol=tolerance)
    counters = kernels.split_counters(out.device, 1)
    assert counters.count_nonzero().item() == 0


def test_row_tiles_cap_the_accumulator():
    kernels = pytest.importorskip("dflash_sglang.ops.block_attention")
    assert kernels.row_tile(16, 4, 128) == 64  # Qwen3-8B: one program holds the KV head's 64 rows
    assert kernels.row_tile(16, 2, 256) == 32  # Gemma 4 sliding layers
    assert kernels.row_tile(16, 8, 512) == 32  # Gemma 4 global layers: 128 rows in 4 chunks
    assert kernels.row_tile(5, 1, 64) == 16
    assert kernels.prefix_tile(512) == 32 and kernels.prefix_tile(256) == 64


def test_kernel_writes_into_out_and_leaves_nothing_else(kernels):
    """``out`` given: every element written (poisoned first), and the inputs untouched."""
    args = _inputs([40, 3], 8, 4, 2, 64, torch.float16, device=DEVICE)
    before = {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor)}
    out = torch.full((16, 4, 64), float("nan"), dtype=torch.float16, device=DEVICE)
    assert kernels.block_attention(**args, causal=True, out=out) is out
    assert not out.isnan().any()
    for name, tensor in before.items():
        assert torch.equal(args[name], tensor), name


def test_kernel_rejects_shapes_it_does_not_cover(kernels):
    args = _inputs([4], 8, 4, 2, 64, torch.float16, device=DEVICE)
    with pytest.raises(ValueError, match="is not 1 blocks of 16 tokens"):
        kernels.block_attention(**{**args, "block_size": 16}, causal=True)
    args = _inputs([4], 8, 4, 2, 48, torch.float16, device=DEVICE)
    with pytest.raises(ValueError, match="head_dim 48"):
        kernels.block_attention(**args, causal=True)
    args = _inputs([40], 1, 4, 2, 64, torch.float16, device=DEVICE)
    with pytest.raises(ValueError, match="splits must be in 1..16, got 17"):  # the last-split merge unrolls 16
        kernels.block_attention(**args, causal=True, splits=17)


def test_slot_map_arguments_are_checked():
    """A bad ``kv_slot_map`` is refused before any launch (CPU too), with a message naming it and the fix."""
    kernels = pytest.importorskip("dflash_sglang.ops.block_attention")
    args = _inputs([4], 8, 4, 2, 64, torch.float16)
    good = torch.arange(args["k_cache"].shape[0])
    bad = [(good.tolist(), TypeError, "kv_slot_map must be a tensor"),
           (good.to("meta"), ValueError, "kv_slot_map is on meta but kv_indices is on cpu"),
           (good[None], ValueError, r"kv_slot_map must be a 1-D int32/int64 tensor .* shape \(1, 68\)"),
           (good.float(), ValueError, "kv_slot_map must be a 1-D int32/int64 tensor .* got torch.float32"),
           (good.repeat(2)[::2], ValueError, r"kv_slot_map must be contiguous: pass kv_slot_map.contiguous\(\)")]
    for slot_map, error, message in bad:
        with pytest.raises(error, match=message):
            kernels.block_attention(**args, causal=True, kv_slot_map=slot_map)


def test_split_count_fills_the_gpu():
    kernels = pytest.importorskip("dflash_sglang.ops.block_attention")
    assert kernels.split_count(1, 8, 132) == 16  # 8 x 16 programs at batch 1
    assert kernels.split_count(8, 8, 132) == 4
    assert kernels.split_count(32, 8, 132) == 1  # one program per (request, KV head) writes the output
    assert kernels.split_count(64, 8, 132) == 1


def test_pipeline_stages_fit_the_shared_memory():
    kernels = pytest.importorskip("dflash_sglang.ops.block_attention")
    hopper, ada = 227 * 1024, 99 * 1024  # shared memory one program may opt into on an H100/H200, an RTX 4090
    assert kernels.pipeline_stages(128, 2, hopper) == 3  # 3 x 32 KB of K/V tiles for bf16 head_dim 128
    assert kernels.pipeline_stages(256, 2, hopper) == 3
    assert kernels.pipeline_stages(128, 2, ada) == 2
    assert kernels.pipeline_stages(256, 4, hopper) == 2  # fp32 head_dim 256: 3 x 128 KB would not fit
    assert kernels.pipeline_stages(512, 2, hopper) == 3  # 32-key tiles: 3 x 64 KB
    assert kernels.pipeline_stages(64, 2, 0) == 2  # the interpreter (no shared memory to size by)
