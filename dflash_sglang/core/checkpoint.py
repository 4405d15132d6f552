# SPDX-License-Identifier: Apache-2.0
"""Reading and writing drafter weights in the released z-lab format (``config.json`` + safetensors).

Owns the tensor names: the canonical (classic drafter) names are those of :class:`DFlashDrafter`'s
parameters; a newer fixture spells the context projection ``encoder.fc.weight`` and its norm
``encoder.output_norm_enc.weight``, and both spellings are accepted explicitly. Anything else is an error
that lists the offending names. Sharded checkpoints (``model.safetensors.index.json``) load too.
"""

from __future__ import annotations

import json
import os
from typing import Iterator, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dflash_sglang.core.config import DFlashDraftConfig

# Alternative checkpoint spellings -> canonical parameter names.
NAME_ALIASES = {
    "encoder.fc.weight": "fc.weight",
    "encoder.output_norm_enc.weight": "hidden_norm.weight",
}


class CheckpointError(ValueError):
    """A drafter checkpoint's tensors do not match its config; the message lists the names."""


def canonical_name(name: str) -> str:
    return NAME_ALIASES.get(name, name)


def safetensors_files(path: str) -> list[str]:
    """The safetensors files of a checkpoint folder, in index order when sharded."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index, encoding="utf-8") as handle:
            weight_map = json.load(handle)["weight_map"]
        return [os.path.join(path, name) for name in sorted(set(weight_map.values()))]
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors file in {path}: a DFlash drafter folder holds config.json and "
                              "model.safetensors")
    return [os.path.join(path, name) for name in files]


def iter_checkpoint_tensors(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (canonical name, tensor) for every tensor in the checkpoint folder."""
    for file in safetensors_files(path):
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():
                yield canonical_name(name), handle.get_tensor(name)


def check_state_dict(found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]],
                     where: str, hint: str = "is it a DFlash drafter checkpoint for this config?") -> None:
    """Raises :class:`CheckpointError` listing every missing, unexpected or mis-shaped tensor."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mis_shaped = sorted(f"{name}: checkpoint {tuple(found[name])} vs expected {tuple(expected[name])}"
                        for name in set(found) & set(expected) if tuple(found[name]) != tuple(expected[name]))
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected)}")
    if mis_shaped:
        problems.append(f"shape mismatches: {'; '.join(mis_shaped)}")
    if problems:
        raise CheckpointError(f"{where} does not match its config.json ({' | '.join(problems)}); {hint}")


def load_drafter_state_dict(path: str, expected_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Loads and checks all tensors of the drafter at ``path`` against ``expected_shapes``."""
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in iter_checkpoint_tensors(path):
        if name in tensors:
            raise CheckpointError(f"{path}: tensor {name} appears twice (under two spellings?)")
        tensors[name] = tensor
    check_state_dict({n: tuple(t.shape) for n, t in tensors.items()}, expected_shapes, path)
    return tensors


def drafter_tensor_shapes(config: DFlashDraftConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name of a released checkpoint for ``config`` -> its (full, unsharded) shape."""
    from dflash_sglang.core.model import DFlashDrafter

    with torch.device("meta"):
        drafter = DFlashDrafter(config)
    return {name: tuple(p.shape) for name, p in drafter.state_dict().items()}


def load_drafter(path: str, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
    """Builds a :class:`~dflash_sglang.core.model.DFlashDrafter` from a released checkpoint folder."""
    from dflash_sglang.core.model import DFlashDrafter

    config = DFlashDraftConfig.from_pretrained(path)
    with torch.device("meta"):
        drafter = DFlashDrafter(config)
    tensors = load_drafter_state_dict(path, drafter_tensor_shapes(config))
    drafter = drafter.to_empty(device=device)
    drafter.load_state_dict(tensors, strict=True)
    if dtype is not None:
        drafter = drafter.to(dtype)
    return drafter.eval()


def save_drafter(drafter, path: str) -> None:
    """Writes ``config.json`` + ``model.safetensors`` exactly as the released checkpoints are laid out."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as handle:
        json.dump(dict(drafter.config.raw), handle, indent=2, sort_keys=True)
        handle.write("\n")
    tensors = {name: t.detach().contiguous().cpu() for name, t in drafter.state_dict().items()}
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
