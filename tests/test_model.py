# SPDX-License-Identifier: Apache-2.0
"""DFlashDrafter against an independent, deliberately plain re-implementation of the drafter math in
/work/shared/dflash-notes.md (the z-lab reference's structure: context and block K/V concatenated before
k_norm, RoPE at absolute positions, non-causal attention inside the block, sliding-window layers causal)."""

from __future__ import annotations

import math

import pytest
import torch

from dflash_sglang.core.config import DFlashDraftConfig
from dflash_sglang.core.model import DFlashDrafter, DraftAttention

pytestmark = pytest.mark.usefixtures("single_thread")

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTERMEDIATE, VOCAB = 24, 4, 2, 8, 40, 50


def _config(**overrides) -> DFlashDraftConfig:
    raw = {
        "architectures": ["DFlashDraftModel"], "hidden_size": HIDDEN, "num_hidden_layers": 2,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM,
        "intermediate_size": INTERMEDIATE, "vocab_size": VOCAB, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "dflash_config": {"block_size": 4, "mask_token_id": 3, "target_layer_ids": [0, 2, 3]},
    }
    raw.update(overrides)
    return DFlashDraftConfig.from_dict(raw)


CONFIGS = {
    "full-gqa": _config(),
    "mha": _config(num_key_value_heads=HEADS),
    # layer 0 slides (causal by default), layer 1 is full (non-causal); window smaller than context + block.
    "sliding-causal": _config(layer_types=["sliding_attention", "full_attention"], sliding_window=3),
    "explicit-causal": _config(is_causal=True),
    "sliding-non-causal": _config(layer_types=["sliding_attention"] * 2, sliding_window=5, is_causal=False),
}


def _random_drafter(config: DFlashDraftConfig, seed: int = 0) -> DFlashDrafter:
    generator = torch.Generator().manual_seed(seed)
    drafter = DFlashDrafter(config)
    with torch.no_grad():
        for name, param in drafter.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            # Norm weights around one (but not one, so a misplaced norm shows), projections ~ 1/sqrt(fan_in).
            param.copy_(1 + 0.3 * noise if name.endswith("norm.weight") else noise / math.sqrt(param.shape[-1]))
    return drafter.eval()


