# SPDX-License-Identifier: Apache-2.0
"""The DFlash training objective: many anchored blocks of one sequence in one drafter forward.

For a training sequence ``tokens`` (prompt + the target's own response) and the target's hidden states over
it, anchors ``a`` are sampled among the response positions. Each anchor gives one block, exactly as the
drafter sees it when serving:

* block input ids ``[tokens[a], mask x (B - 1)]`` at positions ``a .. a + B - 1``, embedded with the
  TARGET's (frozen) embedding table;
* context: the target's features (``hidden_states[i + 1]`` for ``i`` in ``target_layer_ids``, concatenated,
  through ``fc`` + ``hidden_norm``) of the positions ``< a`` only: at serving time the block's first token is
  the bonus token, whose features the target has not computed yet (SpecForge ``specforge/core/dflash.py``
  masks the same way: "kv_idx < anchor_pos");
* labels: row ``k`` (1 <= k < B) predicts ``tokens[a + k]`` (same-position prediction), through the TARGET's
  LM head; rows past the sequence end are ignored;
* weights: ``w_k = exp(-(k - 1) / gamma)`` (paper, SpecForge ``loss_decay_gamma``; gamma 7 for B = 16),
  ``w_0 = 0``; the loss is the weighted mean of the cross-entropies.

All blocks run in one pass: each block query attends to the context keys before its anchor plus the keys of
its own block (non-causally, or causally in layers where :meth:`DFlashDraftConfig.layer_is_causal` says so),
never to another block. The attention is computed as a joint softmax over [context keys | own-block keys],
so its cost is ``N*B x (S + B)``, not ``N*B x (S + N*B)``. No SGLang here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dflash_sglang.core.model import DFlashDrafter, apply_rope, block_attention_mask, rope_cos_sin

IGNORE = -100


def position_weights(block_size: int, gamma: float | None) -> torch.Tensor:
    """[B] fp32: 0 for the anchor row, ``exp(-(k - 1) / gamma)`` for row k >= 1 (all ones when gamma is None)."""
    k = torch.arange(block_size, dtype=torch.float32)
    weights = torch.ones(block_size) if gamma is None or gamma <= 0 else torch.exp(-(k - 1) / gamma)
    weights[0] = 0.0
    return weights


def sample_anchors(seq_len: int, prompt_len: int, num_anchors: int, generator: torch.Generator) -> torch.Tensor:
    """Sorted distinct anchor positions, sampled uniformly without replacement from ``[prompt_len, seq_len - 2]``.

    An anchor is a token the target has emitted (the first response token is at ``prompt_len``) that has at
    least one next token to predict. Returns [min(num_anchors, #candidates)] int64 (maybe empty).
    """
    low, high = max(prompt_len, 1), seq_len - 2
    count = max(high - low + 1, 0)
    if count == 0 or num_anchors <= 0:
        return torch.zeros(0, dtype=torch.int64)
    picked = torch.randperm(count, generator=generator)[:num_anchors]
    return (picked + low).sort().values


@dataclass
class Blocks:
    """The blocks of one sequence. ``N`` anchors, block size ``B``; every tensor is on the sequence's device.

    Invariant: ``input_ids[:, 0] == tokens[anchors]``, the rest ``mask_token_id``; ``positions[j] = anchors[j] +
    arange(B)``; ``labels[j, k] = tokens[anchors[j] + k]`` for 1 <= k and in range, else ``IGNORE``;
    ``weights`` is 0 exactly where ``labels`` is ``IGNORE``.
    """

    anchors: torch.Tensor  # [N] int64
    input_ids: torch.Tensor  # [N, B] int64
    positions: torch.Tensor  # [N, B] int64
    labels: torch.Tensor  # [N, B] int64
    weights: torch.Tensor  # [N, B] fp32


def build_blocks(tokens: torch.Tensor, anchors: torch.Tensor, block_size: int, mask_token_id: int,
                 gamma: float | None) -> Blocks:
    """tokens: [S] int64; anchors: [N] int64 -> :class:`Blocks`."""
    seq_len = tokens.shape[0]
    offsets = torch.arange(block_size, device=tokens.device)
    anchors = anchors.to(tokens.device)
    positions = anchors[:, None] + offsets[None, :]
    input_ids = torch.full_like(positions, mask_token_id)
    input_ids[:, 0] = tokens[anchors]
    in_range = positions < seq_len
    labels = torch.where(in_range, tokens[positions.clamp(max=seq_len - 1)], torch.full_like(positions, IGNORE))
    labels[:, 0] = IGNORE
    weights = position_weights(block_size, gamma).to(tokens.device)[None, :] * (labels != IGNORE)
    return Blocks(anchors, input_ids, positions, labels, weights.float())


def context_mask(anchors: torch.Tensor, block_size: int, seq_len: int,
                 sliding_window: int | None = None) -> torch.Tensor:
    """[N * B, S] bool: block query (j, k) sees context position p iff p < anchors[j] (and, with a sliding
    window W, ``anchors[j] + k - p < W``, as :func:`block_attention_mask` counts it)."""
    query_pos = (anchors[:, None] + torch.arange(block_size, device=anchors.device)).reshape(-1, 1)
    key_pos = torch.arange(seq_len, device=anchors.device)[None, :]
    visible = key_pos < anchors.repeat_interleave(block_size)[:, None]
    if sliding_window is not None:
        visible &= (query_pos - key_pos) < sliding_window
    return visible


def _layer_forward(layer, hidden: torch.Tensor, positions: torch.Tensor, context: torch.Tensor,
                   context_positions: torch.Tensor, ctx_visible: torch.Tensor, blk_visible: torch.Tensor,
                   num_blocks: int, block_size: int) -> torch.Tensor:
    """One drafter layer over all blocks. hidden: [N*B, H]; context: [S, H] projected features."""
    attn = layer.self_attn
    heads, kv_heads, head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
    x = layer.input_layernorm(hidden)
    q = attn.q_norm(attn.q_proj(x).view(-1, heads, head_dim))
    cos, sin = rope_cos_sin(positions, head_dim, attn.rope_theta, q.dtype)
    q = apply_rope(q, cos, sin)
    k_blk, v_blk = attn.key_value(x, positions)
    k_ctx, v_ctx = attn.key_value(context, context_positions)
    groups = heads // kv_heads
    k_blk, v_blk, k_ctx, v_ctx = (t.repeat_interleave(groups, dim=1) for t in (k_blk, v_blk, k_ctx, v_ctx))
    q, k_blk, v_blk, k_ctx, v_ctx = (t.float() for t in (q, k_blk, v_blk, k_ctx, v_ctx))
    scale = head_dim ** -0.5
    scores_ctx = torch.einsum("qhd,khd->hqk", q, k_ctx) * scale  # [h, N*B, S]
    scores_ctx = scores_ctx.masked_fill(~ctx_visible[None], float("-inf"))
    qb = q.view(num_blocks, block_size, heads, head_dim)
    kb = k_blk.view(num_blocks, block_size, heads, head_dim)
    scores_blk = torch.einsum("nqhd,nkhd->hnqk", qb, kb) * scale  # [h, N, B, B]
    scores_blk = scores_blk.masked_fill(~blk_visible[None, None], float("-inf"))
    seq_len = k_ctx.shape[0]
    probs = torch.cat([scores_ctx, scores_blk.reshape(heads, -1, block_size)], dim=-1).softmax(dim=-1)
    p_ctx, p_blk = probs[..., :seq_len], probs[..., seq_len:].reshape(heads, num_blocks, block_size, block_size)
    out = torch.einsum("hqk,khd->qhd", p_ctx, v_ctx)
    out = out + torch.einsum("hnqk,nkhd->nqhd", p_blk, v_blk.view(num_blocks, block_size, heads, head_dim)
                             ).reshape(-1, heads, head_dim)
    hidden = hidden + attn.o_proj(out.reshape(hidden.shape[0], -1).to(hidden.dtype))
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


def drafter_block_hidden(drafter: DFlashDrafter, noise_embedding: torch.Tensor, blocks: Blocks,
                         target_features: torch.Tensor) -> torch.Tensor:
    """The drafter's final hidden states of every block row, all blocks in one pass.

    Args:
        noise_embedding: [N*B, H], the target's embeddings of ``blocks.input_ids`` (times the config's scale).
        blocks: from :func:`build_blocks`.
        target_features: [S, len(target_layer_ids) * H], the target's concatenated features of the sequence.
    Returns:
        [N*B, H], equal (up to rounding) to running :meth:`DFlashDrafter.forward` block by block with the
        context ``target_features[:anchor]``.
    """
    config = drafter.config
    num_blocks, block_size = blocks.input_ids.shape
    seq_len = target_features.shape[0]
    context = drafter.project_context(target_features)
    context_positions = torch.arange(seq_len, device=target_features.device)
    positions = blocks.positions.reshape(-1)
    hidden = noise_embedding
    local = torch.arange(block_size, device=positions.device)
    for i, layer in enumerate(drafter.layers):
        window = config.layer_sliding_window(i)
        ctx_visible = context_mask(blocks.anchors, block_size, seq_len, window)
        blk_visible = block_attention_mask(local, local, config.layer_is_causal(i), window)
        hidden = _layer_forward(layer, hidden, positions, context, context_positions, ctx_visible, blk_visible,
                                num_blocks, block_size)
    return drafter.norm(hidden)


@dataclass
class LossParts:
    """Sums over one sequence's blocks: the loss of a batch is ``sum(weighted_ce) / sum(weight)``."""

    weighted_ce: torch.Tensor  # scalar, differentiable
    weight: float
    num_correct: int  # argmax == label among the scored rows
    num_scored: int
    num_first_correct: int  # row 1 (the first draft) correct
    num_blocks: int


def sequence_loss(drafter: DFlashDrafter, embedding: torch.Tensor, lm_head: torch.Tensor, tokens: torch.Tensor,
                  target_features: torch.Tensor, blocks: Blocks) -> LossParts:
    """Weighted cross-entropy sums of one sequence's blocks (see the module docstring).

    Args:
        embedding: [V, H] the target's input embedding table (frozen).
        lm_head: [V, H] the target's LM head (frozen).
        tokens: [S] int64; target_features: [S, F]; blocks: from :func:`build_blocks` on ``tokens``.
    """
    config = drafter.config
    scale = config.input_embedding_scale if config.input_embedding_scale is not None else 1.0
    noise = F.embedding(blocks.input_ids.reshape(-1), embedding) * scale
    dtype = drafter.fc.weight.dtype if not torch.is_autocast_enabled() else noise.dtype
    hidden = drafter_block_hidden(drafter, noise.to(dtype), blocks, target_features.to(dtype))
    scored = (blocks.weights.reshape(-1) > 0).nonzero().squeeze(-1)
    logits = drafter.compute_logits(hidden[scored].to(lm_head.dtype), lm_head)  # fp32
    labels = blocks.labels.reshape(-1)[scored]
    ce = F.cross_entropy(logits, labels, reduction="none")
    weights = blocks.weights.reshape(-1)[scored]
    with torch.no_grad():
        correct = logits.argmax(dim=-1) == labels
        first = (scored % blocks.input_ids.shape[1]) == 1
    return LossParts((ce * weights).sum(), float(weights.sum()), int(correct.sum()), int(scored.numel()),
                     int((correct & first).sum()), int(blocks.input_ids.shape[0]))

