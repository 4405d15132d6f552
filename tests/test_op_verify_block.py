# SPDX-License-Identifier: Apache-2.0
"""verify_block: hand-computed cases pinning the reference (CPU), then the CUDA kernel against the reference.

The GPU tests call ``torch.ops.dflash.verify_block`` directly (the extension is loaded with
``DFLASH_KERNELS=on``, so a missing build fails instead of silently testing the reference against itself).
Sampled bonus tokens are compared with the reference run on fp64 copies of the probabilities: the kernel
accumulates the CDF in fp64, and the reference's fp32 cumsum over a 262144-token vocab rounds by more than a
typical token's probability mass, so an fp32 reference would disagree by rounding, not by a bug.
"""

from __future__ import annotations

import os

import pytest
import torch

from dflash_sglang import ops
from dflash_sglang.ops.reference import sample_inverse_cdf, verify_block_ref


def _long(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int64)


def _greedy(block_tokens, target_ids, *, budget=100, stop_ids=((-1,),), prefix_len=10, slots=None):
    block_tokens, target_ids = _long([block_tokens]), _long([target_ids])
    block_size = block_tokens.shape[1]
    slots = _long([slots or list(range(100, 100 + block_size))])
    return verify_block_ref(block_tokens, target_ids, None, None, None, slots, _long([prefix_len]),
                            _long(stop_ids), _long([budget]))


def _unpack(out):
    num_accepted, num_emitted, emitted, keep, free, new_prefix_lens, finished = out
    return (int(num_accepted[0]), int(num_emitted[0]), emitted[0].tolist(), keep[0].tolist(), free[0].tolist(),
            int(new_prefix_lens[0]), bool(finished[0]))


# ------------------------------------------------------------------------------------------------------
# Reference pins (CPU): greedy.


def test_ref_greedy_all_accepted():
    # drafts 5 6 7 all match the target's argmax; the bonus is target_ids[3] = 8.
    out = _unpack(_greedy([4, 5, 6, 7], [5, 6, 7, 8]))
    assert out == (3, 4, [5, 6, 7, 8], [100, 101, 102, 103], [-1, -1, -1, -1], 14, False)


def test_ref_greedy_none_accepted():
    # d1 = 5 but the target wants 9: nothing accepted, the bonus 9 is emitted; only t0's slot stays.
    out = _unpack(_greedy([4, 5, 6, 7], [9, 6, 7, 8]))
    assert out == (0, 1, [9, -1, -1, -1], [100, -1, -1, -1], [-1, 101, 102, 103], 11, False)


def test_ref_greedy_mixed():
    # d1, d2 match, d3 = 7 != 3: tokens 5 6 3 (bonus 3); t0, d1, d2 keep their KV (kept = 3), d3, d4 are freed.
    out = _unpack(_greedy([4, 5, 6, 7, 1], [5, 6, 3, 8, 2]))
    assert out == (2, 3, [5, 6, 3, -1, -1], [100, 101, 102, -1, -1], [-1, -1, -1, 103, 104], 13, False)


def test_ref_greedy_stop_inside_block():
    # all accepted but 6 is a stop id: emit 5 6 and finish; -1 padding in stop_ids never matches.
    out = _unpack(_greedy([4, 5, 6, 7], [5, 6, 7, 8], stop_ids=((-1, 6, -1),)))
    assert out == (3, 2, [5, 6, -1, -1], [100, 101, -1, -1], [-1, -1, 102, 103], 12, True)


def test_ref_greedy_stop_is_bonus():
    out = _unpack(_greedy([4, 5, 6, 7], [5, 9, 7, 8], stop_ids=((9,),)))
    assert out == (1, 2, [5, 9, -1, -1], [100, 101, -1, -1], [-1, -1, 102, 103], 12, True)


def test_ref_greedy_budget_cut():
    out = _unpack(_greedy([4, 5, 6, 7], [5, 6, 7, 8], budget=2))
    assert out == (3, 2, [5, 6, -1, -1], [100, 101, -1, -1], [-1, -1, 102, 103], 12, True)


def test_ref_greedy_budget_exactly_used_finishes():
    out = _unpack(_greedy([4, 5, 6, 7], [5, 6, 7, 8], budget=4))
    assert out == (3, 4, [5, 6, 7, 8], [100, 101, 102, 103], [-1, -1, -1, -1], 14, True)


def test_ref_greedy_zero_budget_emits_nothing():
    # t0's KV still stays (kept = max(0, 1)).
    out = _unpack(_greedy([4, 5, 6, 7], [5, 6, 7, 8], budget=0))
    assert out == (3, 0, [-1, -1, -1, -1], [100, -1, -1, -1], [-1, 101, 102, 103], 11, True)


