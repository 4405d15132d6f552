# SPDX-License-Identifier: Apache-2.0
"""The reference speculative decoder on the tiny checkpoints: greedy output equals the target alone, token for
token, whatever the drafter; acceptance behaves as the tiny drafters are built to; stop tokens and the token
budget cut inside a block exactly where the target-only run stops; speculative sampling draws from the
target-only distribution."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dflash_sglang.core.checkpoint import load_drafter
from dflash_sglang.core.reference import ReferenceResult, generate, target_generate
from dflash_sglang.core.sampling import processed_probs

pytestmark = pytest.mark.usefixtures("single_thread")

TEXTS = ["Hello", "The cat walks to the market every morning.", "What is 12 plus 7?",
         "A paper boat near the sea, again and again, in the rain"]
SHORT = 16  # new tokens for the many drafter x block-size runs
LONG = 48  # new tokens for the acceptance measurements
DRAFTERS = ("drafter", "drafter-agree", "drafter-disagree")


@pytest.fixture(scope="module")
def target(tiny_checkpoints):
    return AutoModelForCausalLM.from_pretrained(tiny_checkpoints["target"], dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def drafters(tiny_checkpoints):
    return {name: load_drafter(tiny_checkpoints[name], dtype=torch.float32) for name in DRAFTERS}


@pytest.fixture(scope="module")
def prompts(tiny_checkpoints) -> list[list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoints["target"])
    return [tokenizer(text)["input_ids"] for text in TEXTS]  # ragged: 4, 9, 10, 14 tokens


@pytest.fixture(scope="module")
def baseline(target, prompts) -> list[list[int]]:
    """Target-only greedy continuations; without stops, shorter runs are their prefixes."""
    outputs = target_generate(target, prompts, max_new_tokens=LONG)
    # The test only means something if the target's output depends on its context: not one repeated token.
    assert any(len(set(out)) > 2 for out in outputs), outputs
    return outputs


def _check_invariants(result: ReferenceResult, block_size: int) -> None:
    assert result.num_verify_steps == len(result.acceptance_lengths)
    assert len(result.output_ids) == (1 if result.output_ids else 0) + sum(result.acceptance_lengths)
    assert all(1 <= a <= block_size for a in result.acceptance_lengths)


# ------------------------------------------------------------------------------------------------------
# Greedy: lossless.
@pytest.mark.parametrize("block_size", [4, 8, 16])
@pytest.mark.parametrize("name", DRAFTERS)
def test_greedy_equals_target_batch4(target, drafters, prompts, baseline, name, block_size):
    results = generate(target, drafters[name], prompts, max_new_tokens=SHORT, block_size=block_size)
    assert [r.output_ids for r in results] == [out[:SHORT] for out in baseline]
    for result in results:
        _check_invariants(result, block_size)
        if name == "drafter-disagree":
            assert result.acceptance_lengths == [1] * (SHORT - 1)


@pytest.mark.parametrize("name", DRAFTERS)
def test_greedy_equals_target_batch1(target, drafters, prompts, baseline, name):
    [result] = generate(target, drafters[name], prompts[3:], max_new_tokens=SHORT)  # drafter's block_size, 8
    assert result.output_ids == baseline[3][:SHORT]
    _check_invariants(result, 8)


def test_agreeing_drafter_accepts_long_blocks(target, drafters, prompts, baseline):
    results = generate(target, drafters["drafter-agree"], prompts, max_new_tokens=LONG, block_size=8)
    assert [r.output_ids for r in results] == baseline
    lengths = [a for r in results for a in r.acceptance_lengths]
    assert sum(lengths) / len(lengths) > 4, lengths
    assert 8 in lengths, lengths  # at least one full block: 7 accepted drafts + the bonus


def test_zero_and_one_token_budgets(target, drafters, prompts, baseline):
    assert generate(target, drafters["drafter"], prompts[:1], max_new_tokens=0)[0] == ReferenceResult([], [], 0)
    assert generate(target, drafters["drafter"], prompts[:1], max_new_tokens=1)[0] == ReferenceResult(
        baseline[0][:1], [], 0)
    assert target_generate(target, prompts[:1], max_new_tokens=0) == [[]]


class _SpyDrafter:
    """Records the context K/V each draft pass sees."""

    def __init__(self, drafter) -> None:
        self.config, self.fc, self.context_kv, self.compute_logits = (
            drafter.config, drafter.fc, drafter.context_kv, drafter.compute_logits)
        self._drafter, self.seen = drafter, []

    def __call__(self, noise, positions, context, context_positions):
        self.seen.append((int(positions[0]), context_positions.clone(), [(k.clone(), v.clone()) for k, v in context]))
        return self._drafter(noise, positions, context, context_positions)


def test_drafter_context_matches_full_recompute(target, drafters, prompts):
    """The incrementally extended context K/V equal the K/V of the target's features recomputed from scratch
    over prompt + output (greedy equality cannot see context bugs: the drafter only changes acceptance)."""
    spy = _SpyDrafter(drafters["drafter"])
    prompt = prompts[1]
    [result] = generate(target, spy, [prompt], max_new_tokens=12, block_size=4)
    with torch.no_grad():
        hidden = target(torch.tensor([prompt + result.output_ids]), output_hidden_states=True).hidden_states
    features = torch.cat([hidden[i + 1][0] for i in spy.config.target_layer_ids], dim=-1)
    assert len(spy.seen) == result.num_verify_steps >= 5
    starts = [start for start, _, _ in spy.seen]
    assert starts == sorted(set(starts)) and starts[-1] < len(prompt) + len(result.output_ids)
    for start, context_positions, context in spy.seen:
        assert torch.equal(context_positions, torch.arange(start))  # every token before the block, once
        with torch.no_grad():
            expected = spy.context_kv(features[:start], torch.arange(start))
        for (k, v), (expected_k, expected_v) in zip(context, expected):
            torch.testing.assert_close(k, expected_k, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(v, expected_v, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------------
# Cuts inside a block. An oracle drafter (a test double proposing the target's own continuation) makes
# every block a full accept, so a stop token or the budget falls strictly inside the block.
class _OracleDrafter:
    def __init__(self, drafter, prompt_len: int, continuation: list[int]) -> None:
        self.config, self.fc, self.context_kv = drafter.config, drafter.fc, drafter.context_kv
        self._drafter, self._prompt_len, self._continuation = drafter, prompt_len, continuation

    def __call__(self, noise, positions, context, context_positions):
        self._first = int(positions[0]) - self._prompt_len + 1  # output index of the first draft
        return self._drafter(noise, positions, context, context_positions)

    def compute_logits(self, hidden, lm_head):
        logits = torch.zeros(hidden.shape[0], lm_head.shape[0])
        for row in range(hidden.shape[0]):
            index = self._first + row
            logits[row, self._continuation[index] if index < len(self._continuation) else 0] = 1.0
        return logits


def _first_occurrences(tokens: list[int]) -> list[int]:
    return [i for i, token in enumerate(tokens) if i > 0 and token not in tokens[:i]]


def test_stop_token_inside_block(target, drafters, prompts, baseline):
    cut_inside = 0
    for prompt, continuation in zip(prompts, baseline):
        oracle = _OracleDrafter(drafters["drafter"], len(prompt), continuation)
        for k in _first_occurrences(continuation):
            stop = [continuation[k]]
            expected = continuation[:k + 1]
            assert target_generate(target, [prompt], max_new_tokens=LONG, stop_token_ids=stop) == [expected]
            [result] = generate(target, oracle, [prompt], max_new_tokens=LONG, block_size=8, stop_token_ids=stop)
            assert result.output_ids == expected
            _check_invariants(result, 8)
            assert result.acceptance_lengths[:-1] == [8] * (len(result.acceptance_lengths) - 1)
            cut_inside += result.acceptance_lengths[-1] < 8
            for name in ("drafter-agree", "drafter-disagree"):
                [result] = generate(target, drafters[name], [prompt], max_new_tokens=LONG, stop_token_ids=stop)
                assert result.output_ids == expected
    assert cut_inside >= 3


def test_stop_token_at_prefill(target, drafters, prompts, baseline):
    stop = [baseline[2][0]]
    [result] = generate(target, drafters["drafter-agree"], prompts[2:3], max_new_tokens=LONG, stop_token_ids=stop)
    assert result == ReferenceResult(stop, [], 0)


@pytest.mark.parametrize("max_new_tokens", [2, 5, 8, 9, 12, 17, 23])
def test_budget_inside_block(target, drafters, prompts, baseline, max_new_tokens):
    oracle = _OracleDrafter(drafters["drafter"], len(prompts[1]), baseline[1])
    [result] = generate(target, oracle, prompts[1:2], max_new_tokens=max_new_tokens, block_size=8)
    assert result.output_ids == baseline[1][:max_new_tokens]
    # Full blocks, then whatever the budget leaves: (max_new_tokens - 1) tokens after the prefill's first.
    full, rest = divmod(max_new_tokens - 1, 8)
    assert result.acceptance_lengths == [8] * full + ([rest] if rest else [])
    [result] = generate(target, drafters["drafter-agree"], prompts[1:2], max_new_tokens=max_new_tokens)
    assert result.output_ids == baseline[1][:max_new_tokens]


# ------------------------------------------------------------------------------------------------------
# Sampling: the first two tokens' joint distribution, against the exact target-only distribution.
TEMPERATURE, TOP_P, TOP_K = 16.0, 0.8, 3  # flat enough to spread over 2-3 tokens per step
NUM_SPECULATIVE, NUM_TARGET_ONLY = 500, 250
ALPHA = 1e-3  # chi-square false-alarm rate per check; the seeds are fixed, so the test is deterministic
MAX_TV = 0.12  # speculative vs target-only empirical total variation (sampling noise is ~0.04-0.06 here)


def _exact_two_token_distribution(target, prompt) -> dict[tuple[int, int], float]:
    with torch.no_grad():
        p1 = processed_probs(target(torch.tensor([prompt])).logits[0, -1:], TEMPERATURE, TOP_P, TOP_K)[0]
        exact = {}
        for a in p1.nonzero().flatten().tolist():
            logits = target(torch.tensor([prompt + [a]])).logits[0, -1:]
            p2 = processed_probs(logits, TEMPERATURE, TOP_P, TOP_K)[0]
            exact.update({(a, b): float(p1[a] * p2[b]) for b in p2.nonzero().flatten().tolist()})
    return exact


def _counts(outputs: list[list[int]]) -> dict[tuple[int, int], int]:
    counts: dict[tuple[int, int], int] = {}
    for out in outputs:
        counts[tuple(out)] = counts.get(tuple(out), 0) + 1
    return counts


def _assert_fits(counts: dict[tuple[int, int], int], exact: dict[tuple[int, int], float]) -> None:
    stats = pytest.importorskip("scipy.stats")
    assert set(counts) <= set(exact), f"samples outside the target's support: {set(counts) - set(exact)}"
    n = sum(counts.values())
    chi2 = sum((counts.get(cell, 0) - n * p) ** 2 / (n * p) for cell, p in exact.items())
    critical = stats.chi2.ppf(1 - ALPHA, df=len(exact) - 1)
    assert chi2 < critical, f"chi2 {chi2:.1f} >= {critical:.1f}; counts {counts}, exact {exact}"


def test_speculative_sampling_matches_target(target, drafters, prompts):
    prompt = prompts[0]
    exact = _exact_two_token_distribution(target, prompt)
    assert 4 <= len(exact) <= 9 and min(exact.values()) * NUM_TARGET_ONLY >= 5, exact
    # The agreeing drafter's q piles onto t0 and puts mass outside p's support: far from p, so a wrong
    # acceptance rule or residual would show.
    results = generate(target, drafters["drafter-agree"], [prompt] * NUM_SPECULATIVE, max_new_tokens=2,
                       block_size=4, temperature=TEMPERATURE, top_p=TOP_P, top_k=TOP_K, seed=1234)
    speculative = _counts([r.output_ids for r in results])
    _assert_fits(speculative, exact)
    target_only = _counts(target_generate(target, [prompt] * NUM_TARGET_ONLY, max_new_tokens=2,
                                          temperature=TEMPERATURE, top_p=TOP_P, top_k=TOP_K, seed=4321))
    _assert_fits(target_only, exact)
    tv = 0.5 * sum(abs(speculative.get(c, 0) / NUM_SPECULATIVE - target_only.get(c, 0) / NUM_TARGET_ONLY)
                   for c in exact)
    assert tv < MAX_TV, (tv, speculative, target_only)


def test_sampling_is_seeded(target, drafters, prompts):
    kwargs = dict(max_new_tokens=12, temperature=TEMPERATURE, top_k=TOP_K, seed=7)
    first = generate(target, drafters["drafter-agree"], prompts[:2], **kwargs)
    assert generate(target, drafters["drafter-agree"], prompts[:2], **kwargs) == first
    assert target_generate(target, prompts[:2], **kwargs) == target_generate(target, prompts[:2], **kwargs)


def test_bad_arguments(target, drafters, prompts):
    with pytest.raises(ValueError, match="block_size"):
        generate(target, drafters["drafter"], prompts, max_new_tokens=4, block_size=1)
    with pytest.raises(ValueError, match="top_p"):
        generate(target, drafters["drafter"], prompts, max_new_tokens=4, temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="empty"):
        generate(target, drafters["drafter"], [[]], max_new_tokens=4)
