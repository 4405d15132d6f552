# SPDX-License-Identifier: Apache-2.0
"""inject_kv: hand-computed cases pinning the reference (CPU), then the CUDA kernel against the reference.

The GPU tests call ``torch.ops.dflash.inject_kv`` directly (the extension is loaded with ``DFLASH_KERNELS=on``,
so a missing build fails instead of silently testing the reference against itself). Caches are poisoned
with a sentinel first: slots the op must not touch keep it, every written element is compared.
"""

from __future__ import annotations

import math

import pytest
import torch

from dflash_sglang import ops
from dflash_sglang.ops.reference import inject_kv_ref

SENTINEL = 1024.0  # exact in bf16/fp16/fp32, far outside normalized K and the random V


def _cos_sin_cache(max_position: int, head_dim: int, theta: float = 1_000_000.0) -> torch.Tensor:
    """[max_position, head_dim] fp32: cat(cos(p * inv_freq), sin(p * inv_freq))."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(max_position, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=-1).float()


# ------------------------------------------------------------------------------------------------------
# Reference pins (CPU).


def _one_token(k_row, v_row, cos_sin_row, weight, *, slot=1, dtype=torch.float32, cache_dtype=torch.float32, eps=0.0):
    """One token, one layer, one head of D = len(k_row); returns the k, v caches (3 slots)."""
    head_dim = len(k_row)
    kv = torch.tensor([k_row, v_row], dtype=dtype).view(1, 1, 2, 1, head_dim)
    k_cache = torch.full((1, 3, 1, head_dim), SENTINEL, dtype=cache_dtype)
    v_cache = torch.full((1, 3, 1, head_dim), SENTINEL, dtype=cache_dtype)
    inject_kv_ref(kv, torch.tensor([0]), torch.tensor([slot]), torch.tensor([weight], dtype=dtype),
                  torch.tensor([cos_sin_row], dtype=torch.float32), k_cache, v_cache, eps)
    return k_cache, v_cache


def test_ref_rmsnorm_at_position_zero():
    # cos = 1, sin = 0: RoPE is the identity; k / rms(k) with rms = sqrt((1 + 4 + 9 + 16) / 4) = sqrt(7.5).
    k_cache, v_cache = _one_token([1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [1.0, 1.0, 0.0, 0.0], [1.0] * 4)
    rms = math.sqrt(7.5)
    torch.testing.assert_close(k_cache[0, 1, 0], torch.tensor([1 / rms, 2 / rms, 3 / rms, 4 / rms]))
    assert v_cache[0, 1, 0].tolist() == [5.0, 6.0, 7.0, 8.0]
    assert (k_cache[0, [0, 2]] == SENTINEL).all() and (v_cache[0, [0, 2]] == SENTINEL).all()


def test_ref_weight_and_rotate_half():
    # D = 4, half = 2. Row: cos = (0, 1), sin = (1, 0): pair (0, 2) turns by 90 degrees, pair (1, 3) stays.
    # x = w * k / rms; out = [x0 cos0 - x2 sin0, x1 cos1 - x3 sin1, x2 cos0 + x0 sin0, x3 cos1 + x1 sin1]
    #                      = [-x2, x1, x0, x3].
    k, w = [1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 1.0, 0.5]
    rms = math.sqrt(7.5)
    x = [w[i] * k[i] / rms for i in range(4)]
    k_cache, _ = _one_token(k, [0.0] * 4, [0.0, 1.0, 1.0, 0.0], w)
    torch.testing.assert_close(k_cache[0, 1, 0], torch.tensor([-x[2], x[1], x[0], x[3]]))


def test_ref_eps_and_cast_to_cache_dtype():
    # eps enters under the root: k = [3, 4] (mean square 12.5) with eps 12.5 -> k / 5; V 1/3 -> bf16.
    k_cache, v_cache = _one_token([3.0, 4.0], [1 / 3, -1 / 3], [1.0, 0.0], [1.0, 1.0], eps=12.5,
                                  cache_dtype=torch.bfloat16)
    assert k_cache.dtype == torch.bfloat16
    assert k_cache[0, 1, 0].tolist() == torch.tensor([0.6, 0.8]).bfloat16().tolist()
    assert v_cache[0, 1, 0].tolist() == torch.tensor([1 / 3, -1 / 3]).bfloat16().tolist()


def test_ref_negative_slot_writes_nothing():
    k_cache, v_cache = _one_token([1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [1.0, 1.0, 0.0, 0.0], [1.0] * 4,
                                  slot=-1)
    assert (k_cache == SENTINEL).all() and (v_cache == SENTINEL).all()


def test_ref_layers_heads_and_positions():
    # 2 tokens, 2 layers, 2 heads: each (layer, head) normalized on its own, each token rotated at its position.
    gen = torch.Generator().manual_seed(0)
    kv = torch.randn(2, 2, 2, 2, 8, generator=gen)
    weight = torch.rand(2, 8, generator=gen) + 0.5
    cos_sin = _cos_sin_cache(16, 8, theta=100.0)
    positions, slots = torch.tensor([3, 11]), torch.tensor([4, 0])
    k_cache = torch.full((2, 5, 2, 8), SENTINEL)
    v_cache = torch.full((2, 5, 2, 8), SENTINEL)
    inject_kv_ref(kv, positions, slots, weight, cos_sin, k_cache, v_cache, 1e-6)
    for t in range(2):
        cos, sin = cos_sin[positions[t], :4], cos_sin[positions[t], 4:]
        for layer in range(2):
            for head in range(2):
                k = kv[t, layer, 0, head]
                x = k / k.pow(2).mean().add(1e-6).sqrt() * weight[layer]
                want = torch.cat([x[:4] * cos - x[4:] * sin, x[4:] * cos + x[:4] * sin])
                torch.testing.assert_close(k_cache[layer, slots[t], head], want)
                assert torch.equal(v_cache[layer, slots[t], head], kv[t, layer, 1, head])
    assert (k_cache[:, 1:4] == SENTINEL).all() and (v_cache[:, 1:4] == SENTINEL).all()


def test_wrapper_on_cpu_uses_reference():
    kv = torch.randn(3, 2, 2, 1, 64)
    k_cache, v_cache = torch.zeros(2, 4, 1, 64), torch.zeros(2, 4, 1, 64)
    ops.inject_kv(kv, torch.tensor([0, 1, 2]), torch.tensor([2, -1, 0]), torch.ones(2, 64), _cos_sin_cache(4, 64),
                  k_cache, v_cache, 1e-6)
    assert torch.equal(v_cache[:, 2, 0], kv[0, :, 1, 0]) and torch.equal(v_cache[:, 0, 0], kv[2, :, 1, 0])
    assert (v_cache[:, [1, 3]] == 0).all()


# ------------------------------------------------------------------------------------------------------
# Kernel vs reference (GPU).


def _gpu_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "requires a CUDA GPU (torch.cuda.is_available() is False)"
    if torch.cuda.get_device_capability() < (9, 0):
        return f"requires sm_90 (Hopper) or newer, got sm_{''.join(map(str, torch.cuda.get_device_capability()))}"
    return None


gpu = pytest.mark.skipif(_gpu_skip_reason() is not None, reason=_gpu_skip_reason() or "")

# Per-dtype tolerances on K (the kernel follows the reference's rounding steps; rsqrt and FMA contraction can
# still flip one rounding of the storage dtype). V is a plain cast and must match exactly.
K_TOLERANCES = {torch.bfloat16: dict(rtol=2e-2, atol=5e-2), torch.float16: dict(rtol=2e-3, atol=5e-3),
                torch.float32: dict(rtol=1e-5, atol=1e-5)}
K_MAX_RELATIVE_ERROR = {torch.bfloat16: 1e-2, torch.float16: 1e-3, torch.float32: 1e-5}


@pytest.fixture(scope="module")
def dflash_ops():
    """torch.ops.dflash with the extension loaded; fails (not skips) when it cannot load on an sm_90 GPU."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DFLASH_KERNELS", "on")
        ops.kernels_available.cache_clear()
        assert ops.kernels_available()
    ops.kernels_available.cache_clear()
    return torch.ops.dflash


