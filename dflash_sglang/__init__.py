# SPDX-License-Identifier: Apache-2.0
"""dflash-sglang: DFLASH block-diffusion speculative decoding for SGLang.

Importing the package imports neither SGLang nor the CUDA extension; the SGLang hook lives in
``dflash_sglang.serving.plugin`` and is installed at interpreter start-up by ``dflash_sglang_hook.pth``.
"""

from dflash_sglang.core.config import DFlashDraftConfig, DraftConfigError

__version__ = "0.1.0"
__all__ = ["DFlashDraftConfig", "DraftConfigError", "__version__"]
