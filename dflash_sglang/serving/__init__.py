# SPDX-License-Identifier: Apache-2.0
"""Everything that knows SGLang's internals: the start-up import hook (``plugin``), the patches it applies
(``patches/``), the DFLASH workers (v1 loop and overlap loop) and their step state, request rules, server
defaults, and the SGLang model classes this package adds (``models/``)."""
