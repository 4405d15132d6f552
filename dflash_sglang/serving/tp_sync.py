# SPDX-License-Identifier: Apache-2.0
"""One decision on every tensor-parallel rank: the drafts and the verifier's inputs that come from sampling.

Every rank runs the whole DFLASH step on the same full (all-gathered) logits, and SGLang seeds every rank's
random generator with the same ``--random-seed``, so greedy argmaxes, sampled drafts and rejection-sampling
uniforms are the same on every rank without communication -- as SGLang's own sampler assumes (sgl-project/sglang
``python/sglang/srt/layers/sampler.py``, ``Sampler._sync_token_ids_across_tp``). Where SGLang does not trust that
(``SYNC_TOKEN_IDS_ACROSS_TP=1``, or a batch with grammars) it all-reduces the sampled ids with MIN over the TP
group; :func:`sync_across_tp` does the same for DFLASH's drafts, target ids and uniforms, so the ranks cannot part
even where a kernel is not bitwise deterministic.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from sglang.srt.distributed import get_tp_group
from sglang.srt.layers.dp_attention import get_attention_tp_group, is_dp_attention_enabled
from sglang.srt.layers.sampler import SYNC_TOKEN_IDS_ACROSS_TP


def sync_across_tp(tensor: torch.Tensor, sampling_info) -> torch.Tensor:
    """Returns ``tensor`` (ids or uniforms, any shape), made the same on every TP rank in place by SGLang's
    MIN all-reduce where SGLang's sampler would sync its sampled ids; otherwise untouched."""
    group = get_attention_tp_group() if is_dp_attention_enabled() else get_tp_group()
    if group.world_size > 1 and (SYNC_TOKEN_IDS_ACROSS_TP or sampling_info.grammars):
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=group.device_group)
    return tensor
