# SPDX-License-Identifier: Apache-2.0
"""The DFlash drafter in plain PyTorch (CPU and GPU): the oracle the SGLang model is tested against.

A stack of Qwen3-style decoder layers whose attention sees two kinds of keys/values: those of the
*context* (the target's hidden states at ``target_layer_ids``, projected by ``fc`` + ``hidden_norm`` and
passed through each layer's ``k_proj``/``k_norm``/``v_proj`` with RoPE at the context positions) and those
of the *block* itself. Context K/V depend only on target features, so callers compute them once per
verified token (:meth:`DFlashDrafter.context_kv`) and keep them; a draft pass then runs only the block.

The drafter has no embedding and no LM head: the block's input embeddings and the logits use the
target's (``noise_embedding`` and :meth:`DFlashDrafter.compute_logits`). No SGLang import here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dflash_sglang.core.config import DFlashDraftConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for NeoX-style (rotate-half) RoPE. positions: [n] int64 -> ([n, head_dim], [n, head_dim])."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32,
                                             device=positions.device) / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [n, heads, head_dim]; cos/sin: [n, head_dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


class DraftAttention(nn.Module):
    def __init__(self, config: DFlashDraftConfig, layer_id: int) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.rope_theta = config.rope_theta
        self.is_causal = config.layer_is_causal(layer_id)
        self.sliding_window = config.layer_sliding_window(layer_id)
        bias = config.attention_bias
        hidden, q_dim, kv_dim = config.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(hidden, q_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, kv_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, kv_dim, bias=bias)
        self.o_proj = nn.Linear(q_dim, hidden, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def key_value(self, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K (normed, RoPE'd) and V of ``hidden``: [n, hidden] -> ([n, kv_heads, head_dim], same)."""
        k = self.k_norm(self.k_proj(hidden).view(-1, self.num_kv_heads, self.head_dim))
        v = self.v_proj(hidden).view(-1, self.num_kv_heads, self.head_dim)
        cos, sin = rope_cos_sin(positions, self.head_dim, self.rope_theta, k.dtype)
        return apply_rope(k, cos, sin), v

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor, context_k: torch.Tensor,
                context_v: torch.Tensor, context_positions: torch.Tensor) -> torch.Tensor:
        """One request's block. hidden: [B, hidden]; positions: [B]; context_k/v: [C, kv_heads, head_dim]."""
        q = self.q_norm(self.q_proj(hidden).view(-1, self.num_heads, self.head_dim))
        cos, sin = rope_cos_sin(positions, self.head_dim, self.rope_theta, q.dtype)
        q = apply_rope(q, cos, sin)
        block_k, block_v = self.key_value(hidden, positions)
        k = torch.cat([context_k, block_k], dim=0)
        v = torch.cat([context_v, block_v], dim=0)
        key_positions = torch.cat([context_positions, positions])
        mask = block_attention_mask(positions, key_positions, self.is_causal, self.sliding_window)
        groups = self.num_heads // self.num_kv_heads
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1).float(), k.transpose(0, 1).float(), v.transpose(0, 1).float(),
            attn_mask=mask[None], scale=self.head_dim ** -0.5)
        return self.o_proj(out.transpose(0, 1).reshape(hidden.shape[0], -1).to(hidden.dtype))


def block_attention_mask(query_positions: torch.Tensor, key_positions: torch.Tensor, is_causal: bool,
                         sliding_window: int | None) -> torch.Tensor:
    """Which keys each block query sees: [B] x [C + B] -> [B, C + B] bool.

    Non-causal layers let every block query see the whole block; causal ones only earlier positions. A
    sliding window ``W`` counts the query itself: query position p keeps key k only while p - k < W (and, when
    non-causal, k - p < W), as the reference drafter's mask does (z-lab/dflash ``_attention_mask``).
    """
    q = query_positions[:, None]
    k = key_positions[None, :]
    visible = torch.ones(q.shape[0], k.shape[1], dtype=torch.bool, device=q.device)
    if is_causal:
        visible &= k <= q
    if sliding_window is not None:
        visible &= (q - k) < sliding_window
        if not is_causal:
            visible &= (k - q) < sliding_window
    return visible


class DraftMLP(nn.Module):
    def __init__(self, config: DFlashDraftConfig) -> None:
        super().__init__()
        if config.hidden_act != "silu":
            raise NotImplementedError(f"drafter hidden_act {config.hidden_act!r} is not supported; expected 'silu'")
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DraftLayer(nn.Module):
    def __init__(self, config: DFlashDraftConfig, layer_id: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = DraftAttention(config, layer_id)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = DraftMLP(config)

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor, context_k: torch.Tensor,
                context_v: torch.Tensor, context_positions: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), positions, context_k, context_v,
                                         context_positions)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class DFlashDrafter(nn.Module):
    """The drafter. Parameter names match the released checkpoints (see ``checkpoint.py``)."""

    def __init__(self, config: DFlashDraftConfig) -> None:
        super().__init__()
        self.config = config
        self.fc = nn.Linear(config.num_context_features, config.hidden_size, bias=False)
        self.hidden_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.layers = nn.ModuleList(DraftLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def project_context(self, target_features: torch.Tensor) -> torch.Tensor:
        """[n, len(target_layer_ids) * hidden] concatenated target hidden states -> [n, hidden]."""
        return self.hidden_norm(self.fc(target_features))

    def context_kv(self, target_features: torch.Tensor,
                   positions: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The K/V that ``n`` verified tokens contribute to every layer: the "KV injection".

        Args:
            target_features: [n, len(target_layer_ids) * hidden], the target's hidden states at
                ``target_layer_ids`` (outputs of those layers), concatenated in that order.
            positions: [n] int64, the tokens' absolute positions.
        Returns:
            One (k, v) per layer, each [n, num_kv_heads, head_dim].
        """
        context = self.project_context(target_features)
        return [layer.self_attn.key_value(context, positions) for layer in self.layers]

    def forward(self, noise_embedding: torch.Tensor, positions: torch.Tensor,
                context: list[tuple[torch.Tensor, torch.Tensor]], context_positions: torch.Tensor) -> torch.Tensor:
        """Runs one request's block.

        Args:
            noise_embedding: [B, hidden], the target's embeddings of [last verified token, mask, ...]
                (already times ``input_embedding_scale`` where the config has one).
            positions: [B] int64 absolute positions of the block.
            context: per layer (k, v) of the context, as from :meth:`context_kv`.
            context_positions: [C] int64 positions of the context tokens.
        Returns:
            [B, hidden] final hidden states (after ``norm``); rows 1.. predict the block's drafts.
        """
        hidden = noise_embedding
        for layer, (k, v) in zip(self.layers, context):
            hidden = layer(hidden, positions, k, v, context_positions)
        return self.norm(hidden)

    def compute_logits(self, hidden: torch.Tensor, lm_head_weight: torch.Tensor) -> torch.Tensor:
        """Logits through the target's LM head, then ``output_multiplier`` and soft-capping if configured."""
        return finish_draft_logits(F.linear(hidden, lm_head_weight).float(), self.config)


def finish_draft_logits(logits: torch.Tensor, config: DFlashDraftConfig) -> torch.Tensor:
    """The drafter's LM-head logits [n, vocab] fp32 times ``output_multiplier``, then soft-capped by
    ``final_logit_softcapping``, where the config gives them (Gemma drafters)."""
    if config.output_multiplier is not None:
        logits = logits * config.output_multiplier
    cap = config.final_logit_softcapping
    if cap is not None and cap > 0:
        logits = torch.tanh(logits / cap) * cap
    return logits
