# SPDX-License-Identifier: Apache-2.0
"""The DFlash training objective held to hand-computed cases and to a slow block-by-block re-implementation
that runs the drafter exactly as the reference decoder does (one block, context = features before the anchor),
for one sequence and for a padded batch of sequences of different lengths (loss and gradients)."""

import math

import pytest
import torch
import torch.nn.functional as F

from dflash_sglang.core.model import DFlashDrafter
from dflash_sglang.testing.tiny import drafter_config, random_drafter
from torch.nn.utils.rnn import pad_sequence

from dflash_sglang.training.objective import (IGNORE, LossParts, batch_loss, build_batch, build_blocks, context_mask,
                                              drafter_block_hidden, position_weights, sample_anchors)

pytestmark = pytest.mark.usefixtures("single_thread")


def test_position_weights_by_hand():
    w = position_weights(4, 7.0)
    assert w.tolist() == pytest.approx([0.0, 1.0, math.exp(-1 / 7), math.exp(-2 / 7)])
    assert position_weights(3, None).tolist() == [0.0, 1.0, 1.0]


def test_anchor_sampling_is_seeded_distinct_sorted_and_in_the_response():
    def draw(seed):
        return sample_anchors(20, 6, 5, torch.Generator().manual_seed(seed))

    a = draw(3)
    assert torch.equal(a, draw(3))
    assert not torch.equal(a, draw(4))
    assert a.tolist() == sorted(set(a.tolist())) and len(a) == 5
    assert 6 <= int(a.min()) and int(a.max()) <= 18  # at least one label after the anchor
    everything = sample_anchors(20, 6, 100, torch.Generator().manual_seed(0))
    assert everything.tolist() == list(range(6, 19))
    assert sample_anchors(7, 6, 4, torch.Generator()).numel() == 0  # the response's last token predicts nothing


def test_blocks_by_hand():
    tokens = torch.tensor([10, 11, 12, 13, 14, 15])
    blocks = build_blocks(tokens, torch.tensor([2, 4]), block_size=3, mask_token_id=99, gamma=7.0)
    assert blocks.input_ids.tolist() == [[12, 99, 99], [14, 99, 99]]
    assert blocks.positions.tolist() == [[2, 3, 4], [4, 5, 6]]
    assert blocks.labels.tolist() == [[IGNORE, 13, 14], [IGNORE, 15, IGNORE]]
    e = math.exp(-1 / 7)
    torch.testing.assert_close(blocks.weights, torch.tensor([[0, 1, e], [0, 1, 0]]))


def test_context_mask_by_hand():
    mask = context_mask(torch.tensor([1, 3]), block_size=2, seq_len=4)
    assert mask.int().tolist() == [[1, 0, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 0]]
    windowed = context_mask(torch.tensor([3]), block_size=2, seq_len=4, sliding_window=3)
    # query positions 3 and 4 see keys with q - k < 3 among those < 3
    assert windowed.int().tolist() == [[0, 1, 1, 0], [0, 0, 1, 0]]
    batched = context_mask(torch.tensor([[1, 3], [3, 0]]), block_size=2, seq_len=4)
    assert torch.equal(batched[0], mask) and batched[1, 2:].any().item() is False


def test_batch_pads_sequences_and_blocks():
    batch = build_batch([torch.tensor([10, 11, 12, 13, 14, 15]), torch.tensor([20, 21, 22])],
                        [torch.tensor([2, 4]), torch.tensor([1])], block_size=3, mask_token_id=99, gamma=None)
    assert batch.tokens.tolist() == [[10, 11, 12, 13, 14, 15], [20, 21, 22, 0, 0, 0]]
    assert batch.attention_mask.tolist() == [[1] * 6, [1, 1, 1, 0, 0, 0]]
    blocks = batch.blocks
    assert blocks.anchors.tolist() == [[2, 4], [1, 0]]
    assert blocks.input_ids.tolist() == [[[12, 99, 99], [14, 99, 99]], [[21, 99, 99], [99, 99, 99]]]
    assert blocks.labels[1].tolist() == [[IGNORE, 22, IGNORE], [IGNORE] * 3]
    assert blocks.weights[1].tolist() == [[0, 1, 0], [0, 0, 0]]