def test_ref_greedy_padded_slots_pass_through():
    # A -1 block slot (padding) is passed through as is: kept slots keep -1, freed ones list -1.
    out = _unpack(_greedy([4, 5, 6, 7], [5, 0, 0, 0], slots=[100, 101, -1, -1]))
    assert out == (1, 2, [5, 0, -1, -1], [100, 101, -1, -1], [-1, -1, -1, -1], 12, False)


def test_ref_greedy_batch_rows_are_independent():
    block_tokens = _long([[4, 5, 6], [1, 2, 3]])
    target_ids = _long([[5, 6, 9], [7, 7, 7]])
    slots = _long([[0, 1, 2], [3, 4, 5]])
    out = verify_block_ref(block_tokens, target_ids, None, None, None, slots, _long([0, 50]), _long([[-1], [7]]),
                           _long([10, 10]))
    num_accepted, num_emitted, emitted, keep, free, new_prefix_lens, finished = out
    assert num_accepted.tolist() == [2, 0] and num_emitted.tolist() == [3, 1]
    assert emitted.tolist() == [[5, 6, 9], [7, -1, -1]]
    assert keep.tolist() == [[0, 1, 2], [3, -1, -1]] and free.tolist() == [[-1, -1, -1], [-1, 4, 5]]
    assert new_prefix_lens.tolist() == [3, 51] and finished.tolist() == [False, True]
    assert num_accepted.dtype == torch.int32 and num_emitted.dtype == torch.int32 and finished.dtype == torch.bool


# ------------------------------------------------------------------------------------------------------
# Reference pins (CPU): sampling.


def _sampling(block_tokens, target_probs, draft_probs, uniforms, *, budget=100, stop_ids=((-1,),)):
    block_tokens = _long([block_tokens])
    block_size = block_tokens.shape[1]
    return verify_block_ref(block_tokens, None, torch.tensor([target_probs]), torch.tensor([draft_probs]),
                            torch.tensor([uniforms]), _long([list(range(block_size))]), _long([0]), _long(stop_ids),
                            _long([budget]))


P = [0.1, 0.2, 0.3, 0.4]
Q = [0.25, 0.25, 0.25, 0.25]


def test_ref_sampling_accept_when_p_exceeds_q():
    # d1 = 3: p = 0.4 > u * 0.25 for any u < 1 -> accepted; bonus from p_1 with u = 0.5:
    # cdf(P) = .1 .3 .6 1.0, threshold .5 -> token 2.
    out = _unpack(_sampling([0, 3], [P, P], [Q], [0.9, 0.5]))
    assert out[:3] == (1, 2, [3, 2])


def test_ref_sampling_reject_draws_from_residual():
    # d1 = 0: p/q = 0.4 and u = 0.5 -> rejected. residual max(0, P - Q) = 0 0 .05 .15 (sum .2);
    # u_last = 0.5 -> threshold .1 -> token 3; u_last = 0.2 -> threshold .04 -> token 2.
    assert _unpack(_sampling([0, 0], [P, P], [Q], [0.5, 0.5]))[:3] == (0, 1, [3, -1])
    assert _unpack(_sampling([0, 0], [P, P], [Q], [0.5, 0.2]))[:3] == (0, 1, [2, -1])
    # u = 0.3 < 0.4 accepts the same draft.
    assert _unpack(_sampling([0, 0], [P, P], [Q], [0.3, 0.2]))[:2] == (1, 2)


def test_ref_sampling_residual_falls_back_to_target():
    # p == q (residual all 0) and the draft has p = q = 0, so it is rejected (0 < 0 is false); the bonus is
    # drawn from p itself: cdf .5 1 1 1, threshold .7 -> token 1.
    probs = [0.5, 0.5, 0.0, 0.0]
    assert _unpack(_sampling([0, 2], [probs, probs], [probs], [0.1, 0.7]))[:3] == (0, 1, [1, -1])


def test_ref_sampling_mixed_block_and_stop():
    # d1 = 3 accepted (p .4 >= q .25), d2 = 0 rejected (u .5 * .25 >= .1), bonus from the residual with
    # u .2 -> token 2; 3 is a stop id, so only [3] is emitted.
    out = _unpack(_sampling([1, 3, 0], [P, P, P], [Q, Q], [0.9, 0.5, 0.2], stop_ids=((3,),)))
    assert out == (1, 1, [3, -1, -1], [0, -1, -1], [-1, 1, 2], 1, True)


