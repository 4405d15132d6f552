# SPDX-License-Identifier: Apache-2.0
"""The drafter's attention backend (dflash_sglang.serving.draft_attention, docs/fa4-drafter.md): fa3/fa4 are
kept for the drafters they attend correctly and replaced by triton, with one WARNING, for drafters with
non-causal sliding-window layers -- requested or inherited from the target, through real SGLang ServerArgs
(built on the CPU from config.json files only) and through a dflash-serve deployment; the drafter's start-up
line names its backend and, on triton, the layers the block-attention kernel runs."""

from __future__ import annotations

import json
import logging
import types
from pathlib import Path

import pytest
import torch

from dflash_sglang.core.config import DFlashDraftConfig
from dflash_sglang.serving import draft_attention
from dflash_sglang.serving.draft_attention import describe_draft_attention, misattended_layers
from dflash_sglang.testing import tiny

IDS = {tiny.ENDOFTEXT: 1, tiny.IM_END: 2}
VOCAB, MASK_ID = 512, 3
LOGGER = draft_attention.__name__
# Drafter layer layouts ([sliding, full] where a window is given), as config.json keys.
FULL_NON_CAUSAL = {}  # the released Qwen3 / LLaMA drafters: every layer non-causal, no window
SLIDING_NON_CAUSAL = {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 8, "is_causal": False}
SLIDING_CAUSAL = {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 8}  # no is_causal
ALL_CAUSAL = {**SLIDING_CAUSAL, "is_causal": True}


def drafter_raw(**changes) -> dict:
    raw = dict(tiny.drafter_config(VOCAB, MASK_ID, IDS, block_size=16).raw)
    raw.update(changes)
    return raw


@pytest.mark.parametrize("layout,backend,expected", [
    (FULL_NON_CAUSAL, "fa4", []), (FULL_NON_CAUSAL, "fa3", []),
    (SLIDING_NON_CAUSAL, "fa4", [0]), (SLIDING_NON_CAUSAL, "fa3", [0]),
    (SLIDING_NON_CAUSAL, "triton", []), (SLIDING_NON_CAUSAL, "flashinfer", []), (SLIDING_NON_CAUSAL, None, []),
    (SLIDING_CAUSAL, "fa4", []), (ALL_CAUSAL, "fa4", []),
])
def test_misattended_layers(layout, backend, expected):
    assert misattended_layers(backend, DFlashDraftConfig.from_dict(drafter_raw(**layout))) == expected


# --------------------------------------------------------------------------------------------------
# Real ServerArgs: the patched ServerArgs.__post_init__ runs apply_dflash_server_defaults.
@pytest.fixture(scope="module")
def target_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("target")
    (folder / "config.json").write_text(json.dumps(tiny.target_config(VOCAB, IDS)))
    return folder


def write_drafter(folder: Path, layout: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(drafter_raw(**layout)))
    return folder


def server_args(target_dir: Path, drafter: Path, **fields):
    from sglang.srt.server_args import ServerArgs

    return ServerArgs(model_path=str(target_dir), speculative_algorithm="DFLASH",
                      speculative_draft_model_path=str(drafter), device="cpu", **fields)


def warnings_of(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records
            if record.name == LOGGER and record.levelno == logging.WARNING]