def _tiny_setup(seed=0, layer_types=None, is_causal=None):
    vocab, hidden = 64, 32
    ids = {"<|endoftext|>": 1, "<|im_end|>": 2}
    config = drafter_config(vocab, 63, ids, 4, hidden_size=hidden, num_target_layers=4, head_dim=8)
    if layer_types is not None or is_causal is not None:
        raw = dict(config.raw)
        if layer_types is not None:
            raw.update(layer_types=layer_types, sliding_window=3)
        if is_causal is not None:
            raw["is_causal"] = is_causal
        config = type(config).from_dict(raw)
    g = torch.Generator().manual_seed(seed)
    drafter = random_drafter(config, g).float()
    embedding = torch.randn(vocab, hidden, generator=g)
    lm_head = torch.randn(vocab, hidden, generator=g)
    tokens = torch.randint(0, 60, (13,), generator=g)
    features = torch.randn(13, config.num_context_features, generator=g)
    return drafter, embedding, lm_head, tokens, features


def _one_sequence(drafter, embedding, lm_head, tokens, features, anchors, gamma=7.0) -> LossParts:
    """The objective on a batch of one sequence."""
    batch = build_batch([tokens], [anchors], drafter.config.block_size, drafter.config.mask_token_id, gamma)
    return batch_loss(drafter, embedding, lm_head, batch.blocks, features[None])


def _slow_sums(drafter: DFlashDrafter, embedding, lm_head, tokens, features, anchors, gamma):
    """Block by block, as the reference decoder runs the drafter; CE per row by hand from log-softmax.
    Returns (weighted CE sum, weight sum)."""
    config = drafter.config
    block_size = config.block_size
    total, weight_sum = torch.zeros(()), 0.0
    for a in anchors.tolist():
        block = torch.full((block_size,), config.mask_token_id)
        block[0] = tokens[a]
        positions = torch.arange(a, a + block_size)
        context = drafter.context_kv(features[:a], torch.arange(a))
        hidden = drafter(F.embedding(block, embedding), positions, context, torch.arange(a))
        logprobs = drafter.compute_logits(hidden, lm_head).log_softmax(-1)
        for k in range(1, block_size):
            if a + k < len(tokens):
                w = math.exp(-(k - 1) / gamma)
                total = total - w * logprobs[k, tokens[a + k]]
                weight_sum += w
    return total, weight_sum


@pytest.mark.parametrize("variant", ["non-causal", "sliding-causal", "all-causal"])
def test_one_pass_loss_equals_block_by_block(variant):
    kwargs = {"non-causal": {}, "sliding-causal": {"layer_types": ["sliding_attention", "full_attention"]},
              "all-causal": {"is_causal": True}}[variant]
    drafter, embedding, lm_head, tokens, features = _tiny_setup(**kwargs)
    anchors = torch.tensor([3, 4, 8, 11])  # the last block runs past the end: 1 label
    blocks = build_blocks(tokens, anchors, drafter.config.block_size, drafter.config.mask_token_id, 7.0)
    parts = _one_sequence(drafter, embedding, lm_head, tokens, features, anchors)
    slow, slow_weight = _slow_sums(drafter, embedding, lm_head, tokens, features, anchors, 7.0)
    torch.testing.assert_close(parts.loss(), slow / slow_weight, rtol=1e-5, atol=1e-5)
    assert parts.num_scored == 3 * 3 + 1 and parts.num_blocks == 4
    # hidden states of every row match too (row 0 included)
    noise = F.embedding(blocks.input_ids, embedding)
    hidden = drafter_block_hidden(drafter, noise[None], build_batch([tokens], [anchors], 4, 63, 7.0).blocks,
                                  features[None])[0]
    for j, a in enumerate(anchors.tolist()):
        ref = drafter(noise.view(4, 4, -1)[j], blocks.positions[j], drafter.context_kv(features[:a], torch.arange(a)),
                      torch.arange(a))
        torch.testing.assert_close(hidden[j], ref, rtol=1e-5, atol=1e-5)


