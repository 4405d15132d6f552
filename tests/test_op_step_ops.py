# SPDX-License-Identifier: Apache-2.0
"""The small Triton ops of a decode step -- the greedy argmax (``ops/argmax_kernel.py``), the overlap loop's
bookkeeping (``ops/step_state.py``) and the paged-KV listing of a graph replay (``ops/paged_kv.py``): the
references pinned by hand-computed cases (CPU), then the kernels against the references on random inputs, on
the GPU where there is one, else through Triton's interpreter in a child pytest (as
``test_op_block_attention``)."""

from __future__ import annotations

from types import ModuleType

import pytest
import torch

from child_pytest import CUDA, triton_interpreter_rerun, triton_kernel_device

from dflash_sglang import ops
from dflash_sglang.ops.reference import advance_state_ref, argmax_ref, block_inputs_ref, paged_kv_indices_ref

DEVICE = "cuda" if CUDA else "cpu"
MASK = 99


def _state(seq_lens: list[int], width: int = 64, rows: int = 6, seed: int = 0) -> dict:
    """A req_to_token table of distinct slots, requests at shuffled rows, budgets per row."""
    generator = torch.Generator().manual_seed(seed)
    bs = len(seq_lens)
    return {
        "verified_id": torch.randint(0, 1000, (bs,), generator=generator),
        "seq_lens": torch.tensor(seq_lens, dtype=torch.int32),
        "req_pool_indices": torch.randperm(rows, generator=generator)[:bs],
        "req_to_token": torch.randperm(rows * width, generator=generator).view(rows, width).to(torch.int32) + 1,
        "budget_table": torch.randint(0, 40, (rows,), generator=generator),
    }


def _on(device: str, args: dict) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}


# ------------------------------------------------------------------------------------------------------
# Reference pins (CPU).


def test_ref_block_inputs_reads_the_rows_of_each_request():
    state = _state([3, 10])
    block_input, positions, slots, prefix_lens, budgets = block_inputs_ref(**state, mask_token_id=MASK,
                                                                           block_size=4)
    t0 = state["verified_id"].tolist()
    assert block_input.tolist() == [[t0[0], MASK, MASK, MASK], [t0[1], MASK, MASK, MASK]]
    assert positions.tolist() == [[3, 4, 5, 6], [10, 11, 12, 13]]
    rows = state["req_pool_indices"].tolist()
    table = state["req_to_token"]
    assert slots.tolist() == [table[rows[0], 3:7].tolist(), table[rows[1], 10:14].tolist()]
    assert prefix_lens.dtype == torch.int64 and prefix_lens.tolist() == [3, 10]
    assert budgets.tolist() == [int(state["budget_table"][r]) for r in rows]


def test_ref_block_inputs_past_the_row_reads_the_padding_slot():
    state = _state([62], width=64)
    _, positions, slots, _, _ = block_inputs_ref(**state, mask_token_id=MASK, block_size=4)
    row = int(state["req_pool_indices"][0])
    assert positions.tolist() == [[62, 63, 64, 65]]
    assert slots.tolist() == [[int(state["req_to_token"][row, 62]), int(state["req_to_token"][row, 63]), 0, 0]]


def test_ref_advance_state_takes_the_last_emitted_token_and_lowers_the_budget():
    table = torch.tensor([50, 7, 9, 30])
    emitted = torch.tensor([[5, 6, 7, -1], [-1, -1, -1, -1], [8, -1, -1, -1]])
    next_id, new_seq_lens, accept_lens = advance_state_ref(
        verified_id=torch.tensor([1, 2, 3]), prefix_lens=torch.tensor([10, 20, 30]), budgets=torch.tensor([9, 0, 30]),
        num_emitted=torch.tensor([3, 0, 1], dtype=torch.int32), emitted=emitted,
        req_pool_indices=torch.tensor([2, 1, 3]), budget_table=table, seq_lens_dtype=torch.int32)
    assert next_id.tolist() == [7, 2, 8]  # nothing emitted: t0 stays
    assert new_seq_lens.dtype == torch.int32 and new_seq_lens.tolist() == [13, 20, 31]
    assert accept_lens.dtype == torch.int32 and accept_lens.tolist() == [3, 1, 1]
    assert table.tolist() == [50, 0, 6, 29]


