# SPDX-License-Identifier: Apache-2.0
"""Output logprobs of a DFLASH step, read from the target's verify pass, as SGLang returns them without speculation.

The verify pass runs the target over ``[t0, d1, ..., d_{B-1}]``; its logits at block position j are the
target's distribution for the token after input j, i.e. for the step's j-th emitted token (an accepted draft
d_{j+1}, or the bonus / correction token at the first rejection). So emitted token j of request i takes its
logprob, its top alternatives and its ``token_ids_logprob`` values from verify row ``i * B + j``.

The rows are processed as SGLang's ``Sampler`` processes a plain decode step's logits (``return_logprob``):
``log_softmax(logits)`` when every request of the batch is greedy, ``log(softmax(logits / temperature))``
otherwise (greedy requests have temperature 1 there), the raw ``log_softmax`` under
``SGLANG_RETURN_ORIGINAL_LOGPROB``; clamped to the dtype's minimum; top-k and token-id values from the same
rows with SGLang's ``get_top_logprobs`` / ``get_token_ids_logprobs``. Nothing here runs unless the batch has
a request with ``return_logprob`` (the fast path computes no softmax over the vocabulary for the block).

Where the values go: the overlap loop leaves them on ``logits_output`` in spec v2's layout (``[bs, B]``
``next_token_logprobs``, per-row top-k lists of length ``bs * B``) for SGLang's output processor; the loop
without overlap appends them to each request itself, as SGLang's spec v1 workers do
(``add_output_logprobs_for_spec_v1``), for the tokens the request really kept.
"""

from __future__ import annotations

import torch

from sglang.srt.environ import envs
from sglang.srt.layers.utils.logprob import get_token_ids_logprobs, get_top_logprobs


def block_logprobs(target_logits: torch.Tensor, sampling_info, block_size: int) -> torch.Tensor:
    """[bs * B, V] verify logits -> [bs * B, V] fp32 logprobs, processed as SGLang's sampler does (module docstring)."""
    logits = target_logits.float()
    if sampling_info.is_all_greedy or envs.SGLANG_RETURN_ORIGINAL_LOGPROB.get():
        logprobs = torch.log_softmax(logits, dim=-1)
    else:
        temperatures = sampling_info.temperatures.view(-1, 1).repeat_interleave(block_size, dim=0)
        logprobs = torch.log(torch.softmax(logits / temperatures, dim=-1))
    return logprobs.clamp_(min=torch.finfo(logprobs.dtype).min)


def attach_block_logprobs(logits_output, batch, target_logits: torch.Tensor, emitted: torch.Tensor,
                          on_host: bool) -> None:
    """Fills ``logits_output`` with every block row's logprobs in spec v2's layout.

    Args:
        logits_output: the verify pass's ``LogitsProcessorOutput``; gets ``next_token_logprobs`` [bs, B] (the
            logprob of emitted token j at [i, j]; rows past the emitted count hold a placeholder) and, when some
            request asks for them, ``next_token_top_logprobs_*`` / ``next_token_token_ids_logprobs_*`` lists of
            ``bs * B`` rows (request i's block position j at ``i * B + j``).
        batch: the step's ``ModelWorkerBatch`` (``sampling_info``, ``top_logprobs_nums``, ``token_ids_logprobs``).
        target_logits: [bs * B, V] the verify pass's logits.
        emitted: [bs, B] int64, the step's emitted tokens, -1 padded.
        on_host: the top-k / token-id lists as host lists (one copy for all rows) rather than device tensors
            (per row, for SGLang's ``copy_to_cpu`` under the overlap scheduler).
    """
    bs, block_size = emitted.shape
    logprobs = block_logprobs(target_logits, batch.sampling_info, block_size)
    rows = torch.arange(bs * block_size, device=logprobs.device)
    logits_output.next_token_logprobs = logprobs[rows, emitted.reshape(-1).clamp(min=0)].view(bs, block_size)
    top_nums = batch.top_logprobs_nums or []
    if any(k > 0 for k in top_nums):
        logits_output.next_token_top_logprobs_val, logits_output.next_token_top_logprobs_idx = get_top_logprobs(
            logprobs, [k for k in top_nums for _ in range(block_size)], no_copy_to_cpu=not on_host)
    token_ids = batch.token_ids_logprobs or []
    if any(ids is not None for ids in token_ids):
        values, indices = get_token_ids_logprobs(
            logprobs, [ids for ids in token_ids for _ in range(block_size)], no_copy_to_cpu=not on_host)
        if not on_host:  # NOTE: SGLang's output path calls .tolist() on every row: [] (a request without ids) fails
            values = [torch.empty(0, device=logprobs.device) if isinstance(v, list) else v for v in values]
        logits_output.next_token_token_ids_logprobs_val = values
        logits_output.next_token_token_ids_logprobs_idx = indices


def append_request_logprobs(reqs: list, counts: list[int], emitted: list[list[int]], logits_output,
                            block_size: int) -> None:
    """Appends to each request asking for logprobs those of its first ``counts[i]`` emitted tokens (host lists),
    from ``logits_output`` as :func:`attach_block_logprobs` left it (the loop without overlap)."""
    values = logits_output.next_token_logprobs.tolist()
    top_val, top_idx = logits_output.next_token_top_logprobs_val, logits_output.next_token_top_logprobs_idx
    ids_val, ids_idx = (logits_output.next_token_token_ids_logprobs_val,
                        logits_output.next_token_token_ids_logprobs_idx)
    for i, (req, count) in enumerate(zip(reqs, counts)):
        if not req.return_logprob:
            continue
        for j in range(count):
            row = i * block_size + j
            req.output_token_logprobs_val.append(values[i][j])
            req.output_token_logprobs_idx.append(emitted[i][j])
            if req.top_logprobs_num > 0:
                req.output_top_logprobs_val.append(_as_list(top_val[row]))
                req.output_top_logprobs_idx.append(_as_list(top_idx[row]))
            if req.token_ids_logprob is not None:
                req.output_token_ids_logprobs_val.append(_as_list(ids_val[row]))
                req.output_token_ids_logprobs_idx.append(_as_list(ids_idx[row]))


def _as_list(value):
    return value.tolist() if isinstance(value, torch.Tensor) else value