def _make_case(num_tokens, num_layers, num_heads, head_dim, dtype, *, cache_dtype=None, weight_dtype=None,
               pad_every=5, seed=0, max_position=40960, layout="contiguous"):
    """Random inputs on the GPU and sentinel-filled caches (layout: contiguous / strided / unaligned)."""
    cache_dtype = cache_dtype or dtype
    weight_dtype = weight_dtype or dtype
    gen = torch.Generator().manual_seed(seed)
    num_slots = 2 * num_tokens + 3
    kv = (torch.randn(num_tokens, num_layers, 2, num_heads, head_dim, generator=gen) * 3).to(dtype)
    positions = torch.randint(0, max_position, (num_tokens,), generator=gen)
    slots = torch.randperm(num_slots, generator=gen)[:num_tokens]
    if pad_every:
        slots[::pad_every] = -1
    weight = (1 + 0.2 * torch.randn(num_layers, head_dim, generator=gen)).to(weight_dtype)
    cos_sin = _cos_sin_cache(max_position, head_dim)
    shape = (num_layers, num_slots, num_heads, head_dim)

    def cache():
        if layout == "strided":  # [S, L, H, D] storage seen as [L, S, H, D]
            c = torch.empty(num_slots, num_layers, num_heads, head_dim, dtype=cache_dtype, device="cuda")
            c = c.permute(1, 0, 2, 3)
        elif layout == "unaligned":  # storage offset of one element: no 16-byte vector accesses
            flat = torch.empty(math.prod(shape) + 1, dtype=cache_dtype, device="cuda")
            c = flat[1:].view(shape)
        else:
            c = torch.empty(shape, dtype=cache_dtype, device="cuda")
        return c.fill_(SENTINEL)

    args = [t.cuda() for t in (kv, positions, slots, weight, cos_sin)]
    return args, cache, slots