def test_ref_argmax_takes_the_first_of_equal_maxima():
    logits = torch.tensor([[0.0, 2.0, 2.0, 1.0], [float("-inf")] * 4])
    assert argmax_ref(logits).tolist() == [1, 0]


def test_ref_paged_kv_indices_lists_each_prefix_after_the_last():
    table = torch.arange(40, dtype=torch.int32).view(4, 10)
    kv_indptr = torch.full((4,), -1, dtype=torch.int32)
    kv_indices = torch.full((12,), -1, dtype=torch.int64)
    paged_kv_indices_ref(table, torch.tensor([2, 0, 3]), torch.tensor([3, 0, 2]), kv_indptr, kv_indices)
    assert kv_indptr.tolist() == [0, 3, 3, 5]
    assert kv_indices.tolist() == [20, 21, 22, 30, 31] + [-1] * 7


def test_ops_check_their_inputs():
    state = _state([3])
    with pytest.raises(ValueError, match="verified_id must be one of"):
        ops.block_inputs(**{**state, "verified_id": state["verified_id"].int()}, mask_token_id=MASK, block_size=4)
    with pytest.raises(ValueError, match="bs=1"):
        ops.block_inputs(**{**state, "req_pool_indices": torch.tensor([0, 1])}, mask_token_id=MASK, block_size=4)


# ------------------------------------------------------------------------------------------------------
# The kernels against the references.


@pytest.fixture(scope="module")
def kernels() -> tuple[ModuleType, ModuleType]:
    """``ops.argmax`` and ``ops.step_state``, compiled for the GPU or run by Triton's interpreter."""
    triton_kernel_device()
    pytest.importorskip("triton")
    from dflash_sglang.ops import argmax_kernel, paged_kv, step_state

    return argmax_kernel, step_state, paged_kv


test_kernel_in_triton_interpreter = triton_interpreter_rerun(__file__)