def test_ref_sample_inverse_cdf_edges():
    weights = torch.tensor([0.0, 0.3, 0.7, 0.0])
    assert sample_inverse_cdf(weights, 0.0) == 1  # first token with weight
    assert sample_inverse_cdf(weights, 0.29) == 1
    assert sample_inverse_cdf(weights, 0.31) == 2
    assert sample_inverse_cdf(weights, 0.999999) == 2  # never the zero-weight tail
    assert sample_inverse_cdf(weights, 1.0) == 2  # rounding past the end goes to the last nonzero
    assert sample_inverse_cdf(torch.tensor([2.0, 2.0]), 0.5) == 1  # unnormalized; ties go right (strict >)


def test_wrapper_on_cpu_uses_reference():
    block_tokens, target_ids = _long([[4, 5, 6, 7]]), _long([[5, 6, 7, 8]])
    slots = _long([[0, 1, 2, 3]])
    out = ops.verify_block(block_tokens, slots, _long([0]), _long([[-1]]), _long([9]), target_ids=target_ids)
    ref = verify_block_ref(block_tokens, target_ids, None, None, None, slots, _long([0]), _long([[-1]]), _long([9]))
    assert all(torch.equal(a, b) for a, b in zip(out, ref))


# ------------------------------------------------------------------------------------------------------
# Kernel vs reference (GPU).


def _gpu_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "requires a CUDA GPU (torch.cuda.is_available() is False)"
    if torch.cuda.get_device_capability() < (9, 0):
        return f"requires sm_90 (Hopper) or newer, got sm_{''.join(map(str, torch.cuda.get_device_capability()))}"
    return None


gpu = pytest.mark.skipif(_gpu_skip_reason() is not None, reason=_gpu_skip_reason() or "")


