# SPDX-License-Identifier: Apache-2.0
"""block_logit_processing against SGLang's own penalizers, bit for bit: every verify row of a block, processed by
:class:`StepLogits`, equals the logits SGLang's ``BatchedPenalizerOrchestrator`` (+ ``logit_bias``) gives when it
is fed the request's output and the block's drafts one token at a time; the drafts chosen row by row equal the
argmax of those rows; a step's emitted tokens update the device rows as SGLang's cumulation does."""

from __future__ import annotations

import types

import torch

import sglang.srt.sampling.penaltylib as penaltylib
from sglang.srt.sampling.sampling_params import SamplingParams

from dflash_sglang.serving.block_logit_processing import BlockLogitProcessor

VOCAB, BLOCK, EOS = 50, 6, 7
OPTIONS = [{}, {"frequency_penalty": 0.7}, {"presence_penalty": 1.3}, {"repetition_penalty": 1.7},
           {"min_new_tokens": 6, "stop_token_ids": [11]}, {"frequency_penalty": 0.1, "min_new_tokens": 3}]
# NOTE: at most one of frequency / presence / repetition per request: SGLang applies its penalizers in the
# iteration order of a set of classes, which varies between processes, so for a request with several the
# reference itself is not fixed (block_logit_processing's docstring).
PENALIZERS = {penaltylib.BatchedFrequencyPenalizer, penaltylib.BatchedMinNewTokensPenalizer,
              penaltylib.BatchedPresencePenalizer, penaltylib.BatchedRepetitionPenalizer}
HISTORY = [[3], [5, 5, 9], [1, 2, 3, 4], [9, 9], [12], [8, 8, 8, 8, 8]]  # output so far, t0 last


class _Batch:  # what SGLang's orchestrator reads of a ScheduleBatch (weak-referenced)
    def __init__(self, reqs):
        self.reqs, self.device = reqs, "cpu"


def _request(options: dict, history: list[int], pool_idx: int):
    req = types.SimpleNamespace(sampling_params=SamplingParams(max_new_tokens=64, **options), output_ids=history[:-1],
                                origin_input_ids=[1] * (4 + pool_idx), req_pool_idx=pool_idx,
                                tokenizer=types.SimpleNamespace(eos_token_id=EOS, additional_stop_token_ids=None))
    req.finished = lambda: False
    return req