@pytest.mark.parametrize("chunks", [None, 1, 7])
@pytest.mark.parametrize("shape", [(1, 15, 151936), (3, 15, 5000), (7, 1000), (40, 3)], ids=str)
def test_kernel_argmax_matches_torch(kernels, shape, chunks):
    argmax, _, _ = kernels
    generator = torch.Generator().manual_seed(len(shape))
    logits = torch.randn(*shape, generator=generator)
    # Planted ties: the maximum twice in row 0 (the first must win) and in two chunks of the last row.
    flat = logits.view(-1, shape[-1])
    flat[0, shape[-1] // 3] = flat[0, shape[-1] - 1] = 50.0
    flat[-1, 1] = flat[-1, -2] = 60.0
    logits = logits.to(DEVICE)
    assert torch.equal(argmax.argmax(logits, chunks=chunks).cpu(), argmax_ref(logits.cpu()))


def test_kernel_argmax_writes_a_strided_view_and_reads_a_strided_slice(kernels):
    """The drafts' case: logits [bs, B, Vpad][:, 1:, :V] into block[:, 1:], leaving column 0 alone."""
    argmax, _, _ = kernels
    padded = torch.randn(2, 5, 300, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    block = torch.full((2, 5), -7, dtype=torch.int64, device=DEVICE)
    argmax.argmax(padded[:, 1:, :257], out=block[:, 1:])
    assert block[:, 0].tolist() == [-7, -7]
    assert torch.equal(block[:, 1:].cpu(), padded[:, 1:, :257].cpu().argmax(-1))


def test_kernel_argmax_of_an_all_minus_inf_row_is_zero(kernels):
    argmax, _, _ = kernels
    logits = torch.full((2, 5000), float("-inf"), device=DEVICE)
    logits[1, 4321] = 0.0
    assert argmax.argmax(logits, chunks=3).tolist() == [0, 4321]


@pytest.mark.parametrize("seq_lens", [[3], [0, 17, 60, 5], [62, 63]], ids=str)
@pytest.mark.parametrize("block_size", [4, 16])
def test_kernel_block_inputs_matches_reference(kernels, seq_lens, block_size):
    _, step_state, _ = kernels
    state = _state(seq_lens, seed=len(seq_lens))
    got = step_state.block_inputs(**_on(DEVICE, state), mask_token_id=MASK, block_size=block_size)
    expected = block_inputs_ref(**state, mask_token_id=MASK, block_size=block_size)
    for name, a, b in zip(("block_input", "positions", "block_slots", "prefix_lens", "budgets"), got, expected):
        assert a.dtype == torch.int64 and torch.equal(a.cpu(), b), name


@pytest.mark.parametrize("seq_lens_dtype", [torch.int32, torch.int64], ids=str)
def test_kernel_advance_state_matches_reference(kernels, seq_lens_dtype):
    _, step_state, _ = kernels
    generator = torch.Generator().manual_seed(5)
    bs, block = 5, 16
    num_emitted = torch.tensor([0, 1, 16, 7, 3], dtype=torch.int32)
    emitted = torch.randint(0, 1000, (bs, block), generator=generator)
    emitted[torch.arange(block)[None, :] >= num_emitted[:, None]] = -1
    args = {"verified_id": torch.randint(0, 1000, (bs,), generator=generator),
            "prefix_lens": torch.randint(0, 500, (bs,), generator=generator),
            "budgets": torch.randint(16, 100, (bs,), generator=generator),
            "num_emitted": num_emitted, "emitted": emitted, "req_pool_indices": torch.tensor([4, 0, 6, 2, 1]),
            "budget_table": torch.randint(0, 100, (8,), generator=generator), "seq_lens_dtype": seq_lens_dtype}
    device_args = _on(DEVICE, args)
    got = step_state.advance_state(**device_args)
    expected = advance_state_ref(**args)
    for a, b in zip(got, expected):
        assert a.dtype == b.dtype and torch.equal(a.cpu(), b)
    assert torch.equal(device_args["budget_table"].cpu(), args["budget_table"])


@pytest.mark.parametrize("seq_lens", [[5], [0, 1500, 3, 2048], [7] * 40], ids=lambda lens: f"bs{len(lens)}")
def test_kernel_paged_kv_indices_matches_reference(kernels, seq_lens):
    """Prefixes longer than one copy (1500, 2048), an empty one, a batch wider than 16."""
    _, _, paged_kv = kernels
    generator = torch.Generator().manual_seed(len(seq_lens))
    rows, width = 48, 2100
    table = torch.randint(1, 1 << 20, (rows, width), generator=generator, dtype=torch.int32)
    args = {"req_to_token": table, "req_pool_indices": torch.randperm(rows, generator=generator)[:len(seq_lens)],
            "seq_lens": torch.tensor(seq_lens, dtype=torch.int32)}
    expected_indptr = torch.full((len(seq_lens) + 1,), -1, dtype=torch.int32)
    expected_indices = torch.full((sum(seq_lens) + 8,), -1, dtype=torch.int64)
    paged_kv_indices_ref(**args, kv_indptr=expected_indptr, kv_indices=expected_indices)
    kv_indptr, kv_indices = expected_indptr.new_full(expected_indptr.shape, -1), expected_indices.new_full(
        expected_indices.shape, -1)
    device_args = _on(DEVICE, {**args, "kv_indptr": kv_indptr, "kv_indices": kv_indices})
    paged_kv.paged_kv_indices(**device_args)
    assert torch.equal(device_args["kv_indptr"].cpu(), expected_indptr)
    assert torch.equal(device_args["kv_indices"].cpu(), expected_indices)
