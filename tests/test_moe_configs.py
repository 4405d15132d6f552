# SPDX-License-Identifier: Apache-2.0
"""Packaged fused-MoE kernel configs (``serving/patches/moe.py``): SGLang's own config lookup, patched by the
import hook, returns a config shipped in ``serving/moe_configs/triton_<version>/`` under SGLang's file name,
and leaves every other shape to SGLang's files and defaults."""

from __future__ import annotations

import json
import os
import types

import pytest

from child_pytest import sglang_cpu_rerun

from dflash_sglang.deploy.cpu_stub import driver_present
from dflash_sglang.serving.patches import moe

CHILD = "DFLASH_TEST_MOE_CONFIGS_CHILD"
IN_SGLANG = driver_present() or bool(os.environ.get(CHILD))  # SGLang's MoE modules load sgl_kernel
in_sglang = pytest.mark.skipif(not IN_SGLANG, reason="runs in the child process of test_in_a_child_process")

GEMMA4_26B_A4B_EXPERTS = {"E": 128, "N": 704, "hidden": 2816, "top_k": 8}
TUNED = {"1": {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 128, "GROUP_SIZE_M": 1, "num_warps": 4,
               "num_stages": 4},
         "256": {"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 128, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 16, "num_warps": 8,
                 "num_stages": 3}}


test_in_a_child_process = sglang_cpu_rerun(__file__, CHILD, IN_SGLANG)


@pytest.fixture
def lookup(tmp_path, monkeypatch):
    """SGLang's fused_moe_triton_config module as the hook patched it, on an 'NVIDIA H200', with the packaged
    configs read from ``tmp_path``."""
    triton = pytest.importorskip("triton")
    from sglang.srt.layers.moe.fused_moe_triton import fused_moe_triton_config as module

    assert vars(module).get("_dflash_patched"), "the import hook did not patch SGLang's MoE config lookup"
    monkeypatch.setattr(module, "get_device_name", lambda device_id=0: "NVIDIA H200")
    monkeypatch.setattr(module, "get_global_server_args",
                        lambda: types.SimpleNamespace(enable_deterministic_inference=False))
    monkeypatch.setattr(moe, "PACKAGED_MOE_CONFIGS", str(tmp_path))
    folder = tmp_path / moe.triton_version_folder(triton.__version__)
    folder.mkdir()
    module.get_moe_configs.cache_clear()
    yield module, folder
    module.get_moe_configs.cache_clear()


@in_sglang
def test_a_packaged_config_is_used_for_its_shape(lookup):
    module, folder = lookup
    name = module.get_config_file_name(GEMMA4_26B_A4B_EXPERTS["E"], GEMMA4_26B_A4B_EXPERTS["N"], None)
    assert name == "E=128,N=704,device_name=NVIDIA_H200.json"  # SGLang's naming, which the tuner writes
    (folder / name).write_text(json.dumps(TUNED))
    e, n, hidden, top_k = (GEMMA4_26B_A4B_EXPERTS[k] for k in ("E", "N", "hidden", "top_k"))
    # Decode at batch 2 and a 16-token verify block of 16 requests pick the nearest tuned token counts.
    assert module.try_get_optimal_moe_config((e, 2 * n, hidden), (e, hidden, n), top_k, None, 2) == TUNED["1"]
    assert module.try_get_optimal_moe_config((e, 2 * n, hidden), (e, hidden, n), top_k, None, 256) == TUNED["256"]


@in_sglang
def test_other_shapes_and_deterministic_inference_keep_sglangs_lookup(lookup, monkeypatch):
    module, folder = lookup
    (folder / "E=128,N=704,device_name=NVIDIA_H200.json").write_text(json.dumps(TUNED))
    assert module.get_moe_configs(96, 704, None) is None  # nothing shipped, by SGLang or us: its default
    monkeypatch.setattr(module, "get_global_server_args",
                        lambda: types.SimpleNamespace(enable_deterministic_inference=True))
    module.get_moe_configs.cache_clear()
    assert module.get_moe_configs(128, 704, None) is None


@in_sglang
def test_configs_of_another_triton_version_are_not_used(lookup, tmp_path):
    module, _ = lookup
    other = tmp_path / "triton_0_0_1"
    other.mkdir()
    (other / "E=128,N=704,device_name=NVIDIA_H200.json").write_text(json.dumps(TUNED))
    assert module.get_moe_configs(128, 704, None) is None


def test_triton_version_folder_names_as_sglang():
    assert moe.triton_version_folder("3.6.0") == "triton_3_6_0"
    assert moe.triton_version_folder("3.5.1+git1234") == "triton_3_5_1"
