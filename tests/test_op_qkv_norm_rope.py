# SPDX-License-Identifier: Apache-2.0
"""qkv_norm_rope: the reference against an independent oracle (per-head RMSNorm written out, RoPE as the rotation
of the complex numbers x[i] + j x[i + D/2] by position x theta_i, from the frequencies rather than a cos/sin
table), for Gemma 4's layer shapes: sliding (default RoPE) and full-attention (proportional RoPE, a quarter of
the frequencies rotating, attention_k_eq_v). Then the Triton kernel against the reference: on the GPU where there
is one, else on the CPU through Triton's interpreter (a child pytest with ``TRITON_INTERPRET=1``)."""

from __future__ import annotations


import pytest
import torch

from child_pytest import CUDA, triton_interpreter_rerun, triton_kernel_device

from dflash_sglang import ops
from dflash_sglang.ops.reference import qkv_norm_rope_ref

EPS = 1e-6
MAX_POSITION = 4096


def _inv_freq(head_dim: int, base: float, rotary_fraction: float) -> torch.Tensor:
    """Gemma 4's frequencies: theta^(-2i/D) for the first rotary_fraction of the pairs, 0 (no rotation) after."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    inv_freq[int(rotary_fraction * head_dim // 2):] = 0.0
    return inv_freq


def _cos_sin_cache(inv_freq: torch.Tensor) -> torch.Tensor:
    """SGLang's layout: row p = cat(cos(p * inv_freq), sin(p * inv_freq)), fp32."""
    angles = torch.arange(MAX_POSITION, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=-1).float()


def _oracle(qkv, positions, q_weight, k_weight, inv_freq, num_heads, num_kv_heads, head_dim, k_eq_v):
    """float64 throughout: the heads, their norms, and RoPE as a complex rotation."""
    x = qkv.double()
    tokens = x.shape[0]
    q = x[:, :num_heads * head_dim].reshape(tokens, num_heads, head_dim)
    k = x[:, num_heads * head_dim:(num_heads + num_kv_heads) * head_dim].reshape(tokens, num_kv_heads, head_dim)
    v = k if k_eq_v else x[:, (num_heads + num_kv_heads) * head_dim:].reshape(tokens, num_kv_heads, head_dim)

    def norm(t, weight):
        t = t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + EPS)
        return t if weight is None else t * weight.double()

    def rotate(t):
        half = head_dim // 2
        z = torch.complex(t[..., :half], t[..., half:])
        z = z * torch.polar(torch.ones_like(inv_freq), positions.double()[:, None] * inv_freq)[:, None, :]
        return torch.cat([z.real, z.imag], dim=-1)

    return (rotate(norm(q, q_weight)).reshape(tokens, -1), rotate(norm(k, k_weight)).reshape(tokens, -1),
            norm(v, None).reshape(tokens, -1))


def _inputs(tokens, num_heads, num_kv_heads, head_dim, k_eq_v, dtype, seed, row_padding=0):
    generator = torch.Generator().manual_seed(seed)
    width = (num_heads + num_kv_heads * (1 if k_eq_v else 2)) * head_dim
    qkv = (torch.randn(tokens, width + row_padding, generator=generator) * 3).to(dtype)[:, :width]
    positions = torch.randint(0, MAX_POSITION, (tokens,), generator=generator)
    q_weight = (0.5 + torch.rand(head_dim, generator=generator)).to(dtype)
    k_weight = (0.5 + torch.rand(head_dim, generator=generator)).to(dtype)
    return qkv, positions, q_weight, k_weight


# (heads, KV heads, head_dim, k_eq_v, RoPE base, rotary fraction): Gemma 4 31B's sliding and full layers,
# 26B-A4B's full layer, and small shapes
LAYERS = [(32, 16, 256, False, 10_000.0, 1.0), (32, 4, 512, True, 1_000_000.0, 0.25),
          (16, 2, 512, True, 1_000_000.0, 0.25), (4, 2, 64, False, 10_000.0, 1.0)]


