# SPDX-License-Identifier: Apache-2.0
"""The DFlash algorithm in plain PyTorch, without SGLang: the drafter's config and checkpoint format, the
drafter model, the reference decoding loop and the sampling rules of verification."""