def _check(dflash_ops, args, cache, slots, eps=1e-6):
    kv = args[0]
    k_out, v_out, k_ref, v_ref = cache(), cache(), cache(), cache()
    dflash_ops.inject_kv(*args, k_out, v_out, eps)
    inject_kv_ref(*args, k_ref, v_ref, eps)
    written = torch.zeros(k_out.shape[1], dtype=torch.bool)
    written[slots[slots >= 0]] = True
    # Untouched slots keep the sentinel; every written element left it.
    assert (k_out[:, ~written] == SENTINEL).all() and (v_out[:, ~written] == SENTINEL).all()
    assert not (k_out[:, written] == SENTINEL).any() and not (v_out[:, written] == SENTINEL).any()
    assert torch.equal(v_out, v_ref)
    got, want = k_out[:, written].float(), k_ref[:, written].float()
    relative = float((got - want).norm() / want.norm().clamp_min(1e-30)) if want.numel() else 0.0
    dtype = max(kv.dtype, k_out.dtype, key=lambda d: torch.finfo(d).eps)  # the coarser of the two
    assert relative <= K_MAX_RELATIVE_ERROR[dtype], f"relative K error {relative:.3g}"
    torch.testing.assert_close(got, want, **K_TOLERANCES[dtype])


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bs", [1, 7, 64, 256])
def test_kernel_matches_reference(dflash_ops, bs, dtype, head_dim):
    # decode: bs requests x 16 block tokens; 5 layers, 8 kv heads (GQA of a 32-head drafter).
    args, cache, slots = _make_case(bs * 16, 5, 8, head_dim, dtype, seed=bs + head_dim)
    _check(dflash_ops, args, cache, slots)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("num_heads", [1, 2, 4, 8])
def test_kernel_kv_heads(dflash_ops, num_heads):
    args, cache, slots = _make_case(100, 3, num_heads, 128, torch.bfloat16, seed=num_heads)
    _check(dflash_ops, args, cache, slots)


