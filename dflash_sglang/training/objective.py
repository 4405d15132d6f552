# SPDX-License-Identifier: Apache-2.0
"""The DFlash training objective: every anchored block of a batch of sequences in one drafter forward.

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
* weights: ``w_k = exp(-(k - 1) / gamma)`` (arXiv 2602.06036, SpecForge ``loss_decay_gamma``; gamma 7 for
  B = 16), ``w_0 = 0``; the loss is the weighted mean of the cross-entropies over the whole batch.

A batch (:class:`Batch`) right-pads its sequences to the longest and their block lists to the most anchors
(padding blocks have weight 0 and see no context). All blocks of all sequences run in one pass: the block
queries of sequence ``s`` attend to ``s``'s context keys before their anchor plus the keys of their own block
(non-causally, or causally in layers where :meth:`DFlashDraftConfig.layer_is_causal` says so), never to
another block or sequence. The attention is a joint softmax over [context keys | own-block keys], so its
cost is ``bs x N*B x (S + B)``, not ``N*B x (S + N*B)`` as one flat masked attention over all blocks would
be (which is why it is written with einsums and not ``scaled_dot_product_attention``). The loss and the
accuracy counts stay on the device: nothing here reads a tensor back to the host. No SGLang here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

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
    """Anchored blocks, block size ``B``: of one sequence (leading shape ``[N]``) or of a batch (``[bs, N]``).

    Invariant: ``input_ids[..., 0] == tokens[anchors]``, the rest ``mask_token_id``; ``positions[..., j, :] =
    anchors[..., j] + arange(B)``; ``labels[..., j, k] = tokens[anchors[..., j] + k]`` for 1 <= k and in range,
    else ``IGNORE``; ``weights`` is 0 exactly where ``labels`` is ``IGNORE``. A batch's padding blocks have
    anchor 0 (no visible context), positions 0, all labels ``IGNORE``.
    """

    anchors: torch.Tensor  # [*, N] int64
    input_ids: torch.Tensor  # [*, N, B] int64
    positions: torch.Tensor  # [*, N, B] int64
    labels: torch.Tensor  # [*, N, B] int64
    weights: torch.Tensor  # [*, N, B] fp32

    def to(self, device: torch.device) -> Blocks:
        return Blocks(*(t.to(device, non_blocking=True) for t in
                        (self.anchors, self.input_ids, self.positions, self.labels, self.weights)))


def build_blocks(tokens: torch.Tensor, anchors: torch.Tensor, block_size: int, mask_token_id: int,
                 gamma: float | None) -> Blocks:
    """tokens: [S] int64; anchors: [N] int64 -> :class:`Blocks` of one sequence."""
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


@dataclass
class Batch:
    """Sequences right-padded to the longest, and their blocks padded to the most anchors.

    Invariant: ``tokens[s, :lengths[s]]`` is sequence ``s`` (0 after it), ``attention_mask[s, p] == (p <
    lengths[s])``; ``blocks`` has leading shape ``[bs, N]`` and sequence ``s``'s real blocks first.
    """

    tokens: torch.Tensor  # [bs, S] int64
    attention_mask: torch.Tensor  # [bs, S] int64, 1 on real tokens
    blocks: Blocks

    def to(self, device: torch.device) -> Batch:
        return Batch(self.tokens.to(device, non_blocking=True), self.attention_mask.to(device, non_blocking=True),
                     self.blocks.to(device))


def build_batch(sequences: Sequence[torch.Tensor], anchors: Sequence[torch.Tensor], block_size: int,
                mask_token_id: int, gamma: float | None) -> Batch:
    """sequences: [S_s] int64 each; anchors: [N_s] int64 each (maybe empty) -> :class:`Batch`."""
    per_seq = [build_blocks(t, a, block_size, mask_token_id, gamma) for t, a in zip(sequences, anchors)]

    def pad(name: str, value: float) -> torch.Tensor:
        return pad_sequence([getattr(b, name) for b in per_seq], batch_first=True, padding_value=value)

    blocks = Blocks(pad("anchors", 0), pad("input_ids", mask_token_id), pad("positions", 0),
                    pad("labels", IGNORE), pad("weights", 0.0))
    tokens = pad_sequence(list(sequences), batch_first=True, padding_value=0)
    mask = pad_sequence([torch.ones_like(t) for t in sequences], batch_first=True, padding_value=0)
    return Batch(tokens, mask, blocks)


def context_mask(anchors: torch.Tensor, block_size: int, seq_len: int,
                 sliding_window: int | None = None) -> torch.Tensor:
    """anchors: [*, N] -> [*, N * B, S] bool: block query (j, k) sees context position p iff p < anchors[j]
    (and, with a sliding window W, ``anchors[j] + k - p < W``, as :func:`block_attention_mask` counts it)."""
    offsets = torch.arange(block_size, device=anchors.device)
    query_pos = (anchors[..., None] + offsets).flatten(-2)[..., None]
    key_pos = torch.arange(seq_len, device=anchors.device)
    visible = key_pos < anchors.repeat_interleave(block_size, dim=-1)[..., None]
    if sliding_window is not None:
        visible &= (query_pos - key_pos) < sliding_window
    return visible


def layer_forward(layer, hidden: torch.Tensor, positions: torch.Tensor, context: torch.Tensor,
                  context_positions: torch.Tensor, ctx_visible: torch.Tensor, blk_visible: torch.Tensor
                  ) -> torch.Tensor:
    """One drafter layer over all blocks of a batch.

    Args:
        hidden: [bs, N, B, H] block rows; positions: [bs, N, B] int64.
        context: [bs, S, H] projected context features; context_positions: [bs, S] int64.
        ctx_visible: [bs, N, B, S] bool; blk_visible: [B, B] bool (the same for every block).
    Returns:
        [bs, N, B, H].
    """
    attn = layer.self_attn
    heads, kv_heads, head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
    bs, num_blocks, block_size, width = hidden.shape
    seq_len = context.shape[1]
    x = layer.input_layernorm(hidden).reshape(-1, width)
    flat_positions = positions.reshape(-1)
    q = attn.q_norm(attn.q_proj(x).view(-1, heads, head_dim))
    cos, sin = rope_cos_sin(flat_positions, head_dim, attn.rope_theta, q.dtype)
    q = apply_rope(q, cos, sin)
    k_blk, v_blk = attn.key_value(x, flat_positions)
    k_ctx, v_ctx = attn.key_value(context.reshape(-1, width), context_positions.reshape(-1))
    groups = heads // kv_heads
    blk_shape, ctx_shape = (bs, num_blocks, block_size, heads, head_dim), (bs, seq_len, heads, head_dim)
    q = q.float().view(blk_shape)
    k_blk, v_blk = (t.repeat_interleave(groups, dim=1).float().view(blk_shape) for t in (k_blk, v_blk))
    k_ctx, v_ctx = (t.repeat_interleave(groups, dim=1).float().view(ctx_shape) for t in (k_ctx, v_ctx))
    scale = head_dim ** -0.5
    scores_ctx = torch.einsum("snqhd,skhd->shnqk", q, k_ctx) * scale  # [bs, h, N, B, S]
    scores_ctx = scores_ctx.masked_fill(~ctx_visible[:, None], float("-inf"))
    scores_blk = torch.einsum("snqhd,snkhd->shnqk", q, k_blk) * scale  # [bs, h, N, B, B]
    scores_blk = scores_blk.masked_fill(~blk_visible, float("-inf"))
    p_ctx, p_blk = torch.cat([scores_ctx, scores_blk], dim=-1).softmax(dim=-1).split([seq_len, block_size], -1)
    out = torch.einsum("shnqk,skhd->snqhd", p_ctx, v_ctx) + torch.einsum("shnqk,snkhd->snqhd", p_blk, v_blk)
    hidden = hidden + attn.o_proj(out.reshape(bs, num_blocks, block_size, heads * head_dim).to(hidden.dtype))
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


LayerForward = Callable[..., torch.Tensor]


def drafter_block_hidden(drafter: DFlashDrafter, noise_embedding: torch.Tensor, blocks: Blocks,
                         target_features: torch.Tensor, forward: LayerForward = layer_forward) -> torch.Tensor:
    """The drafter's final hidden states of every block row of a batch, all blocks in one pass.

    Args:
        noise_embedding: [bs, N, B, H], the target's embeddings of ``blocks.input_ids`` (times the config's scale).
        blocks: a batch's blocks (leading shape [bs, N]).
        target_features: [bs, S, len(target_layer_ids) * H], the target's concatenated features.
        forward: :func:`layer_forward` or a compiled wrapper of it.
    Returns:
        [bs, N, B, H], equal (up to rounding) to running :meth:`DFlashDrafter.forward` block by block with the
        context ``target_features[s, :anchor]``.
    """
    config = drafter.config
    bs, num_blocks, block_size = blocks.input_ids.shape
    seq_len = target_features.shape[1]
    context = drafter.project_context(target_features)
    context_positions = torch.arange(seq_len, device=target_features.device).expand(bs, seq_len)
    local = torch.arange(block_size, device=target_features.device)
    ctx_masks: dict[int | None, torch.Tensor] = {}
    hidden = noise_embedding
    for i, layer in enumerate(drafter.layers):
        window = config.layer_sliding_window(i)
        if window not in ctx_masks:
            ctx_masks[window] = context_mask(blocks.anchors, block_size, seq_len, window).view(
                bs, num_blocks, block_size, seq_len)
        blk_visible = block_attention_mask(local, local, config.layer_is_causal(i), window)
        hidden = forward(layer, hidden, blocks.positions, context, context_positions, ctx_masks[window], blk_visible)
    return drafter.norm(hidden)


@dataclass
class LossParts:
    """Device scalars summed over a batch's blocks; the batch's loss is :meth:`loss`."""

    weighted_ce: torch.Tensor  # fp32, differentiable
    weight: torch.Tensor  # fp32
    num_correct: torch.Tensor  # int64: argmax == label among the scored rows
    num_scored: torch.Tensor  # int64
    num_first_correct: torch.Tensor  # int64: row 1 (the first draft) correct
    num_blocks: torch.Tensor  # int64: real (not padding) blocks

    def loss(self) -> torch.Tensor:
        """``weighted_ce / weight`` (0 for a batch without a scored row)."""
        return self.weighted_ce / self.weight.clamp(min=torch.finfo(torch.float32).tiny)


def batch_loss(drafter: DFlashDrafter, embedding: torch.Tensor, lm_head: torch.Tensor, blocks: Blocks,
               target_features: torch.Tensor, forward: LayerForward = layer_forward) -> LossParts:
    """Weighted cross-entropy sums of a batch's blocks (see the module docstring); no host synchronisation.

    Args:
        embedding: [V, H] the target's input embedding table (frozen).
        lm_head: [V, H] the target's LM head (frozen).
        blocks: a batch's blocks (leading shape [bs, N]); target_features: [bs, S, F].
    """
    config = drafter.config
    scale = config.input_embedding_scale if config.input_embedding_scale is not None else 1.0
    noise = F.embedding(blocks.input_ids, embedding) * scale
    dtype = drafter.fc.weight.dtype if not torch.is_autocast_enabled() else noise.dtype
    hidden = drafter_block_hidden(drafter, noise.to(dtype), blocks, target_features.to(dtype), forward)
    # NOTE: row 0 (the anchor) is never scored (w_0 = 0): a fixed slice instead of a data-dependent selection;
    # rows past a sequence's end and padding blocks carry weight 0 and label IGNORE (CE 0).
    logits = drafter.compute_logits(hidden[:, :, 1:].to(lm_head.dtype), lm_head)  # [bs, N, B-1, V] fp32
    labels, weights = blocks.labels[:, :, 1:], blocks.weights[:, :, 1:]
    ce = F.cross_entropy(logits.flatten(0, -2), labels.flatten(), reduction="none", ignore_index=IGNORE)
    with torch.no_grad():
        scored = weights > 0
        correct = (logits.argmax(dim=-1) == labels) & scored
    return LossParts((ce * weights.flatten()).sum(), weights.sum(), correct.sum(), scored.sum(),
                     correct[..., 0].sum(), scored[..., 0].sum())
