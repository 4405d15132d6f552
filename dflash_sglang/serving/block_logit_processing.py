# SPDX-License-Identifier: Apache-2.0
"""Per-request logit processing inside a DFLASH block, exactly as SGLang applies it token by token without
speculation: frequency / presence / repetition penalties, ``min_new_tokens`` and ``logit_bias``.

Without speculation SGLang processes a decode step's logits with its penalizers (sgl-project/sglang
``python/sglang/srt/sampling/penaltylib/``: each counts the request's output tokens so far) and then adds the
batch's ``logit_bias`` (``sampling_batch_info.py``, ``apply_logits_bias``); the sampler then applies
temperature, top-k, top-p and min-p (``core.sampling``). In a block ``[t0, d1, ..., d_{B-1}]`` the target's
verify row j predicts output token ``L + j`` (``L`` output tokens so far, t0 included), so its counts are the
request's output plus ``d1..dj``, and ``min_new_tokens`` compares ``L + j``. :class:`StepLogits` applies
that to the verify rows one after the other, and the same to the drafter's rows as the drafts are chosen
(so the drafts follow the penalized distribution and stay acceptable); the verdict then reads the processed
rows, so greedy output and the sampling distribution are the plain server's.

Per-step arithmetic follows SGLang's, so results are bit-identical: the frequency penalty is accumulated by
adding the penalty once per occurrence (fp32), presence subtracts the penalty of seen tokens, repetition
uses SGLang's own ``apply_scaling_penalties``. Within one request the order is frequency, presence,
min_new_tokens, repetition, then ``logit_bias``: SGLang's overlap-loop order (additive penalties, then
scaling). Its loop without overlap applies the penalizers in the iteration order of a set of classes, which
varies between processes, so a request combining repetition with frequency or presence (or frequency with
presence, to the last bit) has no fixed reference there; every other combination is order-free.

State (:class:`OutputTokenTable`): the output tokens of each request with a frequency / presence /
repetition penalty live in device rows, so that the overlap loop, whose host ``output_ids`` lag a step,
never reads them from the host: a row is seeded at prefill (the host's ``output_ids``, exact then, plus the
sampled token) and every step adds its emitted tokens on the device. Batches using none of these options
pay one cached host check per step. A request prefilled again after a retraction keeps its penalties: SGLang
would sample that prefill's token with fresh penalizers, so :meth:`BlockLogitProcessor.prefill_sampling_info`
hands its sampler the complete ones.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from sglang.srt.sampling.penaltylib.repetition_penalty import apply_scaling_penalties

from dflash_sglang import ops
from dflash_sglang.core.sampling import processed_probs, sample_from
from dflash_sglang.serving.kv_slots import upload


def _on_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    return upload(host, device.type, device)  # pinned and non-blocking: the overlap loop's host never waits


def _penalized(params) -> bool:
    return params.frequency_penalty != 0.0 or params.presence_penalty != 0.0 or params.repetition_penalty != 1.0


class OutputTokenTable:
    """Device rows of per-request output-token state, for the requests with a frequency, presence or
    repetition penalty: ``frequency`` [rows, V + 1] fp32 (each output token adds its request's
    frequency penalty, as SGLang's ``BatchedFrequencyPenalizer`` accumulates it) and ``seen`` [rows, V + 1]
    bool. Column V is a sink for padding. Allocated at the first such request, grown by doubling.

    Invariant: the row of a live request holds its output tokens (t0 included) once the device has run
    the step that emitted them. A row is owned by a request from its prefill until it finishes or leaves
    its request-pool slot (retraction); it is then reused.
    """

    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self.frequency: Optional[torch.Tensor] = None
        self.seen: Optional[torch.Tensor] = None
        self.owners: list = []  # per row: the request it belongs to, or None
        self.version = 0  # bumped when a row changes owner (cached per-batch rules must be rebuilt)

    def row_of(self, req) -> int:
        return getattr(req, "_dflash_penalty_row", -1)

    def seed(self, reqs: list, sampled: torch.Tensor) -> None:
        """At prefill: each penalized request's row := its ``output_ids`` plus ``sampled`` ([bs] int64, the
        token this prefill emits, or a chunk's placeholder that the last chunk's seeding replaces)."""
        positions = [i for i, req in enumerate(reqs) if _penalized(req.sampling_params)]
        if not positions:
            return
        rows = [self._assign(reqs[i]) for i in positions]
        history = [list(reqs[i].output_ids) for i in positions]
        width = max(len(ids) for ids in history) + 1
        tokens = torch.full((len(positions), width), self.vocab_size, dtype=torch.int64)
        for k, ids in enumerate(history):
            tokens[k, :len(ids)] = torch.tensor(ids, dtype=torch.int64)
        tokens = _on_device(tokens, self.device)
        positions_device = _on_device(torch.tensor(positions, dtype=torch.int64), self.device)
        tokens[:, -1] = sampled.to(torch.int64)[positions_device]
        rows_device = _on_device(torch.tensor(rows, dtype=torch.int64), self.device)
        self.frequency[rows_device] = 0.0
        self.seen[rows_device] = False
        penalties = _on_device(torch.tensor([reqs[i].sampling_params.frequency_penalty for i in positions],
                                            dtype=torch.float32), self.device)
        self.add(rows_device, penalties, tokens)

    def add(self, rows: torch.Tensor, frequency_penalties: torch.Tensor, tokens: torch.Tensor) -> None:
        """Counts ``tokens`` ([m, n] int64; ids >= V or < 0 are padding) into ``rows`` ([m] int64) with each
        row's ``frequency_penalties`` ([m] fp32). Adding the same value k times in any order gives SGLang's
        sequential fp32 sum, so duplicates need no ordering."""
        tokens = torch.where((tokens >= 0) & (tokens < self.vocab_size), tokens, self.vocab_size)
        index = (rows[:, None].expand_as(tokens), tokens)
        self.frequency.index_put_(index, frequency_penalties[:, None].expand_as(tokens), accumulate=True)
        self.seen.index_put_(index, torch.ones_like(tokens, dtype=torch.bool))

    def _assign(self, req) -> int:
        row = self.row_of(req)
        if 0 <= row < len(self.owners) and self.owners[row] is req:
            return row
        free = [r for r, owner in enumerate(self.owners) if owner is None or owner.finished()
                or owner.req_pool_idx is None]
        if not free:
            free = [self._grow()]
        row = free[0]
        if self.owners[row] is not None:
            self.owners[row]._dflash_penalty_row = -1
        self.owners[row] = req
        req._dflash_penalty_row = row
        self.version += 1
        return row

    def _grow(self) -> int:
        old = len(self.owners)
        size = max(8, 2 * old)
        frequency = torch.zeros(size, self.vocab_size + 1, dtype=torch.float32, device=self.device)
        seen = torch.zeros(size, self.vocab_size + 1, dtype=torch.bool, device=self.device)
        if old:
            frequency[:old] = self.frequency
            seen[:old] = self.seen
        self.frequency, self.seen = frequency, seen
        self.owners.extend([None] * (size - old))
        return old


class BlockLogitRules:
    """What one batch's block rows are processed with (module docstring); built by
    :meth:`BlockLogitProcessor.for_step` and cached while the batch's requests stay the same. Per-request tensors
    are [bs, 1] (None when no request of the batch uses the option)."""

    def __init__(self, reqs: list, table: OutputTokenTable, vocab_size: int, device: torch.device) -> None:
        params = [req.sampling_params for req in reqs]

        def column(values: list[float], neutral: float) -> Optional[torch.Tensor]:
            if all(v == neutral for v in values):
                return None
            return _on_device(torch.tensor(values, dtype=torch.float32).view(-1, 1), device)

        self.table = table
        self.frequency = column([p.frequency_penalty for p in params], 0.0)
        self.presence = column([p.presence_penalty for p in params], 0.0)
        self.repetition = column([p.repetition_penalty for p in params], 1.0)
        owned = [(i, table.row_of(req)) for i, req in enumerate(reqs) if table.row_of(req) >= 0]
        self.owned_positions = _on_device(torch.tensor([i for i, _ in owned], dtype=torch.int64), device)
        self.owned_rows = _on_device(torch.tensor([r for _, r in owned], dtype=torch.int64), device)
        self.min_new_tokens = self.origin_lens = self.stop_penalties = None
        if any(p.min_new_tokens > 0 for p in params):
            self.min_new_tokens = _on_device(torch.tensor([p.min_new_tokens for p in params]), device)
            self.origin_lens = _on_device(torch.tensor([len(req.origin_input_ids) for req in reqs]), device)
            self.stop_penalties = _stop_penalties(reqs, vocab_size, device)
        self.frequency_penalties = (self.frequency if self.frequency is not None
                                    else torch.zeros(len(reqs), 1, device=device)).view(-1)

    def commit(self, emitted: torch.Tensor) -> None:
        """Counts a step's emitted tokens ([bs, B] int64, -1 padded) into the requests' rows."""
        if self.owned_rows.numel():
            self.table.add(self.owned_rows, self.frequency_penalties[self.owned_positions],
                           emitted[self.owned_positions])


class _BlockCursor:
    """Walks the rows of one block: ``process(row, j)`` applies the rules to block row j's logits ([bs, V],
    in place), ``advance(tokens)`` appends the block token that follows row j ([bs] int64)."""

    def __init__(self, rules: BlockLogitRules, logit_bias: Optional[torch.Tensor], prefix_lens: torch.Tensor):
        self.rules, self.logit_bias = rules, logit_bias
        table, bs = rules.table, prefix_lens.shape[0]
        self.frequency = self.seen = None
        if rules.owned_rows.numel() and table.frequency is not None:
            vocab = table.vocab_size + 1
            self.frequency = torch.zeros(bs, vocab, dtype=torch.float32, device=prefix_lens.device)
            self.seen = torch.zeros(bs, vocab, dtype=torch.bool, device=prefix_lens.device)
            self.frequency[rules.owned_positions] = table.frequency[rules.owned_rows]
            self.seen[rules.owned_positions] = table.seen[rules.owned_rows]
        if rules.min_new_tokens is not None:  # output tokens so far: committed KV + t0 - the prompt
            self.output_lens = prefix_lens.to(torch.int64) + 1 - rules.origin_lens

    def process(self, logits: torch.Tensor, j: int) -> None:
        rules, vocab = self.rules, logits.shape[-1]
        if self.frequency is not None:
            if rules.frequency is not None:
                logits.sub_(self.frequency[:, :vocab])
            if rules.presence is not None:
                logits.sub_(torch.where(self.seen[:, :vocab], rules.presence, 0.0))
        if rules.min_new_tokens is not None:
            below = (self.output_lens + j < rules.min_new_tokens)[:, None]
            logits.add_(torch.where(below, rules.stop_penalties, 0.0))
        if self.frequency is not None and rules.repetition is not None:
            apply_scaling_penalties(logits, torch.where(self.seen[:, :vocab], rules.repetition, 1.0))
        if self.logit_bias is not None:
            logits.add_(self.logit_bias)

    def advance(self, tokens: torch.Tensor) -> None:
        if self.frequency is not None:
            index = tokens.view(-1, 1)
            self.frequency.scatter_add_(1, index, self.rules.frequency_penalties.view(-1, 1))
            self.seen.scatter_(1, index, True)


def _stop_penalties(reqs: list, vocab_size: int, device: torch.device) -> torch.Tensor:
    """[bs, V] fp32: -inf at the tokens SGLang's ``BatchedMinNewTokensPenalizer`` blocks before
    ``min_new_tokens`` (stop_token_ids, the tokenizer's additional stop ids and its EOS), 0 elsewhere."""
    penalties = torch.zeros(len(reqs), vocab_size, dtype=torch.float32)
    for i, req in enumerate(reqs):
        ids = set(req.sampling_params.stop_token_ids or ()) | set(req.tokenizer.additional_stop_token_ids or ())
        ids.add(req.tokenizer.eos_token_id)
        ids = [t for t in ids if t is not None and 0 <= t < vocab_size]
        penalties[i, ids] = float("-inf")
    return _on_device(penalties, device)


class StepLogits:
    """One decode step's processing (module docstring): :meth:`draft` chooses the drafts row by row,
    :meth:`verify` processes the target's verify rows in place, :meth:`commit` counts the emitted tokens."""

    def __init__(self, rules: BlockLogitRules, sampling_info, prefix_lens: torch.Tensor, vocab_size: int) -> None:
        self.rules, self.sampling_info, self.prefix_lens = rules, sampling_info, prefix_lens
        self.vocab_size = vocab_size

    def _cursor(self) -> _BlockCursor:
        return _BlockCursor(self.rules, self.sampling_info.logit_bias, self.prefix_lens)

    def draft(self, draft_logits: torch.Tensor, block: torch.Tensor) -> Optional[torch.Tensor]:
        """Writes the drafts over ``block[:, 1:]`` ([bs, B] int64), draft j + 1 chosen from the drafter's row j
        of ``draft_logits`` ([bs, B-1, V'], processed in place) as it stands after drafts 1..j. Returns the
        proposal's probabilities [bs, B-1, V] fp32 when the batch samples, else None (argmax)."""
        cursor, probs = self._cursor(), []
        greedy = self.sampling_info.is_all_greedy
        for j in range(block.shape[1] - 1):
            row = draft_logits[:, j, :self.vocab_size]
            cursor.process(row, j)
            if greedy:
                tokens = ops.argmax(row)
            else:
                probs.append(processed_probs(row, *row_sampling(self.sampling_info, 1)))
                tokens = sample_from(probs[-1])
            block[:, j + 1] = tokens
            cursor.advance(tokens)
        return None if greedy else torch.stack(probs, dim=1)

    def verify(self, target_logits: torch.Tensor, block: torch.Tensor) -> None:
        """Processes the verify logits ([bs * B, V], in place): row j sees the block's tokens 1..j."""
        bs, block_size = block.shape
        rows, cursor = target_logits.view(bs, block_size, -1), self._cursor()
        for j in range(block_size):
            cursor.process(rows[:, j], j)
            if j + 1 < block_size:
                cursor.advance(block[:, j + 1])

    def commit(self, emitted: torch.Tensor) -> None:
        """Counts the step's emitted tokens ([bs, B] int64, -1 padded) into the requests' rows."""
        self.rules.commit(emitted)


class BlockLogitProcessor:
    """The worker's entry points: :meth:`seed` at prefill, :meth:`for_step` at each decode step (None for a
    batch that uses none of the options: the step's fast paths stay as they are)."""

    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.vocab_size, self.device = vocab_size, device
        self.table = OutputTokenTable(vocab_size, device)
        self._no_counts = BlockLogitRules([], self.table, vocab_size, device)  # logit_bias alone
        self._cache: tuple[list, int, Optional[BlockLogitRules]] = ([], -1, None)

    def seed(self, reqs: list, sampled: torch.Tensor) -> None:
        """After a prefill (``sampled``: [bs] the tokens it emits): see :meth:`OutputTokenTable.seed`."""
        self.table.seed(reqs, sampled)

    def prefill_sampling_info(self, batch):
        """The ``sampling_info`` a prefill samples with: SGLang's, unless the batch resumes a request with
        earlier output (retracted, prefilled again) and a penalty or ``min_new_tokens``. SGLang's prefill would
        sample its token with fresh penalizers; this one carries every request's penalties as SGLang's
        overlap loop hands them to its sampler (``acc_additive_penalties`` / ``acc_scaling_penalties``),
        counted from the host's ``output_ids`` (exact at a prefill), so the token is the one it would have
        chosen without the retraction. A rare path: built on the host, once per such prefill."""
        reqs, info = batch.reqs, batch.sampling_info
        if not any(req.output_ids and (_penalized(req.sampling_params) or req.sampling_params.min_new_tokens > 0)
                   for req in reqs):
            return info
        additive = torch.zeros(len(reqs), self.vocab_size, dtype=torch.float32)
        scaling = torch.ones(len(reqs), self.vocab_size, dtype=torch.float32)
        stop_penalties = _stop_penalties(reqs, self.vocab_size, torch.device("cpu"))
        for i, req in enumerate(reqs):
            params, ids = req.sampling_params, torch.tensor(req.output_ids, dtype=torch.int64)
            seen = torch.zeros(self.vocab_size, dtype=torch.bool)
            seen[ids] = True
            additive[i].index_add_(0, ids, torch.full(ids.shape, -params.frequency_penalty))
            additive[i].sub_(torch.where(seen, params.presence_penalty, 0.0))
            if len(req.output_ids) < params.min_new_tokens:
                additive[i].add_(stop_penalties[i])
            scaling[i] = torch.where(seen, params.repetition_penalty, 1.0)
        return dataclasses.replace(info, penalizer_orchestrator=None,
                                   acc_additive_penalties=_on_device(additive, self.device),
                                   acc_scaling_penalties=_on_device(scaling, self.device))

    def for_step(self, batch, prefix_lens: torch.Tensor) -> Optional[StepLogits]:
        """``batch``: the step's ``ModelWorkerBatch``; ``prefix_lens`` [bs] int64 its committed KV lengths."""
        reqs, (cached_reqs, version, rules) = batch.reqs, self._cache
        if not (version == self.table.version and len(cached_reqs) == len(reqs)
                and all(a is b for a, b in zip(cached_reqs, reqs))):
            needed = any(_penalized(req.sampling_params) or req.sampling_params.min_new_tokens > 0 for req in reqs)
            rules = BlockLogitRules(reqs, self.table, self.vocab_size, self.device) if needed else None
            self._cache = (list(reqs), self.table.version, rules)
        if rules is None and batch.sampling_info.logit_bias is not None:
            rules = self._no_counts
        return None if rules is None else StepLogits(rules, batch.sampling_info, prefix_lens, self.vocab_size)


def row_sampling(sampling_info, rows_per_request: int) -> tuple:
    """Each request's temperature, top-p, top-k and min-p (0 unless some request of the batch sets it, as
    SGLang's sampler skips min-p then) repeated over its ``rows_per_request`` block rows."""
    params = [sampling_info.temperatures, sampling_info.top_ps, sampling_info.top_ks]
    min_p = [sampling_info.min_ps] if sampling_info.need_min_p_sampling else []
    return tuple(value.view(-1).repeat_interleave(rows_per_request) for value in params + min_p)