# ------------------------------------------------------------------------------------------------------
# The independent reference: whole sequences, explicit loops for heads and masks.
def _rms_norm(x, weight, eps):
    return weight * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x, positions, theta):
    """x: [n, heads, d]; rotate-half RoPE, frequencies theta^(-2i/d)."""
    d = x.shape[-1]
    out = torch.empty_like(x)
    for i in range(d // 2):
        angle = positions.double() * theta ** (-2.0 * i / d)
        cos, sin = torch.cos(angle)[:, None].to(x.dtype), torch.sin(angle)[:, None].to(x.dtype)
        a, b = x[..., i], x[..., i + d // 2]
        out[..., i] = a * cos - b * sin
        out[..., i + d // 2] = b * cos + a * sin
    return out


def _visible(query_pos: int, key_pos: int, causal: bool, window: int | None) -> bool:
    if causal and key_pos > query_pos:
        return False
    if window is not None and (query_pos - key_pos >= window or (not causal and key_pos - query_pos >= window)):
        return False
    return True


def _reference_forward(drafter: DFlashDrafter, features, noise, context_positions, block_positions):
    """features: [C, F]; noise: [B, hidden] -> [B, hidden]."""
    config = drafter.config
    p = {name: t.detach() for name, t in drafter.state_dict().items()}
    eps, d = config.rms_norm_eps, config.head_dim
    target_hidden = _rms_norm(features @ p["fc.weight"].T, p["hidden_norm.weight"], eps)
    key_positions = torch.cat([context_positions, block_positions])
    h = noise
    for l in range(config.num_hidden_layers):
        w = lambda name: p[f"layers.{l}.{name}.weight"]  # noqa: E731
        causal = config.is_causal if config.is_causal is not None else config.layer_types[l] == "sliding_attention"
        window = config.sliding_window if config.layer_types[l] == "sliding_attention" else None
        x = _rms_norm(h, w("input_layernorm"), eps)
        q = _rms_norm((x @ w("self_attn.q_proj").T).view(len(x), -1, d), w("self_attn.q_norm"), eps)
        both = torch.cat([target_hidden, x])  # context rows, then block rows
        k = _rms_norm((both @ w("self_attn.k_proj").T).view(len(both), -1, d), w("self_attn.k_norm"), eps)
        v = (both @ w("self_attn.v_proj").T).view(len(both), -1, d)
        q, k = _rope(q, block_positions, config.rope_theta), _rope(k, key_positions, config.rope_theta)
        visible = torch.tensor([[_visible(qp, kp, causal, window) for kp in key_positions.tolist()]
                                for qp in block_positions.tolist()])
        heads = []
        for head in range(config.num_attention_heads):
            kv = head // (config.num_attention_heads // config.num_key_value_heads)
            scores = (q[:, head] @ k[:, kv].T / math.sqrt(d)).masked_fill(~visible, float("-inf"))
            heads.append(torch.softmax(scores, dim=-1) @ v[:, kv])
        h = h + torch.cat(heads, dim=-1) @ w("self_attn.o_proj").T
        x = _rms_norm(h, w("post_attention_layernorm"), eps)
        gate, up = x @ w("mlp.gate_proj").T, x @ w("mlp.up_proj").T
        h = h + (torch.nn.functional.silu(gate) * up) @ w("mlp.down_proj").T
    return _rms_norm(h, p["norm.weight"], eps)


def _inputs(config: DFlashDraftConfig, num_context: int, block: int, start: int = 0, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(num_context, config.num_context_features, generator=generator)
    noise = torch.randn(block, config.hidden_size, generator=generator)
    context_positions = torch.arange(start, start + num_context)
    block_positions = torch.arange(start + num_context, start + num_context + block)
    return features, noise, context_positions, block_positions


# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("num_context, block", [(1, 2), (7, 4), (13, 16)])
def test_drafter_matches_reference(name, num_context, block):
    drafter = _random_drafter(CONFIGS[name])
    features, noise, context_positions, block_positions = _inputs(drafter.config, num_context, block, start=3)
    with torch.no_grad():
        context = drafter.context_kv(features, context_positions)
        got = drafter(noise, block_positions, context, context_positions)
    expected = _reference_forward(drafter, features, noise, context_positions, block_positions)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_context_kv_is_per_token():
    """Context K/V computed in chunks (as the decoder extends it) equal one call over all tokens."""
    drafter = _random_drafter(CONFIGS["full-gqa"])
    features, _, positions, _ = _inputs(drafter.config, 9, 1)
    with torch.no_grad():
        whole = drafter.context_kv(features, positions)
        parts = [drafter.context_kv(features[a:b], positions[a:b]) for a, b in ((0, 4), (4, 5), (5, 9))]
    for layer, (k, v) in enumerate(whole):
        assert k.shape == (9, KV_HEADS, HEAD_DIM) and v.shape == (9, KV_HEADS, HEAD_DIM)
        torch.testing.assert_close(torch.cat([part[layer][0] for part in parts]), k)
        torch.testing.assert_close(torch.cat([part[layer][1] for part in parts]), v)


def _block_outputs_before_and_after_changing_the_last_row(config_name: str):
    """The drafter's outputs for a 4-row block, and again with the last row's input changed."""
    drafter = _random_drafter(CONFIGS[config_name])
    features, noise, context_positions, block_positions = _inputs(drafter.config, 5, 4)
    with torch.no_grad():
        context = drafter.context_kv(features, context_positions)
        full = drafter(noise, block_positions, context, context_positions)
        changed = noise.clone()
        changed[3] += 1.0
        other = drafter(changed, block_positions, context, context_positions)
    return full, other


def test_block_rows_do_not_depend_on_later_rows_when_causal():
    full, other = _block_outputs_before_and_after_changing_the_last_row("explicit-causal")
    torch.testing.assert_close(full[:3], other[:3])
    assert not torch.allclose(full[3], other[3])


def test_non_causal_block_rows_see_the_whole_block():
    full, other = _block_outputs_before_and_after_changing_the_last_row("full-gqa")
    assert not torch.allclose(full[0], other[0])


# Context at positions 0..5, block at 6..9; layer 0 slides with window 3, layer 1 is full.
@pytest.mark.parametrize("layer_id, is_causal, expected", [
    (0, None, [5.0, 6.0, 7.0, 8.0]),  # sliding, causal by default: p sees p-2, p-1, p
    (0, False, [6.0, 7.0, 7.5, 8.0]),  # sliding, non-causal: |p - k| <= 2, both ways
    (1, None, [4.5] * 4),  # full, non-causal by default: all of 0..9
    (1, True, [3.0, 3.5, 4.0, 4.5]),  # full, causal: 0..p
], ids=["sliding-default", "sliding-explicit-non-causal", "full-default", "full-explicit-causal"])
def test_attention_window_closed_form(layer_id, is_causal, expected):
    """With zero queries every visible key scores the same, so a query's output is the mean of its visible
    values; each value is its key's position. The window (3) counts the query itself and is shorter than
    the context, so the expected means name exactly which keys each block query sees."""
    overrides = {} if is_causal is None else {"is_causal": is_causal}
    config = _config(hidden_size=2, num_attention_heads=1, num_key_value_heads=1, head_dim=2,
                     layer_types=["sliding_attention", "full_attention"], sliding_window=3, **overrides)
    attention = DraftAttention(config, layer_id)
    with torch.no_grad():
        for proj in (attention.q_proj, attention.k_proj):
            proj.weight.zero_()
        for proj in (attention.v_proj, attention.o_proj):
            proj.weight.copy_(torch.eye(2))
        context_positions, block_positions = torch.arange(6), torch.arange(6, 10)
        as_rows = lambda positions: torch.stack([positions.float(), torch.zeros(len(positions))], dim=-1)  # noqa: E731
        context_k = torch.zeros(6, 1, 2)
        out = attention(as_rows(block_positions), block_positions, context_k, as_rows(context_positions)[:, None],
                        context_positions)
    torch.testing.assert_close(out[:, 0], torch.tensor(expected))
    torch.testing.assert_close(out[:, 1], torch.zeros(4))


@pytest.mark.parametrize("multiplier, cap", [(None, None), (0.5, None), (None, 2.0), (0.25, 3.0)])
def test_compute_logits(multiplier, cap):
    dflash = {"block_size": 4, "mask_token_id": 3, "target_layer_ids": [0, 2, 3]}
    if multiplier is not None:
        dflash["output_multiplier"] = multiplier
    if cap is not None:
        dflash["final_logit_softcapping"] = cap
    drafter = _random_drafter(_config(dflash_config=dflash))
    generator = torch.Generator().manual_seed(2)
    hidden = torch.randn(5, HIDDEN, generator=generator)
    lm_head = torch.randn(VOCAB, HIDDEN, generator=generator)
    expected = hidden @ lm_head.T * (1.0 if multiplier is None else multiplier)
    if cap is not None:
        expected = cap * torch.tanh(expected / cap)
    torch.testing.assert_close(drafter.compute_logits(hidden, lm_head), expected, rtol=1e-5, atol=1e-5)
