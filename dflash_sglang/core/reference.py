# SPDX-License-Identifier: Apache-2.0
"""The reference DFlash speculative decoder: plain PyTorch + transformers, one request at a time.

It is the oracle for the SGLang worker (same acceptance op, same sampling distribution) and the
executable form of the algorithm in the notes:

1. prefill: the target runs the prompt with ``output_hidden_states``; the first new token is its argmax
   (or a sample); the prompt's features (``hidden_states[i + 1]`` for ``i`` in ``target_layer_ids``,
   concatenated) become the drafter's context, kept as per-layer K/V (:meth:`DFlashDrafter.context_kv`);
2. draft: the block ``[last token, mask * (B - 1)]``, embedded with the TARGET's embedding (times
   ``input_embedding_scale``), goes through the drafter; positions 1.. go through the target's LM head;
   proposals are the argmax (greedy) or samples from the drafter's processed distribution q;
3. verify: one target pass over the block (causal, on top of its ``DynamicCache``);
4. accept: :func:`dflash_sglang.ops.verify_block` (greedy prefix match + bonus, or rejection sampling),
   which also cuts at stop tokens and at the ``max_new_tokens`` budget inside the block;
5. commit: the target cache is cropped to the kept tokens (the block's first token and the emitted drafts
   but the last), and their features extend the drafter's context.

Acceptance length per step = tokens emitted by that verify step (accepted drafts + bonus, after cuts).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from dflash_sglang.core.model import DFlashDrafter
from dflash_sglang.ops import verify_block
from dflash_sglang.core.sampling import processed_probs, sample_from

MAX_BLOCK_SIZE = 32  # verify_block's limit


@dataclass
class ReferenceResult:
    """One request's outcome.

    Invariant: ``len(output_ids) == (1 if output_ids else 0) + sum(acceptance_lengths)`` (the prefill
    emits the first token; each verify step emits ``acceptance_lengths[i]`` more) and
    ``num_verify_steps == len(acceptance_lengths)``.
    """

    output_ids: list[int]  # generated tokens only, without the prompt
    acceptance_lengths: list[int] = field(default_factory=list)
    num_verify_steps: int = 0


@dataclass
class _Sampling:
    temperature: float
    top_p: float
    top_k: int
    generator: torch.Generator

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def probs(self, logits: torch.Tensor) -> torch.Tensor:  # [n, V] -> [n, V] fp32
        return processed_probs(logits.float(), self.temperature, self.top_p, self.top_k)

    def pick(self, logits: torch.Tensor) -> torch.Tensor:  # [n, V] -> [n] int64
        if self.greedy:
            return logits.argmax(dim=-1)
        return sample_from(self.probs(logits), self.generator)


def _make_sampling(temperature: float, top_p: float, top_k: int, seed: int | None,
                   device: torch.device) -> _Sampling:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not isinstance(top_k, int) or isinstance(top_k, bool):
        raise ValueError(f"top_k must be an integer (<= 0 = whole vocabulary), got {top_k!r}")
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return _Sampling(float(temperature), float(top_p), int(top_k), generator)


def _device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def _check_prompts(prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty: every request needs at least one token")


def _features(hidden_states: Sequence[torch.Tensor], layer_ids: Sequence[int]) -> torch.Tensor:
    """The drafter's context features of one request: [n, len(layer_ids) * hidden]."""
    return torch.cat([hidden_states[i + 1][0] for i in layer_ids], dim=-1)


def _run_target(target, tokens: torch.Tensor, positions: torch.Tensor, cache: DynamicCache,
                hidden_states: bool):
    """tokens/positions: [n] int64 -> (logits [n, V] fp32, hidden_states tuple or None)."""
    out = target(input_ids=tokens[None], position_ids=positions[None], past_key_values=cache, use_cache=True,
                 output_hidden_states=hidden_states)
    return out.logits[0].float(), (out.hidden_states if hidden_states else None)


@torch.inference_mode()
def target_generate(target, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 0.0,
                    top_p: float = 1.0, top_k: int = 0, stop_token_ids: Sequence[int] = (),
                    seed: int | None = None) -> list[list[int]]:
    """Target-only decoding, one token per forward, with the same sampling code as :func:`generate`.

    Returns each request's generated tokens (stop token included, prompt excluded).
    """
    _check_prompts(prompts, max_new_tokens)
    device = _device(target)
    sampling = _make_sampling(temperature, top_p, top_k, seed, device)
    stops = set(stop_token_ids)
    outputs = []
    for prompt in prompts:
        cache = DynamicCache(config=target.config)
        tokens = torch.tensor(list(prompt), dtype=torch.int64, device=device)
        positions = torch.arange(len(prompt), device=device)
        output: list[int] = []
        while len(output) < max_new_tokens and not (output and output[-1] in stops):
            logits, _ = _run_target(target, tokens, positions, cache, hidden_states=False)
            output.append(int(sampling.pick(logits[-1:])[0]))
            tokens = torch.tensor([output[-1]], dtype=torch.int64, device=device)
            positions = positions[-1:] + 1
        outputs.append(output)
    return outputs


