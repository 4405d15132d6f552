# SPDX-License-Identifier: Apache-2.0
"""DFLASH's step state under the overlap scheduler, with SGLang's real FutureMap (patched by the hook): it
survives the ring buffer, filtering and merging as the scheduler drives them; and which backends need exact
host sequence lengths. The scheduling itself is tested end to end (tests/test_server_e2e.py)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
from child_pytest import sglang_cpu_rerun

from dflash_sglang.deploy.cpu_stub import driver_present

CHILD = "DFLASH_TEST_OVERLAP_CHILD"
IMPORTED = False
if driver_present() or os.environ.get(CHILD):  # SGLang's scheduler modules load sgl_kernel, which needs a GPU
    from sglang.srt.managers.overlap_utils import FutureMap  # driver or the CPU stand-in at start-up
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    from dflash_sglang.serving.overlap import DFlashDraftInput, host_lens_must_be_exact
    IMPORTED = True

in_sglang = pytest.mark.skipif(not IMPORTED, reason="runs in the child process of test_in_a_child_process")
BLOCK = 16


test_in_a_child_process = sglang_cpu_rerun(__file__, CHILD, IMPORTED)


def _future_map() -> FutureMap:
    return FutureMap(max_running_requests=8, chunked_prefill_size=32, context_len=128, device=torch.device("cpu"),
                     spec_algo=SpeculativeAlgorithm.DFLASH)


def _stored_step(future_map: FutureMap, verified: list[int], seq_lens: list[int]) -> DFlashDraftInput:
    """What run_batch does with a step's result: allocate future slots, store, keep only the indices."""
    future_indices = future_map.alloc_future_indices(len(verified))
    result = DFlashDraftInput(torch.tensor(verified), torch.tensor(seq_lens), BLOCK, exact_host_lens=True)
    future_map.store_to_map_for_new_batch(future_indices, result)
    result.future_indices = future_indices
    return result


def _resolved(future_map: FutureMap, state: DFlashDraftInput) -> tuple[list[int], list[int]]:
    future_map.resolve_future(SimpleNamespace(spec_info=state))
    return state.verified_id.tolist(), state.new_seq_lens.tolist()


@in_sglang
def test_step_state_round_trips_through_the_future_map():
    future_map = _future_map()
    state = _stored_step(future_map, [11, 12, 13], [40, 50, 60])
    state.verified_id = state.new_seq_lens = None  # the next step sees only the indices
    assert _resolved(future_map, state) == ([11, 12, 13], [40, 50, 60])


@in_sglang
def test_filter_then_merge_keeps_each_request_its_own_state():
    future_map = _future_map()
    running = _stored_step(future_map, [11, 12, 13], [40, 50, 60])
    prefill = _stored_step(future_map, [21, 22], [7, 9])
    running.filter_batch(torch.tensor([0, 2]))  # request 12 finished
    running.merge_batch(prefill)
    assert _resolved(future_map, running) == ([11, 13, 21, 22], [40, 60, 7, 9])


@in_sglang
def test_merging_state_outside_the_future_map_is_refused():
    future_map = _future_map()
    running = _stored_step(future_map, [1], [5])
    loose = DFlashDraftInput(torch.tensor([2]), torch.tensor([6]), BLOCK, exact_host_lens=True)
    with pytest.raises(RuntimeError, match="FutureMap"):
        running.merge_batch(loose)


@in_sglang
@pytest.mark.parametrize("device, target, draft, exact", [
    ("cuda", "triton", None, False),
    ("cuda", "triton", "triton", False),
    ("cuda", "triton", "flashinfer", True),
    ("cuda", "flashinfer", "triton", True),
    ("cpu", "torch_native", None, True),
])
def test_only_triton_block_passes_on_cuda_run_without_exact_host_lengths(device, target, draft, exact):
    args = SimpleNamespace(device=device, attention_backend=target, speculative_draft_attention_backend=draft)
    assert host_lens_must_be_exact(args) is exact
