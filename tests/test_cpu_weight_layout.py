# SPDX-License-Identifier: Apache-2.0
"""``patches.cpu.patch_unquant_layouts`` on SGLang's real layers, on the CPU without a server: after loading,
linear, embedding and LM-head weights keep their shape and values but are stored [in, out], so ``F.linear``
multiplies by a contiguous matrix; outputs equal the [out, in] formulas for one row and for a block of rows;
a tied weight (embedding = LM head) is laid out once; bfloat16 weights keep [out, in] (oneDNN's faster layout)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from child_pytest import sglang_cpu_rerun

from dflash_sglang.deploy.cpu_stub import driver_present

CHILD = "DFLASH_TEST_CPU_WEIGHT_LAYOUT_CHILD"
IMPORTED = False
if driver_present() or os.environ.get(CHILD):  # SGLang's layers load sgl_kernel: a GPU driver or the CPU stand-in
    from sglang.srt.layers.linear import MergedColumnParallelLinear, RowParallelLinear
    from sglang.srt.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    from dflash_sglang.testing.sglang_layers import init_sglang_single_process
    IMPORTED = True

in_sglang = pytest.mark.skipif(not IMPORTED, reason="runs in the child process of test_in_a_child_process")
HIDDEN, INTERMEDIATE, VOCAB = 24, 40, 128  # VOCAB: a multiple of SGLang's vocabulary padding (64)


test_in_a_child_process = sglang_cpu_rerun(__file__, CHILD, IMPORTED)


@pytest.fixture(scope="module", autouse=True)
def sglang_process():
    if IMPORTED:
        init_sglang_single_process()


def _finish_loading(layer) -> None:
    """What SGLang's model loader does for every module with a quant method once its weights are in."""
    layer.quant_method.process_weights_after_loading(layer)


def _stored_in_out(weight: torch.Tensor) -> bool:
    return weight.t().is_contiguous() and not weight.is_contiguous()


@in_sglang
@pytest.mark.parametrize("rows", [1, 4, 16])
def test_linear_layers_are_stored_in_out_and_compute_the_same(rows):
    generator = torch.Generator().manual_seed(rows)
    gate, up = (torch.randn(INTERMEDIATE, HIDDEN, generator=generator) for _ in range(2))
    down = torch.randn(HIDDEN, INTERMEDIATE, generator=generator)
    gate_up = MergedColumnParallelLinear(HIDDEN, [INTERMEDIATE] * 2, bias=False, params_dtype=torch.float32)
    gate_up.weight.weight_loader(gate_up.weight, gate, 0)
    gate_up.weight.weight_loader(gate_up.weight, up, 1)
    down_proj = RowParallelLinear(INTERMEDIATE, HIDDEN, bias=False, params_dtype=torch.float32)
    down_proj.weight.weight_loader(down_proj.weight, down)
    for layer in gate_up, down_proj:
        _finish_loading(layer)
        assert _stored_in_out(layer.weight)
    assert gate_up.weight.shape == (2 * INTERMEDIATE, HIDDEN)
    assert torch.equal(gate_up.weight, torch.cat([gate, up])) and torch.equal(down_proj.weight, down)
    x = torch.randn(rows, HIDDEN, generator=generator)
    hidden, _ = gate_up(x)
    torch.testing.assert_close(hidden, F.linear(x, torch.cat([gate, up])), rtol=1e-5, atol=1e-5)
    out, _ = down_proj(hidden[:, :INTERMEDIATE])
    torch.testing.assert_close(out, F.linear(hidden[:, :INTERMEDIATE], down), rtol=1e-5, atol=1e-5)


@in_sglang
def test_a_tied_embedding_and_lm_head_is_laid_out_once_and_still_looks_up_rows():
    table = torch.randn(VOCAB, HIDDEN, generator=torch.Generator().manual_seed(0))
    embedding = VocabParallelEmbedding(VOCAB, HIDDEN, params_dtype=torch.float32)
    embedding.weight.weight_loader(embedding.weight, table)
    head = ParallelLMHead(VOCAB, HIDDEN, params_dtype=torch.float32)
    head.weight = embedding.weight  # tie_word_embeddings: one parameter, processed by both modules
    _finish_loading(embedding)
    _finish_loading(head)
    assert head.weight is embedding.weight and _stored_in_out(head.weight)
    assert torch.equal(head.weight, table)
    ids = torch.tensor([0, 5, VOCAB - 1, 5])
    assert torch.equal(embedding(ids), table[ids])
    hidden = torch.randn(4, HIDDEN, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(torch.matmul(hidden, head.weight.T), hidden @ table.T, rtol=1e-5, atol=1e-5)


@in_sglang
def test_bfloat16_weights_keep_their_layout():
    layer = RowParallelLinear(INTERMEDIATE, HIDDEN, bias=False, params_dtype=torch.bfloat16)
    down = torch.randn(HIDDEN, INTERMEDIATE).to(torch.bfloat16)
    layer.weight.weight_loader(layer.weight, down)
    _finish_loading(layer)
    assert layer.weight.is_contiguous() and torch.equal(layer.weight, down)
