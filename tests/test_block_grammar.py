# SPDX-License-Identifier: Apache-2.0
"""``serving/block_grammar.py`` on SGLang's own xgrammar grammar objects over the tiny tokenizer (no server):
every redrawn draft is allowed, verify row j's mask is the grammar's state after the first j drafts, the
grammar leaves the walk as it came, requests without a grammar keep their drafts, the verify rows are
masked exactly where the bitmask says, a step's budget ends at the draft that terminates the grammar, and
sampled drafts come from the masked distribution that replaces their ``draft_probs`` rows. Also the request
rule: grammars are served on backends whose grammars roll back and refused on the others."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from dflash_sglang.serving.block_grammar import constrain_drafts
from dflash_sglang.serving.request_rules import unsupported_features

BLOCK_SIZE = 8


@pytest.fixture(scope="module")
def backend(tiny_checkpoints):
    from sglang.srt.constrained.xgrammar_backend import XGrammarGrammarBackend
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoints["target"])
    vocab_size = AutoConfig.from_pretrained(tiny_checkpoints["target"]).vocab_size
    backend = XGrammarGrammarBackend(tokenizer, vocab_size=vocab_size, model_eos_token_ids=[tokenizer.eos_token_id])
    backend.vocab_size, backend.eos = vocab_size, tokenizer.eos_token_id
    return backend


def _batch(backend, grammars: list, temperature: float | None = None):
    """A ModelWorkerBatch's fields the walk reads; ``temperature`` None: an all-greedy batch."""
    bs = len(grammars)
    sampling = SimpleNamespace(vocab_size=backend.vocab_size, temperatures=torch.full((bs, 1), temperature or 1.0),
                               top_ps=torch.ones(bs), top_ks=torch.zeros(bs, dtype=torch.int32))
    return SimpleNamespace(reqs=[SimpleNamespace(grammar=g) for g in grammars], sampling_info=sampling)


def _allowed(mask: torch.Tensor, token: int) -> bool:
    return bool((int(mask[token // 32]) >> (token % 32)) & 1)


def _mask_now(backend, grammar) -> torch.Tensor:
    mask = torch.full((1, (backend.vocab_size + 31) // 32), -1, dtype=torch.int32)
    grammar.fill_vocab_mask(mask, 0)
    return mask[0]


def _replay(backend, grammar, drafts: list[int]) -> list[torch.Tensor]:
    """The masks a fresh copy of ``grammar`` gives after each prefix of ``drafts`` (asserting each is allowed)."""
    replay, masks = grammar.copy(), []
    for token in drafts:
        masks.append(_mask_now(backend, replay))
        assert _allowed(masks[-1], token), token
        replay.accept_token(token)
    masks.append(_mask_now(backend, replay))
    return masks


def test_greedy_walk_masks_every_row_and_restores_the_grammar(backend):
    grammar = backend.dispatch_regex("(cat|dog)( (cat|dog))*")
    vocab = backend.vocab_size
    draft_logits = torch.randn(2, BLOCK_SIZE - 1, vocab + 3, generator=torch.Generator().manual_seed(0))
    block = torch.randint(0, vocab, (2, BLOCK_SIZE))
    unconstrained = block[1].clone()
    before = _mask_now(backend, grammar)

    step = constrain_drafts(_batch(backend, [grammar, None]), draft_logits, block, None)

    assert step.batch_indices == [0] and step.token_caps is None
    drafts = block[0, 1:].tolist()
    assert [torch.equal(a, b) for a, b in zip(_replay(backend, grammar, drafts), step.masks[0])] == [True] * BLOCK_SIZE
    for j, draft in enumerate(drafts):  # the argmax of the drafter's masked row
        allowed = [t for t in range(vocab) if _allowed(step.masks[0, j], t)]
        assert draft == max(allowed, key=lambda t: draft_logits[0, j, t])
    assert torch.equal(block[1], unconstrained), "a request without a grammar keeps its drafts"
    assert torch.equal(_mask_now(backend, grammar), before) and grammar.accepted_tokens == []

    target_logits = torch.randn(2 * BLOCK_SIZE, vocab)
    expected = target_logits.clone()
    for j in range(BLOCK_SIZE):
        for t in range(vocab):
            if not _allowed(step.masks[0, j], t):
                expected[j, t] = float("-inf")
    budgets = torch.tensor([100, 100])
    assert torch.equal(step.constrain_verify(target_logits, budgets), budgets)
    assert torch.equal(target_logits, expected)


def test_a_step_ends_at_the_draft_that_terminates_the_grammar(backend):
    grammar = backend.dispatch_regex("cat")  # a few tokens, then only the stop token is allowed
    draft_logits = torch.zeros(1, BLOCK_SIZE - 1, backend.vocab_size)
    block = torch.zeros(1, BLOCK_SIZE, dtype=torch.int64)
    step = constrain_drafts(_batch(backend, [grammar]), draft_logits, block, None)
    drafts = block[0, 1:].tolist()
    end = drafts.index(backend.eos) + 1  # block position of the draft that terminates the grammar
    assert int(step.token_caps[0]) == end
    assert torch.equal(step.masks[0, end:], torch.full_like(step.masks[0, end:], -1)), "unmasked after termination"
    assert torch.equal(step.constrain_verify(torch.zeros(BLOCK_SIZE, backend.vocab_size), torch.tensor([50])),
                       torch.tensor([end]))
    assert not grammar.is_terminated()

    for token in drafts[:end]:  # a grammar terminated before the step: one token, then SGLang finishes
        grammar.accept_token(token)
    assert int(constrain_drafts(_batch(backend, [grammar]), draft_logits, block, None).token_caps[0]) == 1


def test_sampled_drafts_come_from_the_masked_distribution(backend):
    grammar = backend.dispatch_regex(r"(yes|no)(, (yes|no)){12}\.")  # longer than a block
    vocab = backend.vocab_size
    draft_logits = torch.randn(1, BLOCK_SIZE - 1, vocab + 3, generator=torch.Generator().manual_seed(1))
    block = torch.zeros(1, BLOCK_SIZE, dtype=torch.int64)
    draft_probs = torch.full((BLOCK_SIZE - 1, vocab + 3), 1.0 / vocab)  # a padded head: 3 more columns
    step = constrain_drafts(_batch(backend, [grammar], temperature=0.7), draft_logits, block, draft_probs)
    drafts = block[0, 1:].tolist()
    assert step.token_caps is None, "the grammar does not terminate within the block"
    _replay(backend, grammar, drafts)
    for j, draft in enumerate(drafts):
        allowed = torch.tensor([_allowed(step.masks[0, j], t) for t in range(vocab)])
        expected = torch.softmax(draft_logits[0, j, :vocab].masked_fill(~allowed, float("-inf")) / 0.7, dim=-1)
        torch.testing.assert_close(draft_probs[j], torch.cat([expected, torch.zeros(3)]))
        assert draft_probs[j, draft] > 0


def test_grammars_served_only_on_backends_that_roll_back():
    params = {"json_schema": '{"type": "object"}', "regex": "a+"}
    assert unsupported_features(params) == []
    assert unsupported_features(params, grammar_backend="llguidance") == []
    refused = unsupported_features(params, grammar_backend="outlines")
    assert len(refused) == 2 and all("--grammar-backend outlines" in item for item in refused)
