# SPDX-License-Identifier: Apache-2.0
"""core.sampling.processed_probs: min-p on top of temperature / top-k / top-p, by hand (SGLang's PyTorch sampler
keeps p >= min_p * max(p) among the top-k / top-p survivors)."""

import torch

from dflash_sglang.core.sampling import processed_probs

PROBS = torch.tensor([[0.5, 0.3, 0.15, 0.05]])


def test_min_p_keeps_tokens_above_its_share_of_the_maximum():
    logits = PROBS.log()
    torch.testing.assert_close(processed_probs(logits, 1.0, min_p=0.2), torch.tensor([[0.5, 0.3, 0.15, 0.0]]) / 0.95)
    torch.testing.assert_close(processed_probs(logits, 1.0, top_k=2, min_p=0.2), torch.tensor([[0.5, 0.3, 0, 0]]) / 0.8)
    torch.testing.assert_close(processed_probs(logits, 1.0, min_p=0.0), PROBS)


def test_min_p_per_row():
    logits = PROBS.log().repeat(2, 1)
    probs = processed_probs(logits, torch.ones(2), torch.ones(2), torch.zeros(2), torch.tensor([0.0, 0.5]))
    torch.testing.assert_close(probs, torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.5 / 0.8, 0.3 / 0.8, 0, 0]]))