@torch.inference_mode()
def generate(target, drafter: DFlashDrafter, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             block_size: int | None = None, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             stop_token_ids: Sequence[int] = (), seed: int | None = None) -> list[ReferenceResult]:
    """DFlash speculative decoding of a batch of (ragged) prompts, processed one at a time.

    Args:
        target: a transformers causal LM (Qwen3, Llama, ...) whose ``config`` the drafter was made for.
        drafter: the :class:`DFlashDrafter`.
        prompts: token ids per request.
        max_new_tokens: generated-token budget per request (the first token from the prefill included).
        block_size: tokens per verify block (the block's first token + ``block_size - 1`` drafts);
            defaults to the drafter's ``block_size``. The drafter's attention has no fixed length, so other
            sizes in [2, 32] run too (acceptance is best at the trained size).
        temperature: 0 = greedy; otherwise speculative rejection sampling with the same
            temperature / top-p / top-k processing for the target's p and the drafter's q.
        top_p, top_k: as in SGLang (``top_k <= 0`` = whole vocabulary); see ``dflash_sglang.core.sampling``.
        stop_token_ids: generation stops after emitting any of these (the stop token is kept).
        seed: seeds the one ``torch.Generator`` used for every draw of the call (requests in order).
    Returns:
        One :class:`ReferenceResult` per prompt.
    """
    _check_prompts(prompts, max_new_tokens)
    config = drafter.config
    config.check_target(target.config)
    block_size = config.block_size if block_size is None else block_size
    if not 2 <= block_size <= MAX_BLOCK_SIZE:
        raise ValueError(f"block_size must be in [2, {MAX_BLOCK_SIZE}], got {block_size}")
    device = _device(target)
    sampling = _make_sampling(temperature, top_p, top_k, seed, device)
    stop_ids = torch.tensor([list(stop_token_ids) or [-1]], dtype=torch.int64, device=device)
    return [_generate_one(target, drafter, list(prompt), max_new_tokens, block_size, sampling, stop_ids)
            for prompt in prompts]


def _generate_one(target, drafter: DFlashDrafter, prompt: list[int], max_new_tokens: int, block_size: int,
                  sampling: _Sampling, stop_ids: torch.Tensor) -> ReferenceResult:
    config = drafter.config
    device = _device(target)
    draft_dtype = drafter.fc.weight.dtype
    embedding = target.get_input_embeddings().weight
    lm_head = target.get_output_embeddings().weight
    embedding_scale = config.input_embedding_scale if config.input_embedding_scale is not None else 1.0
    result = ReferenceResult(output_ids=[])
    if max_new_tokens == 0:
        return result

    # Prefill: the first token, the target's cache, and the prompt as the drafter's context.
    cache = DynamicCache(config=target.config)
    context_positions = torch.arange(len(prompt), device=device)
    logits, hidden = _run_target(target, torch.tensor(prompt, device=device), context_positions, cache,
                                 hidden_states=True)
    result.output_ids.append(int(sampling.pick(logits[-1:])[0]))
    context = drafter.context_kv(_features(hidden, config.target_layer_ids).to(draft_dtype), context_positions)
    stops = set(stop_ids[0].tolist())

    while len(result.output_ids) < max_new_tokens and result.output_ids[-1] not in stops:
        start = len(prompt) + len(result.output_ids) - 1  # position of the block's first token
        positions = torch.arange(start, start + block_size, device=device)
        block = torch.full((block_size,), config.mask_token_id, dtype=torch.int64, device=device)
        block[0] = result.output_ids[-1]

        # Draft.
        noise = F.embedding(block, embedding) * embedding_scale
        draft_hidden = drafter(noise.to(draft_dtype), positions, context, context_positions)
        draft_logits = drafter.compute_logits(draft_hidden[1:].to(lm_head.dtype), lm_head)  # [B-1, V]
        if sampling.greedy:
            draft_probs = None
            block[1:] = draft_logits.argmax(dim=-1)
        else:
            draft_probs = sampling.probs(draft_logits)
            block[1:] = sample_from(draft_probs, sampling.generator)

        # Verify + accept. The block's "KV slots" are its positions (the cache is contiguous).
        logits, hidden = _run_target(target, block, positions, cache, hidden_states=True)
        budget = torch.tensor([max_new_tokens - len(result.output_ids)], dtype=torch.int64, device=device)
        prefix_lens = torch.tensor([start], dtype=torch.int64, device=device)
        if sampling.greedy:
            verdict = verify_block(block[None], positions[None], prefix_lens, stop_ids, budget,
                                   target_ids=logits.argmax(dim=-1)[None])
        else:
            uniforms = torch.rand(1, block_size, generator=sampling.generator, device=device)
            verdict = verify_block(block[None], positions[None], prefix_lens, stop_ids, budget,
                                   target_probs=sampling.probs(logits)[None], draft_probs=draft_probs[None],
                                   uniforms=uniforms)
        num_emitted = int(verdict[1][0])
        result.output_ids.extend(verdict[2][0, :num_emitted].tolist())
        result.acceptance_lengths.append(num_emitted)

        # Commit: keep the target KV of the block's first token and of the emitted drafts but the last (that
        # one, or the bonus, is the next block's first token); their features become drafter context.
        kept = max(num_emitted, 1)
        cache.crop(start + kept)
        new_context = drafter.context_kv(_features(hidden, config.target_layer_ids)[:kept].to(draft_dtype),
                                         positions[:kept])
        context = [(torch.cat([k, new_k]), torch.cat([v, new_v]))
                   for (k, v), (new_k, new_v) in zip(context, new_context)]
        context_positions = torch.cat([context_positions, positions[:kept]])
        if bool(verdict[6][0]):
            break
    result.num_verify_steps = len(result.acceptance_lengths)
    return result
