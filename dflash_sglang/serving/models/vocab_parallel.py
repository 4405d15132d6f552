# SPDX-License-Identifier: Apache-2.0
"""Lookups in, and logits out of, the target's embedding and LM head as SGLang shards them over tensor-parallel
ranks: the drafter shares those tensors (no copy), so at ``--tp-size N`` it holds this rank's vocabulary rows.

SGLang's ``VocabParallelEmbedding`` / ``ParallelLMHead`` (sgl-project/sglang
``python/sglang/srt/layers/vocab_parallel_embedding.py``) pad the vocabulary to a multiple of 64, split the padded
rows evenly and give rank ``r`` rows ``r * rows .. (r + 1) * rows - 1``; a lookup masks the ids outside the shard
and all-reduces, and ``LogitsProcessor`` (``layers/logits_processor.py``) all-gathers the logits shards along the
vocabulary and cuts the padding. The same here, so every rank sees the same full embeddings and logits. A weight
with at least ``vocab_size`` rows is a replicated table (``--tp-size 1``, or a target that does not shard it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sglang.srt.distributed import (get_tensor_model_parallel_rank, tensor_model_parallel_all_gather,
                                    tensor_model_parallel_all_reduce)


def is_sharded(weight: torch.Tensor, vocab_size: int) -> bool:
    return weight.shape[0] < vocab_size


def embed(ids: torch.Tensor, weight: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[n] int64 token ids -> [n, hidden] rows of the (possibly sharded) embedding ``weight``, the same on every
    rank."""
    if not is_sharded(weight, vocab_size):
        return F.embedding(ids, weight)
    rows = weight.shape[0]
    local = ids - get_tensor_model_parallel_rank() * rows
    outside = (local < 0) | (local >= rows)
    hidden = F.embedding(local.masked_fill(outside, 0), weight).masked_fill(outside[:, None], 0)
    return tensor_model_parallel_all_reduce(hidden)


def logits(hidden: torch.Tensor, weight: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[n, hidden] -> [n, vocab_size] logits through the (possibly sharded) LM head ``weight``, all-gathered along
    the vocabulary when sharded: the same full logits on every rank."""
    out = F.linear(hidden, weight)
    if is_sharded(weight, vocab_size):
        out = tensor_model_parallel_all_gather(out, dim=-1)
    return out[:, :vocab_size]
