# SPDX-License-Identifier: Apache-2.0
"""Per-head RMSNorm of q, k and v and RoPE on q and k, from a fused QKV projection, in one Triton kernel
(``qkv_norm_rope_ref`` in ``ops/reference.py`` is the specification).

Gemma 4's attention normalizes every head of q and k (weighted) and of v (no weight) before RoPE. Op by op that
is a copy of each strided slice of the QKV output, three norms and a RoPE kernel per layer; here one program per
(token, head) reads its head from the QKV row, normalizes it in fp32, rounds as the norm's output would be
rounded, rotates it (NeoX pairing, the whole head) and writes q, k and v as contiguous tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _norm_rope_head(Src, Weight, Dst, CosSin, position, head_dim, eps, HAS_WEIGHT: tl.constexpr,
                    ROTATE: tl.constexpr, HALF: tl.constexpr):
    cols = tl.arange(0, HALF)
    mask = cols < head_dim // 2
    dtype = Dst.dtype.element_ty
    x1 = tl.load(Src + cols, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(Src + head_dim // 2 + cols, mask=mask, other=0.0).to(tl.float32)
    inv = tl.rsqrt((tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / head_dim + eps)
    x1 = x1 * inv
    x2 = x2 * inv
    if HAS_WEIGHT:
        x1 = x1 * tl.load(Weight + cols, mask=mask, other=0.0).to(tl.float32)
        x2 = x2 * tl.load(Weight + head_dim // 2 + cols, mask=mask, other=0.0).to(tl.float32)
    x1 = x1.to(dtype).to(tl.float32)  # the norm's output, rounded before RoPE as op by op
    x2 = x2.to(dtype).to(tl.float32)
    if ROTATE:
        row = CosSin + position * head_dim
        cos = tl.load(row + cols, mask=mask, other=1.0).to(tl.float32)
        sin = tl.load(row + head_dim // 2 + cols, mask=mask, other=0.0).to(tl.float32)
        x1, x2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    tl.store(Dst + cols, x1.to(dtype), mask=mask)
    tl.store(Dst + head_dim // 2 + cols, x2.to(dtype), mask=mask)


@triton.jit
def _qkv_norm_rope_kernel(QKV, Positions, QWeight, KWeight, CosSin, Q, K, V, num_heads, num_kv_heads, head_dim,
                          v_offset, eps, stride_qkv, HALF: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    src = QKV + token * stride_qkv
    position = tl.load(Positions + token).to(tl.int64)
    q_size = num_heads * head_dim
    kv_size = num_kv_heads * head_dim
    if head < num_heads:
        _norm_rope_head(src + head * head_dim, QWeight, Q + token * q_size + head * head_dim, CosSin, position,
                        head_dim, eps, HAS_WEIGHT=True, ROTATE=True, HALF=HALF)
    elif head < num_heads + num_kv_heads:
        kv_head = head - num_heads
        _norm_rope_head(src + q_size + kv_head * head_dim, KWeight, K + token * kv_size + kv_head * head_dim,
                        CosSin, position, head_dim, eps, HAS_WEIGHT=True, ROTATE=True, HALF=HALF)
    else:
        kv_head = head - num_heads - num_kv_heads
        _norm_rope_head(src + v_offset + kv_head * head_dim, QWeight, V + token * kv_size + kv_head * head_dim,
                        CosSin, position, head_dim, eps, HAS_WEIGHT=False, ROTATE=False, HALF=HALF)


def qkv_norm_rope(qkv: torch.Tensor, positions: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                  cos_sin_cache: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int, k_eq_v: bool,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernel launch (arguments checked by ``ops.qkv_norm_rope``): fresh contiguous q, k, v."""
    tokens = qkv.shape[0]
    q = torch.empty((tokens, num_heads * head_dim), dtype=qkv.dtype, device=qkv.device)
    k = torch.empty((tokens, num_kv_heads * head_dim), dtype=qkv.dtype, device=qkv.device)
    v = torch.empty_like(k)
    if tokens == 0:
        return q, k, v
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    v_offset = q_size if k_eq_v else q_size + kv_size
    half = triton.next_power_of_2(head_dim // 2)
    _qkv_norm_rope_kernel[(tokens, num_heads + 2 * num_kv_heads)](
        qkv, positions, q_weight, k_weight, cos_sin_cache, q, k, v, num_heads, num_kv_heads, head_dim, v_offset,
        eps, qkv.stride(0), HALF=half, num_warps=max(1, min(4, half // 64)))
    return q, k, v