def test_loss_value_on_a_hand_made_case():
    """A drafter whose final norm is zero gives all-zero logits: CE = log V on every scored row."""
    drafter, embedding, lm_head, tokens, features = _tiny_setup()
    with torch.no_grad():
        drafter.norm.weight.zero_()
    parts = _one_sequence(drafter, embedding, lm_head, tokens, features, torch.tensor([5, 11]))
    e1, e2 = math.exp(-1 / 7), math.exp(-2 / 7)
    assert float(parts.weight) == pytest.approx((1 + e1 + e2) + 1)
    assert float(parts.weighted_ce.detach()) == pytest.approx(math.log(64) * float(parts.weight), rel=1e-5)


@pytest.mark.parametrize("variant", ["non-causal", "sliding-causal"])
def test_batch_loss_and_gradients_equal_the_per_sequence_sums(variant):
    """Sequences of different lengths and prompt lengths (one without anchors) in one padded batch: the loss and
    every gradient equal those of the block-by-block computation summed over the sequences."""
    kwargs = {"non-causal": {}, "sliding-causal": {"layer_types": ["sliding_attention", "full_attention"],
                                                   "is_causal": True}}[variant]
    drafter, embedding, lm_head, _, _ = _tiny_setup(**kwargs)
    g = torch.Generator().manual_seed(1)
    shapes = [(13, 3), (9, 6), (17, 2), (7, 6)]  # (length, prompt length); the last one has no anchor
    tokens = [torch.randint(0, 60, (n,), generator=g) for n, _ in shapes]
    features = [torch.randn(n, drafter.config.num_context_features, generator=g) for n, _ in shapes]
    anchors = [sample_anchors(n, p, 5, g) for n, p in shapes]
    assert [a.numel() for a in anchors] == [5, 2, 5, 0]

    batch = build_batch(tokens, anchors, drafter.config.block_size, drafter.config.mask_token_id, 7.0)
    padded = pad_sequence(features, batch_first=True, padding_value=1e3)  # padding must never be seen
    parts = batch_loss(drafter, embedding, lm_head, batch.blocks, padded)
    fast_grads = torch.autograd.grad(parts.loss(), list(drafter.parameters()))

    sums = [_slow_sums(drafter, embedding, lm_head, t, f, a, 7.0) for t, f, a in zip(tokens, features, anchors)]
    slow = sum(s for s, _ in sums) / sum(w for _, w in sums)
    slow_grads = torch.autograd.grad(slow, list(drafter.parameters()))
    torch.testing.assert_close(parts.loss(), slow, rtol=1e-5, atol=1e-5)
    for (name, _), fast_grad, slow_grad in zip(drafter.named_parameters(), fast_grads, slow_grads):
        torch.testing.assert_close(fast_grad, slow_grad, rtol=1e-4, atol=1e-6, msg=name)

    singles = [_one_sequence(drafter, embedding, lm_head, t, f, a) for t, f, a in zip(tokens, features, anchors)]
    with torch.no_grad():
        torch.testing.assert_close(parts.weighted_ce, sum(p.weighted_ce for p in singles), rtol=1e-5, atol=1e-5)
    for name in ("weight", "num_correct", "num_scored", "num_first_correct", "num_blocks"):
        assert torch.allclose(getattr(parts, name), sum(getattr(p, name) for p in singles)), name
    assert int(parts.num_blocks) == 12 and int(parts.num_scored) > 0


def test_batch_loss_reads_nothing_back_to_the_host():
    """No data-dependent op (``nonzero``, ``item``) in the loss, forward or backward: on a GPU nothing in it
    waits for the device."""
    drafter, embedding, lm_head, tokens, features = _tiny_setup()
    batch = build_batch([tokens, tokens[:9]], [torch.tensor([3, 8]), torch.tensor([4])], 4, 63, 7.0)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        parts = batch_loss(drafter, embedding, lm_head, batch.blocks, torch.stack([features, features]))
        parts.loss().backward()
    ops = {event.name for event in prof.events()}
    assert not ops & {"aten::nonzero", "aten::item", "aten::_local_scalar_dense", "aten::masked_select"}, ops
