# SPDX-License-Identifier: Apache-2.0
"""Structured output inside a DFLASH block: the requests' grammars (SGLang's ``req.grammar``: json_schema,
regex, ebnf, structural_tag, tool calls) constrain the drafts and every verify row of a decode step.

State at the start of a step. ``req.grammar`` has accepted every output token, t0 (the block's first input)
included: SGLang's output processor accepts the prefill's token and, under the overlap scheduler (spec v2),
each step's emitted list; the host-committed loop accepts its emitted tokens itself, where it appends them
(``DFlashWorker._append_outputs``), in the plain decode order (append, ``check_finished``, accept). Under the
overlap scheduler SGLang processes the previous step's result before it launches a spec-v2 decode batch with
a grammar (``Scheduler.is_disable_overlap_for_batch``: ``need_grammar_sync``), so the state is exact there too.

The walk (:func:`constrain_drafts`, on the host, per request with an active grammar). Verify row j (input t0
for j = 0, draft d_j otherwise) predicts the token after d_j, so its mask is the grammar's state after
t0, d_1..d_j; draft d_{j+1} is drawn from the drafter's row j under that same mask (argmax, or a sample of
the masked, processed drafter distribution), then accepted by the grammar, and so on to row B-1. Every draft
is allowed, so the walk stops only where the grammar terminates (it accepted one of its stop tokens); rows
from there on stay unmasked, as SGLang leaves a terminated grammar's row (``update_regex_vocab_mask``).
Then the grammar is rolled back over the drafts it accepted: it leaves the step as it came, and the emitted
tokens are accepted where SGLang accepts output tokens (above). SGLang's EAGLE builds its tree masks the same
way, accepting and rolling back every draft (sgl-project/sglang ``srt/speculative/spec_utils.py``,
``traverse_tree``).

Exactness. The verify rows are masked (-inf) as SGLang masks a plain decode step's logits, before
temperature / top-k / top-p (``SamplingBatchInfo.apply_logits_bias``), and the output logprobs are read
from the masked rows as the plain sampler reads them: a row's greedy choice and distribution are the plain
server's whenever the drafts before it are accepted. The drafts are drawn from the masked drafter
distribution ``q`` that the verifier's rejection sampling divides by, so sampling stays exact. A plain
server stops masking once the grammar has terminated and finishes the request at the next token
(``Req.check_finished`` tests ``grammar.is_terminated()`` before accepting the new token); so a step's budget
ends at the draft that terminates the grammar (at least one token): the token after it comes unmasked from
the next step's first row, the same target distribution, and SGLang finishes the request there in both loops.

Cost. Only batches with a grammar pay: one host wait for the grammar requests' drafter logits (their block
rows, the vocabulary wide), a host pass over them, and the masks' upload; other batches run nothing here.
The grammar objects must roll back (xgrammar and llguidance do; outlines' cannot, and ``request_rules``
refuses its grammar requests). The masks are packed int32 token bitmasks, as both backends fill them
(xgrammar docs, ``allocate_token_bitmask``: bit ``t % 32`` of word ``t // 32`` set = token t allowed),
applied with xgrammar's ``apply_token_bitmask_inplace`` (its CPU kernel on a CPU, Triton on CUDA).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from dflash_sglang.core.sampling import processed_probs, sample_from
from dflash_sglang.serving.kv_slots import upload


@dataclasses.dataclass
class BlockGrammar:
    """One decode step's grammar constraints on the device, for the requests with an active grammar.

    ``masks`` [G, B, W] int32 (W = ceil(V / 32) words for xgrammar): the token bitmask of each grammar
    request's verify rows (request ``batch_indices[g]``, rows ``b * B .. b * B + B - 1`` of the verify
    logits); ``token_caps`` [bs] int64: the most tokens each request may emit this step (where its grammar
    terminates; a large number elsewhere), or None when no grammar terminates within the step.
    """

    masks: torch.Tensor
    batch_indices: list[int]
    token_caps: Optional[torch.Tensor]

    def constrain_verify(self, target_logits: torch.Tensor, budgets: torch.Tensor) -> torch.Tensor:
        """Masks the verify logits in place (``target_logits`` [bs * B, V], -inf where the grammar refuses the
        token) and returns ``budgets`` ([bs] int64, tokens each request may emit) cut at ``token_caps``."""
        block_size = self.masks.shape[1]
        for masks, b in zip(self.masks.unbind(0), self.batch_indices):
            apply_masks(target_logits[b * block_size:(b + 1) * block_size], masks)
        return budgets if self.token_caps is None else torch.minimum(budgets, self.token_caps)


def constrain_drafts(batch, draft_logits: torch.Tensor, block: torch.Tensor,
                     draft_probs: Optional[torch.Tensor]) -> Optional[BlockGrammar]:
    """Redraws the drafts of every request with an active grammar under its masks (the walk in the module
    docstring) and returns the step's :class:`BlockGrammar`, or None when no request has an active grammar.

    Args:
        batch: the step's ``ModelWorkerBatch`` (``reqs``, ``sampling_info``).
        draft_logits: [bs, B-1, >= V] the drafter's logits of block positions 1..B-1.
        block: [bs, B] int64 ``[t0, drafts]``, the verify pass's input; grammar requests' drafts are rewritten.
        draft_probs: [bs * (B-1), >= V] fp32 the drafter distribution the drafts were sampled from (None for an
            all-greedy batch); grammar requests' rows are replaced by the masked distribution.
    """
    active = [b for b, req in enumerate(batch.reqs) if _is_active(req.grammar)]
    if not active:
        return None
    sampling, vocab_size = batch.sampling_info, batch.sampling_info.vocab_size
    bs, block_size = block.shape
    index = upload(torch.tensor(active, dtype=torch.int64), block.device.type, block.device)
    logits_cpu = draft_logits[index, :, :vocab_size].float().cpu()  # the host wait
    params = None if draft_probs is None else [
        values[index].view(-1).tolist() for values in (sampling.temperatures, sampling.top_ps, sampling.top_ks)]
    # The mask width is the grammar backend's (llguidance's follows its tokenizer, not the model's vocabulary).
    width = batch.reqs[active[0]].grammar.allocate_vocab_mask(vocab_size, 1, "cpu").shape[-1]
    masks = torch.full((len(active), block_size, width), -1, dtype=torch.int32)
    caps = torch.full((bs,), torch.iinfo(torch.int64).max, dtype=torch.int64)
    draft_at, drafts, probs = [], [], []  # flat positions in ``block``, their tokens, their rows' q
    for g, b in enumerate(active):
        row_params = None if params is None else tuple(values[g] for values in params)
        walk = _walk(batch.reqs[b].grammar, logits_cpu[g], masks[g], row_params)
        draft_at += [b * block_size + 1 + j for j in range(len(walk.drafts))]
        drafts += walk.drafts
        probs += walk.probs
        if walk.token_cap is not None:
            caps[b] = walk.token_cap
    if drafts:
        draft_at_device = upload(torch.tensor(draft_at, dtype=torch.int64), block.device.type, block.device)
        block.view(-1)[draft_at_device] = upload(torch.tensor(drafts, dtype=torch.int64), block.device.type,
                                                 block.device)
        if draft_probs is not None:  # block position p of request b is draft row b * (B-1) + p - 1
            rows = draft_at_device - draft_at_device // block_size - 1
            masked_probs = torch.zeros(len(probs), draft_probs.shape[-1])  # zero past V (a padded head)
            masked_probs[:, :vocab_size] = torch.stack(probs)
            draft_probs[rows] = upload(masked_probs, block.device.type, block.device)
    terminated = bool((caps < torch.iinfo(torch.int64).max).any())
    return BlockGrammar(upload(masks, block.device.type, block.device), active,
                        upload(caps, block.device.type, block.device) if terminated else None)


@dataclasses.dataclass
class _Walk:
    drafts: list[int]  # the drafts of block positions 1..len(drafts), each allowed by the grammar
    probs: list[torch.Tensor]  # [V] fp32 masked drafter distribution of each draft (sampling only)
    token_cap: Optional[int]  # the most tokens the step may emit, when the grammar terminates within it


def _walk(grammar, logits: torch.Tensor, masks: torch.Tensor, row_params: Optional[tuple]) -> _Walk:
    """One request's walk (module docstring): fills ``masks`` [B, W] (row j: the grammar after t0, d_1..d_j)
    and draws d_{j+1} from ``logits`` [B-1, V] row j under mask j; ``row_params`` (temperature, top_p, top_k)
    samples, None takes the argmax. The grammar is rolled back to where it started."""
    block_size = masks.shape[0]
    walk = _Walk([], [], None)
    for j in range(block_size):
        if grammar.is_terminated():
            walk.token_cap = max(j, 1)
            break
        grammar.fill_vocab_mask(masks, j)
        if j == block_size - 1:
            break
        row = logits[j].clone()
        apply_masks(row[None], masks[j:j + 1])
        if row_params is None:
            draft = int(row.argmax())
        else:
            q = processed_probs(row[None], *row_params)
            draft = int(sample_from(q)[0])
            walk.probs.append(q[0])
        grammar.accept_token(draft)
        walk.drafts.append(draft)
    if walk.drafts:
        grammar.rollback(len(walk.drafts))
    return walk


def apply_masks(logits: torch.Tensor, masks: torch.Tensor) -> None:
    """-inf in ``logits`` [R, V] wherever ``masks`` [R, W] int32 has a 0 bit, and past its 32 * W tokens (as
    llguidance's ``apply_token_bitmask_inplace`` does when the mask is narrower than the logits).

    xgrammar is imported here, at the first constrained step, not with the module: the worker imports this module
    whatever the requests, and a server without xgrammar (SGLang imports its grammar backends lazily) must still
    serve unconstrained requests."""
    from xgrammar import apply_token_bitmask_inplace  # xgrammar's CPU kernel on a CPU, Triton on CUDA

    apply_token_bitmask_inplace(logits, masks)
    logits[:, 32 * masks.shape[-1]:] = float("-inf")


def _is_active(grammar) -> bool:
    """Whether the request's grammar still acts: SGLang masks its next token unless it has terminated
    (``SamplingBatchInfo.update_regex_vocab_mask``), and a terminated one finishes the request at its next token."""
    return grammar is not None and not grammar.finished