@pytest.mark.parametrize("fields,requested", [
    ({"attention_backend": "triton", "speculative_draft_attention_backend": "fa4"},
     "fa4 (--speculative-draft-attention-backend)"),
    ({"attention_backend": "triton", "speculative_draft_attention_backend": "fa3"},
     "fa3 (--speculative-draft-attention-backend)"),
    ({"attention_backend": "fa3"}, "fa3 (the target's; no --speculative-draft-attention-backend)"),
    ({"attention_backend": "triton", "prefill_attention_backend": "fa4"}, "fa4 (the target's"),  # TARGET_VERIFY
])
def test_fa_backends_give_a_sliding_non_causal_drafter_triton(fields, requested, target_dir, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    args = server_args(target_dir, write_drafter(tmp_path / "drafter", SLIDING_NON_CAUSAL), **fields)
    assert args.speculative_draft_attention_backend == "triton"
    assert args.attention_backend == fields["attention_backend"]  # the target keeps its backend
    [warning] = warnings_of(caplog)
    assert warning.startswith(f"DFLASH: drafter attention backend {requested}")
    assert "layers [0] are non-causal with sliding window 8" in warning and "window_size=(window, 0)" in warning
    assert warning.endswith("using triton for the drafter instead (docs/fa4-drafter.md)")


@pytest.mark.parametrize("layout,fields,expected", [
    (FULL_NON_CAUSAL, {"attention_backend": "triton", "speculative_draft_attention_backend": "fa4"}, "fa4"),
    (FULL_NON_CAUSAL, {"attention_backend": "fa3"}, None),  # inherits fa3, which attends it correctly
    (SLIDING_CAUSAL, {"attention_backend": "triton", "speculative_draft_attention_backend": "fa4"}, "fa4"),
    (SLIDING_NON_CAUSAL, {"attention_backend": "triton", "speculative_draft_attention_backend": "flashinfer"},
     "flashinfer"),
    # --speculative-attention-mode decode: TARGET_VERIFY goes to the decode backend (triton), not fa3.
    (SLIDING_NON_CAUSAL, {"attention_backend": "triton", "prefill_attention_backend": "fa3",
                          "speculative_attention_mode": "decode"}, None),
])
def test_backends_that_attend_the_drafter_correctly_are_kept(layout, fields, expected, target_dir, tmp_path,
                                                             caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    args = server_args(target_dir, write_drafter(tmp_path / "drafter", layout), **fields)
    assert args.speculative_draft_attention_backend == expected
    assert warnings_of(caplog) == []


def test_deployment_fa4_becomes_triton_at_server_start(target_dir, tmp_path, monkeypatch, caplog):
    """dflash-serve keeps fa4 where it can run (Hopper + flash_attn.cute); the server it launches then gives a
    drafter that fa4 would attend wrongly triton, as for any other entry point."""
    import argparse

    from sglang.srt.server_args import ServerArgs

    from dflash_sglang.deploy import deployment as deploy

    drafter = write_drafter(tmp_path / "drafter", SLIDING_NON_CAUSAL)
    (tmp_path / "deploy.yaml").write_text(f"target_model: {target_dir}\ndraft_model: {drafter}\n"
                                          "target_attention_backend: triton\ndraft_attention_backend: fa4\n")
    monkeypatch.setattr(deploy, "cuda_capability", lambda: (9, 0))
    monkeypatch.setattr(deploy, "module_importable", lambda name: True)
    cfg = deploy.resolve_backends(deploy.load_deploy_config(tmp_path / "deploy.yaml"))
    assert cfg.draft_attention_backend == "fa4"

    argv = deploy.to_launch_args(cfg)
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    cli = parser.parse_args(argv[argv.index("sglang.launch_server") + 1:])
    assert cli.speculative_draft_attention_backend == "fa4"
    cli.device = "cpu"  # no GPU here; the backend choice does not depend on the device
    caplog.set_level(logging.WARNING, logger=LOGGER)
    args = ServerArgs.from_cli_args(cli)
    assert (args.attention_backend, args.speculative_draft_attention_backend) == ("triton", "triton")
    assert len(warnings_of(caplog)) == 1


# --------------------------------------------------------------------------------------------------
# The drafter's start-up line. Backends are stand-ins named like SGLang's classes (the real ones need a CUDA
# model runner); the layers are SGLang's own RadixAttention.
def _runner(backend_class: str, layers=(), dtype=torch.bfloat16, kv_dtype=torch.bfloat16, **backend_fields):
    backend = type(backend_class, (), {})()
    for name, value in {"enable_deterministic": False, "use_mla": False, **backend_fields}.items():
        setattr(backend, name, value)
    return types.SimpleNamespace(attn_backend=backend, model=torch.nn.ModuleList(layers), dtype=dtype,
                                 token_to_kv_pool=types.SimpleNamespace(dtype=kv_dtype))


def _layers(*windows: int):
    from sglang.srt.layers.radix_attention import AttentionType, RadixAttention

    return [RadixAttention(32, 128, 128 ** -0.5, 8, layer_id=i, sliding_window_size=window,
                           attn_type=AttentionType.ENCODER_ONLY) for i, window in enumerate(windows)]


@pytest.fixture(scope="module")
def triton_args(target_dir, tmp_path_factory):
    drafter = write_drafter(tmp_path_factory.mktemp("full") / "drafter", FULL_NON_CAUSAL)
    return server_args(target_dir, drafter, attention_backend="triton", speculative_draft_attention_backend="triton")


def test_startup_line_names_the_block_kernel_on_triton(triton_args, monkeypatch):
    monkeypatch.delenv("DFLASH_BLOCK_ATTENTION", raising=False)
    line = describe_draft_attention(triton_args, _runner("TritonAttnBackend", _layers(-1, -1, 1024)))
    assert line == ("DFLASH: drafter attention triton (SGLang TritonAttnBackend); mask-free block passes run the "
                    "split-KV block-attention kernel (dflash_sglang/ops/block_attention.py) in 3 of 3 layers")
    line = describe_draft_attention(triton_args, _runner("TritonAttnBackend", _layers(-1, -1)))
    assert line.endswith("block_attention.py) in 2 of 2 layers")
    fp8_cache = _runner("TritonAttnBackend", _layers(-1), kv_dtype=torch.float8_e4m3fn)
    assert "in 0 of 1 layers, SGLang's extend kernel in layers [0]" in describe_draft_attention(triton_args, fp8_cache)

    monkeypatch.setenv("DFLASH_BLOCK_ATTENTION", "off")
    line = describe_draft_attention(triton_args, _runner("TritonAttnBackend", _layers(-1)))
    assert line.endswith("triton (SGLang TritonAttnBackend); DFLASH_BLOCK_ATTENTION=off: block passes run SGLang's "
                         "extend kernel")


@pytest.mark.parametrize("version,library", [(4, "flash_attn.cute"), (3, "sgl_kernel FA3")])
def test_startup_line_names_the_flash_attention_version(version, library, target_dir, tmp_path):
    args = server_args(target_dir, write_drafter(tmp_path / "drafter", FULL_NON_CAUSAL), attention_backend="triton",
                       speculative_draft_attention_backend=f"fa{version}")
    line = describe_draft_attention(args, _runner("FlashAttentionBackend", fa_impl_ver=version))
    assert line == (f"DFLASH: drafter attention fa{version} (SGLang FlashAttentionBackend, fa_impl_ver {version}: "
                    f"{library}.flash_attn_with_kvcache)")


def test_startup_line_of_an_inherited_backend(target_dir, tmp_path):
    args = server_args(target_dir, write_drafter(tmp_path / "drafter", FULL_NON_CAUSAL),
                       attention_backend="torch_native")
    line = describe_draft_attention(args, _runner("TorchNativeAttnBackend"))
    assert line == "DFLASH: drafter attention torch_native (SGLang TorchNativeAttnBackend)"


def test_startup_line_of_a_hybrid_backend(target_dir, tmp_path):
    args = server_args(target_dir, write_drafter(tmp_path / "drafter", FULL_NON_CAUSAL), attention_backend="triton",
                       prefill_attention_backend="fa3")
    runner = _runner("HybridAttnBackend", prefill_backend=_runner("FlashAttentionBackend", fa_impl_ver=3).attn_backend,
                     decode_backend=_runner("TritonAttnBackend").attn_backend)
    assert describe_draft_attention(args, runner) == (
        "DFLASH: drafter attention fa3 (SGLang HybridAttnBackend -> FlashAttentionBackend, fa_impl_ver 3: "
        "sgl_kernel FA3.flash_attn_with_kvcache)")
