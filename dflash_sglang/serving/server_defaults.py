# SPDX-License-Identifier: Apache-2.0
"""DFLASH's server-argument rules: validate the drafter against the target and set SGLang's speculative
settings for a tree-free block drafter, before SGLang's own speculative handling runs.

Called by the patched ``ServerArgs._handle_speculative_decoding`` (``patches/algorithm.py``) in every process that
builds ServerArgs. Errors are ``ValueError`` with the fix in the message.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from dflash_sglang.core.config import DFlashDraftConfig, DraftConfigError
from dflash_sglang.serving.draft_attention import choose_draft_attention_backend

logger = logging.getLogger(__name__)
DEFAULT_MAX_RUNNING_REQUESTS = 48


def read_model_config(path: str, revision: str | None = None) -> dict[str, Any] | None:
    """``config.json`` of a local folder or an already-downloaded / downloadable hub model; None if unreachable."""
    if os.path.isdir(path):
        config_path = os.path.join(path, "config.json")
        if not os.path.exists(config_path):
            return None
    else:
        try:
            from huggingface_hub import hf_hub_download

            config_path = hf_hub_download(path, "config.json", revision=revision)
        except Exception as error:  # offline, gated, or a typo: SGLang's own loader reports it later
            logger.warning("DFLASH: could not read %s/config.json to validate it (%s)", path, error)
            return None
    with open(config_path, encoding="utf-8") as handle:
        return json.load(handle)


def load_draft_config(server_args) -> DFlashDraftConfig:
    path = server_args.speculative_draft_model_path
    if not path:
        raise ValueError("--speculative-algorithm DFLASH needs --speculative-draft-model-path: the folder or hub id "
                         "of a DFlash drafter (config.json + model.safetensors)")
    raw = read_model_config(path, server_args.speculative_draft_model_revision)
    if raw is None:
        raise ValueError(f"--speculative-draft-model-path {path}: no config.json found; pass the folder of a DFlash "
                         "drafter checkpoint")
    try:
        return DFlashDraftConfig.from_dict(raw)
    except DraftConfigError as error:
        raise ValueError(f"--speculative-draft-model-path {path}: {error}") from None


def apply_dflash_server_defaults(server_args) -> None:
    """Validates and fills the speculative settings of ``server_args`` (a ``sglang.srt.server_args.ServerArgs``),
    including the drafter's attention backend where the requested one would attend the drafter wrongly
    (``draft_attention.choose_draft_attention_backend``)."""
    draft = load_draft_config(server_args)
    target = read_model_config(server_args.model_path, getattr(server_args, "revision", None))
    try:
        draft.check_target(target or {}, block_size=server_args.speculative_num_draft_tokens)
    except DraftConfigError as error:
        raise ValueError(str(error)) from None
    unsupported = {
        "--enable-dp-attention": server_args.enable_dp_attention,
        "--pp-size > 1": server_args.pp_size > 1,
        "--speculative-eagle-topk > 1": (server_args.speculative_eagle_topk or 1) > 1,
        "--enable-multi-layer-eagle": getattr(server_args, "enable_multi_layer_eagle", False),
    }
    for flag, used in unsupported.items():
        if used:
            raise ValueError(f"DFLASH does not support {flag} yet; drop it to serve with DFLASH")
    if server_args.speculative_num_steps not in (None, 1):
        logger.warning("DFLASH drafts a whole block in one pass; ignoring --speculative-num-steps %s",
                       server_args.speculative_num_steps)
    server_args.speculative_num_steps = 1
    server_args.speculative_eagle_topk = 1
    server_args.speculative_num_draft_tokens = server_args.speculative_num_draft_tokens or draft.block_size
    choose_draft_attention_backend(server_args, draft)
    if server_args.max_running_requests is None:
        server_args.max_running_requests = DEFAULT_MAX_RUNNING_REQUESTS
    if server_args.enable_mixed_chunk:
        logger.info("DFLASH: mixed chunked prefill is off (a step verifies whole blocks)")
    server_args.enable_mixed_chunk = False