@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim, k_eq_v, base, fraction", LAYERS)
def test_ref_matches_the_oracle(num_heads, num_kv_heads, head_dim, k_eq_v, base, fraction):
    qkv, positions, q_weight, k_weight = _inputs(5, num_heads, num_kv_heads, head_dim, k_eq_v, torch.float32, 0,
                                                 row_padding=8)
    inv_freq = _inv_freq(head_dim, base, fraction)
    q, k, v = qkv_norm_rope_ref(qkv, positions, q_weight, k_weight, _cos_sin_cache(inv_freq), num_heads,
                                num_kv_heads, head_dim, k_eq_v, EPS)
    expected = _oracle(qkv, positions, q_weight, k_weight, inv_freq, num_heads, num_kv_heads, head_dim, k_eq_v)
    for got, want in zip((q, k, v), expected):
        assert got.is_contiguous()
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    if fraction < 1.0:  # the pairs past the rotated quarter are the normalized heads, untouched by RoPE
        unrotated = slice(int(fraction * head_dim // 2), head_dim // 2)
        k_heads = k.reshape(5, num_kv_heads, head_dim)
        raw = qkv[:, num_heads * head_dim:].reshape(5, num_kv_heads, head_dim)
        normed = raw / raw.pow(2).mean(-1, keepdim=True).add(EPS).sqrt() * k_weight
        torch.testing.assert_close(k_heads[..., unrotated], normed[..., unrotated])


def test_bad_arguments_name_the_problem():
    qkv, positions, q_weight, k_weight = _inputs(3, 4, 2, 64, False, torch.float32, 0)
    cache = _cos_sin_cache(_inv_freq(64, 10_000.0, 1.0))
    with pytest.raises(ValueError, match=r"qkv must be \[T, 384\].*got \(3, 512\)"):
        ops.qkv_norm_rope(qkv, positions, q_weight, k_weight, cache, 4, 2, 64, True, EPS)
    with pytest.raises(ValueError, match="positions must have T=3"):
        ops.qkv_norm_rope(qkv, positions[:2], q_weight, k_weight, cache, 4, 2, 64, False, EPS)
    with pytest.raises(ValueError, match=r"cos_sin_cache must be contiguous \[max_position, 64\]"):
        ops.qkv_norm_rope(qkv, positions, q_weight, k_weight, cache[:, :32], 4, 2, 64, False, EPS)


# ------------------------------------------------------------------------------------------------------
# The kernel against the reference.


test_kernel_in_triton_interpreter = triton_interpreter_rerun(__file__)


DTYPES = [torch.bfloat16, torch.float16, torch.float32] if CUDA else [torch.float16, torch.float32]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens", [1, 7] + ([512] if CUDA else []))
@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim, k_eq_v, base, fraction", LAYERS)
def test_kernel_matches_reference(dtype, tokens, num_heads, num_kv_heads, head_dim, k_eq_v, base, fraction):
    device = triton_kernel_device()
    qkv, positions, q_weight, k_weight = _inputs(tokens, num_heads, num_kv_heads, head_dim, k_eq_v, dtype, tokens,
                                                 row_padding=head_dim)
    cache = _cos_sin_cache(_inv_freq(head_dim, base, fraction))
    from dflash_sglang.ops import qkv_norm_rope_kernel as kernel  # compiled, or run by the interpreter

    got = kernel.qkv_norm_rope(qkv.to(device), positions.to(device), q_weight.to(device), k_weight.to(device),
                               cache.to(device), num_heads, num_kv_heads, head_dim, k_eq_v, EPS)
    expected = qkv_norm_rope_ref(qkv, positions, q_weight, k_weight, cache, num_heads, num_kv_heads, head_dim,
                                 k_eq_v, EPS)
    tol = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-5}[dtype]
    for out, ref in zip(got, expected):
        assert out.is_contiguous() and out.dtype == dtype
        torch.testing.assert_close(out.cpu(), ref, rtol=tol, atol=tol)