@pytest.fixture(scope="module")
def dflash_ops():
    """torch.ops.dflash with the extension loaded; fails (not skips) when it cannot load on an sm_90 GPU."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DFLASH_KERNELS", "on")
        ops.kernels_available.cache_clear()
        assert ops.kernels_available()
    ops.kernels_available.cache_clear()
    return torch.ops.dflash


def _make_case(bs: int, block_size: int, *, greedy: bool, pattern: str, vocab: int = 1000, seed: int = 0,
               num_stop_ids: int = 3, stop_rate: float = 0.3):
    """Random inputs on the GPU. pattern: "all" / "none" / "mixed" acceptance."""
    gen = torch.Generator().manual_seed(seed)
    drafts = block_size - 1
    block_tokens = torch.randint(0, vocab, (bs, block_size), generator=gen)
    case = {}
    if greedy:
        target_ids = torch.randint(0, vocab, (bs, block_size), generator=gen)
        if pattern == "all":
            accept = torch.full((bs,), drafts)
        elif pattern == "none":
            accept = torch.zeros(bs, dtype=torch.int64)
        else:
            accept = torch.randint(0, drafts + 1, (bs,), generator=gen)
        for i in range(bs):
            n = int(accept[i])
            block_tokens[i, 1:1 + n] = target_ids[i, :n]
            if n < drafts:  # the first mismatch
                block_tokens[i, 1 + n] = (target_ids[i, n] + 1) % vocab
        case["target_ids"] = target_ids
    else:
        logits = torch.randn(bs, block_size, vocab, generator=gen) * 2.0
        target_probs = torch.softmax(logits, dim=-1)
        if pattern == "all":
            draft_probs = target_probs[:, :drafts].clone()  # u * q < p = q always
        else:
            draft_probs = torch.softmax(torch.randn(bs, drafts, vocab, generator=gen) * 2.0, dim=-1)
        if drafts:
            sampled = torch.multinomial(draft_probs.reshape(-1, vocab), 1, generator=gen).view(bs, drafts)
            block_tokens[:, 1:] = sampled
        if pattern == "none" and drafts:
            target_probs.scatter_(2, block_tokens[:, 1:, None], 0.0)  # p(d) = 0: always rejected
        case.update(target_probs=target_probs, draft_probs=draft_probs,
                    uniforms=torch.rand(bs, block_size, generator=gen))
    block_slots = torch.randperm(bs * block_size * 4, generator=gen)[:bs * block_size].view(bs, block_size)
    prefix_lens = torch.randint(0, 100_000, (bs,), generator=gen)  # ragged
    stop_ids = torch.full((bs, num_stop_ids), -1, dtype=torch.int64)
    for i in range(bs):
        if num_stop_ids and torch.rand((), generator=gen) < stop_rate:
            # a token of the block (a draft or the target's choice): EOS inside the block, often emitted
            pool = torch.cat([block_tokens[i, 1:], case["target_ids"][i]]) if greedy else block_tokens[i, 1:]
            if len(pool):
                stop_ids[i, int(torch.randint(0, num_stop_ids, (), generator=gen))] = pool[
                    int(torch.randint(0, len(pool), (), generator=gen))]
    budgets = torch.randint(0, block_size + 3, (bs,), generator=gen)
    case.update(block_tokens=block_tokens, block_slots=block_slots, prefix_lens=prefix_lens, stop_ids=stop_ids,
                budgets=budgets)
    return case


def _op_args(case: dict, device: str = "cuda") -> tuple:
    """The positional arguments of torch.ops.dflash.verify_block (empty tensors stand for None)."""
    empty_long = torch.empty(0, dtype=torch.int64)
    empty_float = torch.empty(0, dtype=torch.float32)
    args = (case["block_tokens"], case.get("target_ids", empty_long), case.get("target_probs", empty_float),
            case.get("draft_probs", empty_float), case.get("uniforms", empty_float), case["block_slots"],
            case["prefix_lens"], case["stop_ids"], case["budgets"])
    return tuple(a.to(device) for a in args)


def _reference(case: dict):
    """verify_block_ref on the CPU; probabilities in fp64 (see the module docstring)."""
    greedy = "target_ids" in case
    return verify_block_ref(
        case["block_tokens"], case.get("target_ids"),
        None if greedy else case["target_probs"].double(), None if greedy else case["draft_probs"].double(),
        case.get("uniforms"), case["block_slots"], case["prefix_lens"], case["stop_ids"], case["budgets"])


def _assert_equal(out, ref):
    names = ("num_accepted", "num_emitted", "emitted", "keep_slots", "free_slots", "new_prefix_lens", "finished")
    assert len(out) == 7
    for name, got, want in zip(names, out, ref):
        assert got.dtype == want.dtype, f"{name}: dtype {got.dtype} != {want.dtype}"
        assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
        got = got.cpu()
        if not torch.equal(got, want):
            rows = (got != want).reshape(got.shape[0], -1).any(-1).nonzero().flatten()[:5].tolist()
            raise AssertionError(
                f"{name} differs in rows {rows}: kernel {got[rows].tolist()} vs ref {want[rows].tolist()}")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("pattern", ["all", "none", "mixed"])
@pytest.mark.parametrize("block_size", [1, 2, 16, 32])
@pytest.mark.parametrize("bs", [1, 7, 64, 256])
def test_kernel_greedy_matches_reference(dflash_ops, bs, block_size, pattern):
    case = _make_case(bs, block_size, greedy=True, pattern=pattern, seed=bs * 100 + block_size)
    out = dflash_ops.verify_block(*_op_args(case))
    ref = _reference(case)
    _assert_equal(out, ref)
    if block_size > 1 and pattern != "mixed":
        expected = block_size - 1 if pattern == "all" else 0
        assert (out[0] == expected).all()


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("pattern", ["all", "none", "mixed"])
@pytest.mark.parametrize("block_size", [1, 2, 16, 32])
@pytest.mark.parametrize("bs", [1, 7, 64, 256])
def test_kernel_sampling_matches_reference(dflash_ops, bs, block_size, pattern):
    case = _make_case(bs, block_size, greedy=False, pattern=pattern, vocab=1000, seed=bs * 100 + block_size + 1)
    out = dflash_ops.verify_block(*_op_args(case))
    _assert_equal(out, _reference(case))
    if block_size > 1 and pattern != "mixed":
        expected = block_size - 1 if pattern == "all" else 0
        assert (out[0] == expected).all()


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("vocab", [151936, 262144, 1001, 3])
@pytest.mark.parametrize("bs,block_size", [(1, 16), (7, 16), (4, 32)])
def test_kernel_sampling_real_vocab(dflash_ops, bs, block_size, vocab):
    # 1001 and 3: vocab % 4 != 0 takes the unaligned (scalar load) path.
    case = _make_case(bs, block_size, greedy=False, pattern="mixed", vocab=vocab, seed=vocab + bs)
    _assert_equal(dflash_ops.verify_block(*_op_args(case)), _reference(case))


@pytest.mark.gpu
@gpu
def test_kernel_sampling_residual_fallback_and_zero_weights(dflash_ops):
    # Row 0: p == q and the draft has p = q = 0 -> rejected, residual all zero -> falls back to p.
    # Row 1: sparse p (most weights 0) so the bonus must land on a nonzero token, with u near 1.
    vocab = 4096
    p = torch.zeros(2, 2, vocab)
    p[0, :, 10], p[0, :, 20] = 0.5, 0.5
    p[1, :, 7], p[1, :, 4000] = 0.25, 0.75
    q = p[:, :1].clone()
    block_tokens = _long([[0, 30], [0, 4000]])
    case = dict(block_tokens=block_tokens, target_probs=p, draft_probs=q,
                uniforms=torch.tensor([[0.5, 0.7], [0.1, 0.99999994]]), block_slots=_long([[0, 1], [2, 3]]),
                prefix_lens=_long([5, 6]), stop_ids=_long([[-1], [-1]]), budgets=_long([5, 5]))
    out = dflash_ops.verify_block(*_op_args(case))
    _assert_equal(out, _reference(case))
    assert out[2][:, :2].tolist() == [[20, -1], [4000, 4000]]


@pytest.mark.gpu
@gpu
def test_kernel_empty_batch(dflash_ops):
    case = _make_case(0, 16, greedy=True, pattern="mixed")
    out = dflash_ops.verify_block(*_op_args(case))
    assert [tuple(t.shape) for t in out] == [(0,), (0,), (0, 16), (0, 16), (0, 16), (0,), (0,)]


@pytest.mark.gpu
@gpu
def test_kernel_rejects_bad_arguments(dflash_ops):
    case = _make_case(2, 4, greedy=True, pattern="mixed")
    args = list(_op_args(case))
    args[5] = args[5][:, :3]  # block_slots [bs, B-1]
    with pytest.raises(RuntimeError, match="block_slots must have shape"):
        dflash_ops.verify_block(*args)
    args = list(_op_args(case))
    args[0] = args[0].int()
    with pytest.raises(RuntimeError, match="block_tokens must be int64"):
        dflash_ops.verify_block(*args)


@pytest.mark.gpu
@gpu
def test_public_wrapper_dispatches_to_kernel(dflash_ops, monkeypatch):
    monkeypatch.setenv("DFLASH_KERNELS", "on")
    ops.kernels_available.cache_clear()

    def _fail(*args, **kwargs):
        raise AssertionError("the CUDA path fell back to the reference")

    monkeypatch.setattr(ops.reference, "verify_block_ref", _fail)
    case = _make_case(8, 16, greedy=False, pattern="mixed")
    c = {k: v.cuda() for k, v in case.items()}
    out = ops.verify_block(c["block_tokens"], c["block_slots"], c["prefix_lens"], c["stop_ids"], c["budgets"],
                           target_probs=c["target_probs"], draft_probs=c["draft_probs"], uniforms=c["uniforms"])
    monkeypatch.undo()
    ops.kernels_available.cache_clear()
    _assert_equal(out, _reference(case))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("greedy", [True, False])
def test_opcheck(dflash_ops, greedy):
    for bs, block_size in [(1, 2), (5, 16)]:
        case = _make_case(bs, block_size, greedy=greedy, pattern="mixed", vocab=512)
        torch.library.opcheck(dflash_ops.verify_block.default, _op_args(case))


@pytest.mark.gpu
@gpu
def test_torch_compile_fullgraph(dflash_ops):
    @torch.compile(fullgraph=True)
    def verify_and_count(*args):
        num_accepted, num_emitted, emitted, keep, free, new_prefix_lens, finished = torch.ops.dflash.verify_block(*args)
        return num_emitted.sum(), emitted, new_prefix_lens, finished

    for greedy in (True, False):
        case = _make_case(16, 16, greedy=greedy, pattern="mixed", vocab=777)
        total, emitted, new_prefix_lens, finished = verify_and_count(*_op_args(case))
        ref = _reference(case)
        assert int(total) == int(ref[1].sum())
        assert torch.equal(emitted.cpu(), ref[2]) and torch.equal(new_prefix_lens.cpu(), ref[5])
        assert torch.equal(finished.cpu(), ref[6])


if os.environ.get("DFLASH_TEST_SEEDS"):  # optional soak: DFLASH_TEST_SEEDS=100 pytest -k soak
    @pytest.mark.gpu
    @gpu
    @pytest.mark.parametrize("seed", range(int(os.environ["DFLASH_TEST_SEEDS"])))
    def test_kernel_sampling_soak(dflash_ops, seed):
        case = _make_case(32, 16, greedy=False, pattern="mixed", vocab=32000, seed=seed)
        _assert_equal(dflash_ops.verify_block(*_op_args(case)), _reference(case))
