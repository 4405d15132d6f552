# SPDX-License-Identifier: Apache-2.0
"""The sampling distribution both the target and the drafter are read through, for lossless
speculative sampling: temperature, then top-k, top-p and min-p filtering, renormalized.

Semantics follow SGLang's PyTorch sampler (``top_k_top_p_min_p_sampling_from_probs_torch`` in
sgl-project/sglang ``python/sglang/srt/layers/sampler.py``): p = softmax(logits / T); keep the ``top_k``
most likely tokens and those whose cumulative probability *before* them (over the full sorted
distribution) is at most ``top_p``, and of those the ones with p >= ``min_p`` * max(p); renormalize.
Parameters may be Python scalars (one setting for all rows) or per-row tensors ([n] or [n, 1]).
"""

from __future__ import annotations

import torch


def _per_row(value: float | int | torch.Tensor, rows: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype).reshape(rows, 1)
    return torch.full((rows, 1), value, dtype=dtype, device=device)


def processed_probs(logits: torch.Tensor, temperature: float | torch.Tensor, top_p: float | torch.Tensor = 1.0,
                    top_k: int | torch.Tensor = 0, min_p: float | torch.Tensor = 0.0) -> torch.Tensor:
    """[n, V] logits -> [n, V] fp32 probabilities after temperature, top-k (0 = off), top-p and min-p (0 = off).

    Temperature must be > 0 (greedy rows use argmax instead, or ``top_k = 1``).
    """
    rows, vocab = logits.shape
    temperature = _per_row(temperature, rows, torch.float32, logits.device)
    top_p = _per_row(top_p, rows, torch.float32, logits.device)
    top_k = _per_row(top_k, rows, torch.int64, logits.device)
    top_k = torch.where((top_k <= 0) | (top_k > vocab), torch.full_like(top_k, vocab), top_k)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    cumulative_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    rank = torch.arange(vocab, device=logits.device)[None, :]
    keep = (rank < top_k) & (cumulative_before <= top_p)
    if isinstance(min_p, torch.Tensor) or min_p > 0:
        keep &= sorted_probs >= sorted_probs[:, :1] * _per_row(min_p, rows, torch.float32, logits.device)
    sorted_probs = sorted_probs * keep
    filtered = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return filtered / filtered.sum(dim=-1, keepdim=True)


def sample_from(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of [n, V] probabilities -> [n] int64."""
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