@pytest.mark.gpu
@gpu
def test_kernel_prefill(dflash_ops):
    args, cache, slots = _make_case(8192, 5, 8, 128, torch.bfloat16, pad_every=0, seed=1)
    _check(dflash_ops, args, cache, slots)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype,cache_dtype,weight_dtype", [
    (torch.bfloat16, torch.float32, torch.bfloat16),
    (torch.float32, torch.bfloat16, torch.float32),
    (torch.bfloat16, torch.bfloat16, torch.float32),
    (torch.float16, torch.bfloat16, torch.bfloat16),
])
def test_kernel_mixed_dtypes(dflash_ops, dtype, cache_dtype, weight_dtype):
    args, cache, slots = _make_case(64, 2, 4, 128, dtype, cache_dtype=cache_dtype, weight_dtype=weight_dtype)
    _check(dflash_ops, args, cache, slots)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("layout", ["strided", "unaligned"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernel_cache_layouts(dflash_ops, layout, dtype):
    args, cache, slots = _make_case(48, 3, 2, 64, dtype, layout=layout)
    _check(dflash_ops, args, cache, slots)


@pytest.mark.gpu
@gpu
def test_kernel_all_padding_and_empty(dflash_ops):
    args, cache, slots = _make_case(16, 2, 2, 64, torch.bfloat16, pad_every=1)
    _check(dflash_ops, args, cache, slots)
    args, cache, slots = _make_case(0, 2, 2, 64, torch.bfloat16)
    _check(dflash_ops, args, cache, slots)


@pytest.mark.gpu
@gpu
def test_kernel_non_contiguous_input(dflash_ops):
    args, cache, slots = _make_case(32, 2, 2, 128, torch.bfloat16)
    args[0] = args[0].transpose(0, 1).contiguous().transpose(0, 1)  # same values, non-contiguous
    assert not args[0].is_contiguous()
    _check(dflash_ops, args, cache, slots)


@pytest.mark.gpu
@gpu
def test_kernel_rejects_bad_arguments(dflash_ops):
    args, cache, slots = _make_case(8, 2, 2, 64, torch.bfloat16)
    with pytest.raises(RuntimeError, match="head_dim"):
        bad = [args[0][..., :32].contiguous(), args[1], args[2], args[3][:, :32], args[4][:, :32]]
        dflash_ops.inject_kv(*bad, cache()[..., :32], cache()[..., :32], 1e-6)
    with pytest.raises(RuntimeError, match="slots must be int64"):
        dflash_ops.inject_kv(args[0], args[1], args[2].int(), *args[3:], cache(), cache(), 1e-6)
    with pytest.raises(RuntimeError, match="must have one dtype"):
        dflash_ops.inject_kv(*args, cache(), cache().float(), 1e-6)


@pytest.mark.gpu
@gpu
def test_public_wrapper_dispatches_to_kernel(dflash_ops, monkeypatch):
    monkeypatch.setenv("DFLASH_KERNELS", "on")
    ops.kernels_available.cache_clear()

    def _fail(*args, **kwargs):
        raise AssertionError("the CUDA path fell back to the reference")

    monkeypatch.setattr(ops.reference, "inject_kv_ref", _fail)
    args, cache, slots = _make_case(64, 5, 8, 128, torch.bfloat16)
    k_out, v_out, k_ref, v_ref = cache(), cache(), cache(), cache()
    ops.inject_kv(*args, k_out, v_out, 1e-6)
    monkeypatch.undo()
    ops.kernels_available.cache_clear()
    inject_kv_ref(*args, k_ref, v_ref, 1e-6)
    assert torch.equal(v_out, v_ref)
    torch.testing.assert_close(k_out, k_ref, **K_TOLERANCES[torch.bfloat16])


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_opcheck(dflash_ops, dtype):
    for num_tokens, head_dim in [(1, 64), (20, 128)]:
        args, cache, slots = _make_case(num_tokens, 2, 2, head_dim, dtype, max_position=64, pad_every=3)
        torch.library.opcheck(dflash_ops.inject_kv.default, (*args, cache(), cache(), 1e-6))


@pytest.mark.gpu
@gpu
def test_torch_compile_fullgraph(dflash_ops):
    @torch.compile(fullgraph=True)
    def inject_and_read(kv, positions, slots, weight, cos_sin, k_cache, v_cache):
        torch.ops.dflash.inject_kv(kv, positions, slots, weight, cos_sin, k_cache, v_cache, 1e-6)
        return k_cache[:, slots.clamp_min(0)].float().sum(), v_cache * 1

    args, cache, slots = _make_case(32, 2, 2, 128, torch.bfloat16, pad_every=0)
    k_out, v_out, k_ref, v_ref = cache(), cache(), cache(), cache()
    _, v_seen = inject_and_read(*args, k_out, v_out)
    inject_kv_ref(*args, k_ref, v_ref, 1e-6)
    assert torch.equal(v_out, v_ref) and torch.equal(v_seen, v_ref)
    torch.testing.assert_close(k_out, k_ref, **K_TOLERANCES[torch.bfloat16])
