# SPDX-License-Identifier: Apache-2.0
"""SGLang model classes this package adds (each module exports ``EntryClass``, SGLang's convention):
the DFlash drafter built from SGLang's layers, and target models SGLang 0.5.10.post1 lacks.

Imported by SGLang's model registry (through ``patches.algorithm``), never by ``dflash_sglang/__init__``.
"""