def _sglang_rows(reqs, logits: torch.Tensor, block: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Row j: SGLang's penalizers after the output history and drafts 1..j (one orchestrator per request, fed one
    token per step as SGLang's decode loop feeds it), then the logit bias."""
    rows = []
    for i, req in enumerate(reqs):
        single = penaltylib.BatchedPenalizerOrchestrator(VOCAB, _Batch([req]), PENALIZERS)
        for token in HISTORY[i]:
            single.cumulate_output_tokens(torch.tensor([token]))
        own = []
        for j in range(BLOCK):
            row = logits[i, j:j + 1].clone()
            single.apply(row)
            own.append(row + bias[i])
            if j + 1 < BLOCK:
                single.cumulate_output_tokens(block[i, j + 1:j + 2])
        rows.append(torch.cat(own))
    return torch.stack(rows)


def _step(processor: BlockLogitProcessor, reqs, bias: torch.Tensor):
    sampling_info = types.SimpleNamespace(logit_bias=bias, is_all_greedy=True)
    prefix_lens = torch.tensor([len(r.origin_input_ids) + len(h) - 1 for r, h in zip(reqs, HISTORY)])
    return processor.for_step(types.SimpleNamespace(reqs=reqs, sampling_info=sampling_info), prefix_lens)


def test_verify_rows_and_drafts_equal_sglangs_penalizers():
    generator = torch.Generator().manual_seed(0)
    reqs = [_request(options, history, i) for i, (options, history) in enumerate(zip(OPTIONS, HISTORY))]
    processor = BlockLogitProcessor(VOCAB, torch.device("cpu"))
    processor.seed(reqs, torch.tensor([h[-1] for h in HISTORY]))
    bias = torch.randn(len(reqs), VOCAB, generator=generator)
    logits = torch.randn(len(reqs), BLOCK, VOCAB, generator=generator) * 3
    block = torch.tensor([[h[-1]] + [h[-1], 3, 3, 9, EOS][: BLOCK - 1] for h in HISTORY])

    processed = logits.clone().view(-1, VOCAB)
    _step(processor, reqs, bias).verify(processed, block)
    assert torch.equal(processed.view_as(logits), _sglang_rows(reqs, logits, block, bias))

    drafts = block.clone()
    draft_logits = logits[:, :-1].clone()
    _step(processor, reqs, bias).draft(draft_logits, drafts)
    expected = _sglang_rows(reqs, logits, drafts, bias)[:, :-1].argmax(-1)
    assert torch.equal(drafts[:, 1:], expected)


def test_emitted_tokens_update_the_rows_as_sglang_cumulates():
    reqs = [_request(options, history, i) for i, (options, history) in enumerate(zip(OPTIONS, HISTORY))]
    processor = BlockLogitProcessor(VOCAB, torch.device("cpu"))
    processor.seed(reqs, torch.tensor([h[-1] for h in HISTORY]))
    emitted = torch.full((len(reqs), BLOCK), -1)
    emitted[:, :3] = torch.tensor([4, 4, 20])
    emitted[2, :] = -1  # a request that emitted nothing (finished earlier in the overlap loop)
    _step(processor, reqs, None).commit(emitted)
    table = processor.table
    for i, req in enumerate(reqs):
        single = penaltylib.BatchedPenalizerOrchestrator(VOCAB, _Batch([req]), {penaltylib.BatchedFrequencyPenalizer})
        for token in HISTORY[i] + [t for t in emitted[i].tolist() if t >= 0]:
            single.cumulate_output_tokens(torch.tensor([token]))
        row = table.row_of(req)
        penalized = any(v for k, v in OPTIONS[i].items() if k.endswith("_penalty"))
        assert (row >= 0) == penalized
        if penalized:
            frequency = single.penalizers[penaltylib.BatchedFrequencyPenalizer]
            expected = (frequency.cumulated_frequency_penalties[0] if frequency.is_prepared()
                        else torch.zeros(VOCAB))
            assert torch.equal(table.frequency[row, :VOCAB], expected)
            seen = set(HISTORY[i]) | {t for t in emitted[i].tolist() if t >= 0}
            assert table.seen[row, :VOCAB].nonzero().view(-1).tolist() == sorted(seen)


def test_a_resumed_prefill_samples_with_the_requests_complete_penalties():
    """A request prefilled again after a retraction (its output so far in ``output_ids``): SGLang's own
    ``apply_logits_bias`` with the sampling_info handed to its sampler gives the penalizers' logits after that
    whole output, for it and for a fresh request in the same prefill."""
    from sglang.srt.sampling.sampling_batch_info import SamplingBatchInfo

    reqs = [_request(options, history + [0], i) for i, (options, history) in enumerate(zip(OPTIONS, HISTORY))]
    reqs.append(_request({"min_new_tokens": 2}, [0], len(reqs)))  # fresh: no output yet
    ones = torch.ones(len(reqs))
    info = SamplingBatchInfo(temperatures=ones.view(-1, 1), top_ps=ones, top_ks=ones.int(), min_ps=ones * 0,
                             is_all_greedy=True, need_top_p_sampling=False, need_top_k_sampling=False,
                             need_min_p_sampling=False, vocab_size=VOCAB, device="cpu")
    processor = BlockLogitProcessor(VOCAB, torch.device("cpu"))
    resumed = processor.prefill_sampling_info(types.SimpleNamespace(reqs=reqs, sampling_info=info))
    logits = torch.randn(len(reqs), VOCAB, generator=torch.Generator().manual_seed(1)) * 3
    processed = logits.clone()
    resumed.apply_logits_bias(processed)
    for i, req in enumerate(reqs):
        single = penaltylib.BatchedPenalizerOrchestrator(VOCAB, _Batch([req]), PENALIZERS)
        for token in req.output_ids:
            single.cumulate_output_tokens(torch.tensor([token]))
        expected = logits[i:i + 1].clone()
        single.apply(expected)
        assert torch.equal(processed[i:i + 1], expected), OPTIONS[i] if i < len(OPTIONS) else "fresh"
