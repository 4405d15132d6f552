# SPDX-License-Identifier: Apache-2.0
"""Whether SGLang's tensor-parallel layers can split a model's sizes over ``--tp-size`` ranks, checked before any
layer is built, so a size that does not divide fails naming itself instead of in an assert deep in a layer.

The rules are SGLang's (sgl-project/sglang ``python/sglang/srt/layers/linear.py``): ``ColumnParallelLinear`` /
``RowParallelLinear`` split query heads and MLP columns evenly; ``QKVParallelLinear`` splits KV heads evenly or,
with fewer KV heads than ranks, replicates each over ``tp_size / num_kv_heads`` ranks.
"""

from __future__ import annotations

from typing import Mapping


def check_tp_split(model: str, tp_size: int, *, even: Mapping[str, int], kv_heads: Mapping[str, int]) -> None:
    """Raises ``NotImplementedError`` listing every size of ``even`` that ``tp_size`` does not divide and every
    KV head count of ``kv_heads`` that neither divides by nor divides ``tp_size``."""
    problems = [f"{name} {size} is not divisible by it" for name, size in even.items() if size % tp_size]
    problems += [f"{name} {heads} neither divides by it nor divides it" for name, heads in kv_heads.items()
                 if (heads % tp_size if heads >= tp_size else tp_size % heads)]
    if problems:
        raise NotImplementedError(f"{model} cannot be split over --tp-size {tp_size}: {'; '.join(problems)}; "
                                  "serve it at a --tp-size that divides these sizes")
