# SPDX-License-Identifier: Apache-2.0
"""Deployment configs (dflash_sglang.deploy.deployment / dflash_sglang.deploy.serve): every file in configs/
validates and its --dry-run command parses with SGLang's own argument parser; broken configs fail with one
clear message."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dflash_sglang.deploy import deployment as deploy, serve
from dflash_sglang.deploy.deployment import DeployConfigError, load_deploy_config, resolve_backends, to_launch_args

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
TINY = "tiny-cpu.yaml"
SMOLLM2 = "smollm2-cpu.yaml"
LOCAL = {TINY: "tiny", SMOLLM2: "smollm2"}  # configs naming ../artifacts/<folder>


def write_drafter(folder: Path, block_size: int = 16) -> Path:
    """A minimal DFlash drafter config.json (no weights): enough for the deploy checks."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["DFlashDraftModel"], "hidden_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 128,
        "vocab_size": 256, "dflash_config": {"block_size": block_size, "mask_token_id": 255, "target_layer_ids": [0]},
    }))
    return folder


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory) -> Path:
    """A copy of the repo layout that the CPU configs expect: configs/{tiny,smollm2}-cpu.yaml + artifacts/tiny/*
    and, for smollm2, the two config.json files that the deploy checks read (no weights, no conversion)."""
    from dflash_sglang.testing.real_models import drafter_config
    from dflash_sglang.testing.tiny import write_tiny_checkpoints

    root = tmp_path_factory.mktemp("repo")
    (root / "configs").mkdir()
    for name in LOCAL:
        shutil.copy(REPO / "configs" / name, root / "configs" / name)
    write_tiny_checkpoints(str(root / "artifacts" / "tiny"))
    target = {"hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
              "head_dim": 64, "intermediate_size": 1536, "vocab_size": 49152, "max_position_embeddings": 8192,
              "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "bos_token_id": 1, "eos_token_id": 2}
    for name, raw in (("target", target), ("drafter", dict(drafter_config(target, 16, num_layers=5,
                                                                           block_size=16).raw))):
        (root / "artifacts" / "smollm2" / name).mkdir(parents=True)
        (root / "artifacts" / "smollm2" / name / "config.json").write_text(json.dumps(raw))
    return root


def config_path(name: str, tiny_repo: Path) -> Path:
    return tiny_repo / "configs" / name if name in LOCAL else REPO / "configs" / name


@pytest.fixture(scope="module")
def sglang_parser() -> argparse.ArgumentParser:
    from sglang.srt.server_args import ServerArgs  # the installed start-up hook adds DFLASH to its choices

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    return parser


@pytest.fixture(autouse=True)
def no_gpu(monkeypatch):
    monkeypatch.setattr(deploy, "cuda_capability", lambda: None)


def run_serve(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dflash_sglang.deploy.serve", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60)


# --------------------------------------------------------------------------------------------------
# The shipped configs
def test_configs_exist():
    names = {path.name for path in CONFIGS}
    assert {TINY, SMOLLM2, "gemma-4-26B-A4B-it.yaml", "gemma-4-31B-it.yaml", "qwen3-8b.yaml"} <= names


@pytest.mark.parametrize("name", [path.name for path in CONFIGS])
def test_config_validates(name, tiny_repo):
    cfg = load_deploy_config(config_path(name, tiny_repo))
    assert cfg.block_size is None or cfg.block_size >= 2
    if name in LOCAL:  # relative paths resolve against the config file's folder
        assert cfg.target_model == str(tiny_repo / "artifacts" / LOCAL[name] / "target")
        assert cfg.draft_model == str(tiny_repo / "artifacts" / LOCAL[name] / "drafter")
        assert cfg.block_size == {TINY: 8, SMOLLM2: 16}[name]  # filled in from the drafter's config.json
        assert cfg.device == "cpu" and cfg.dtype == "float32"
    else:
        assert "/" in cfg.target_model and not os.path.isabs(cfg.target_model)  # hub ids stay as they are


@pytest.mark.parametrize("name", [path.name for path in CONFIGS])
def test_dry_run_parses_with_sglang(name, tiny_repo, sglang_parser, capsys):
    path = config_path(name, tiny_repo)
    assert serve.main(["--config", str(path), "--dry-run"]) == 0
    words = shlex.split(capsys.readouterr().out)
    start = words.index("sglang.launch_server")
    assert words[start - 1] == "-m" and words[start - 2] == sys.executable
    args = sglang_parser.parse_args(words[start + 1:])

    cfg = resolve_backends(load_deploy_config(path))
    assert args.speculative_algorithm == "DFLASH"
    assert args.model_path == cfg.target_model
    assert args.speculative_draft_model_path == cfg.draft_model
    assert args.speculative_num_draft_tokens == cfg.block_size
    assert args.attention_backend == cfg.target_attention_backend
    assert args.speculative_draft_attention_backend == cfg.draft_attention_backend
    assert (args.tensor_parallel_size, args.host, args.port, args.device) == (cfg.tp_size, cfg.host, cfg.port,
                                                                             cfg.device)
    assert args.mem_fraction_static == cfg.mem_fraction_static
    if name in LOCAL:
        assert words[0] == "SGLANG_USE_CPU_ENGINE=1"
        assert args.disable_cuda_graph and args.skip_server_warmup
        assert args.max_total_tokens == {TINY: 4096, SMOLLM2: 16384}[name]
        assert args.attention_backend == args.speculative_draft_attention_backend == "torch_native"
    else:
        assert args.trust_remote_code


@pytest.mark.parametrize("name", [TINY, "qwen3-8b.yaml"])
def test_baseline_is_the_same_deployment_without_speculation(name, tiny_repo, sglang_parser):
    cfg = resolve_backends(load_deploy_config(config_path(name, tiny_repo)))
    speculative = vars(sglang_parser.parse_args(to_launch_args(cfg)[3:]))
    baseline = vars(sglang_parser.parse_args(to_launch_args(cfg, speculative=False)[3:]))
    assert baseline["speculative_algorithm"] is None and baseline["speculative_draft_model_path"] is None
    assert baseline["speculative_draft_attention_backend"] is None
    assert baseline["speculative_num_draft_tokens"] is None
    differing = {key for key in speculative if speculative[key] != baseline[key]}
    assert differing == {"speculative_algorithm", "speculative_draft_model_path", "speculative_num_draft_tokens",
                         "speculative_draft_attention_backend"}


def test_pinned_choices_match_sglang(sglang_parser):
    choices = {action.dest: action.choices for action in sglang_parser._actions}
    assert tuple(choices["attention_backend"]) == deploy.ATTENTION_BACKENDS
    assert tuple(choices["dtype"]) == deploy.DTYPES


# --------------------------------------------------------------------------------------------------
# Broken configs: one `error:` line naming the key, the file and the line; exit status 2.
BROKEN = {
    "unknown_key": ("target_model: Qwen/Qwen3-8B\ndraft_model: z-lab/Qwen3-8B-DFlash-b16\nprot: 30001\n",
                    [":3: unknown key `prot`", "did you mean `port`"]),
    "wrong_type": ("target_model: Qwen/Qwen3-8B\ndraft_model: z-lab/Qwen3-8B-DFlash-b16\nport: '30001'\n",
                   [":3: `port`: Input should be a valid integer"]),
    "port_range": ("target_model: Qwen/Qwen3-8B\ndraft_model: z-lab/Qwen3-8B-DFlash-b16\n\nport: 70000\n",
                   [":4: `port`: Input should be less than or equal to 65535"]),
    "missing_drafter": ("target_model: Qwen/Qwen3-8B\ndraft_model: ./no-such-drafter\n",
                        [":2: `draft_model`: no folder at", "no-such-drafter"]),
    "block_size": ("target_model: Qwen/Qwen3-8B\ndraft_model: ./drafter\nblock_size: 32\n",
                   [":3: `block_size: 32` is longer than the drafter's", "block_size 16", "2..16"]),
    "cpu_backend_strict": ("target_model: Qwen/Qwen3-8B\ndraft_model: z-lab/Qwen3-8B-DFlash-b16\ndevice: cpu\n"
                           "strict: true\ndraft_attention_backend: torch_native\n",
                           [": `target_attention_backend: triton` cannot run here",
                            "only torch_native runs on device cpu"]),
    "reserved_extra": ("target_model: Qwen/Qwen3-8B\ndraft_model: z-lab/Qwen3-8B-DFlash-b16\nextra_args:\n"
                       "  max_total_tokens: 4096\n  attention-backend: fa3\n",
                       [":5: `extra_args.attention-backend` has a key of its own",
                        "set `target_attention_backend`"]),
    "not_a_path": ("target_model: Qwen/Qwen3-8B\ndraft_model: artifacts/tiny/drafter\n",
                   [":2: `draft_model: artifacts/tiny/drafter` is neither a hub id", "./artifacts/tiny/drafter"]),
    "bad_yaml": ("target_model: Qwen/Qwen3-8B\ndraft_model: [z-lab\n", ["invalid YAML"]),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_config_fails_clearly(case, tmp_path):
    text, expected = BROKEN[case]
    write_drafter(tmp_path / "drafter", block_size=16)
    (tmp_path / "deploy.yaml").write_text(text)
    result = run_serve("--config", "deploy.yaml", "--dry-run", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert result.stderr.count("dflash-serve: error:") == 1, result.stderr
    assert "error: deploy.yaml" in result.stderr, result.stderr
    for fragment in expected:
        assert fragment in result.stderr, result.stderr


def test_set_override_error_names_the_flag(tmp_path):
    result = run_serve("--config", str(REPO / "configs" / "qwen3-8b.yaml"), "--dry-run", "--set", "tp_size=0")
    assert result.returncode == 2
    assert "error: --set tp_size=0: `tp_size`: Input should be greater than or equal to 1" in result.stderr


def test_draft_config_error_is_reported(tmp_path):
    drafter = write_drafter(tmp_path / "drafter")
    (drafter / "config.json").write_text('{"architectures": ["DFlash2DraftModel"]}')
    (tmp_path / "deploy.yaml").write_text("target_model: Qwen/Qwen3-8B\ndraft_model: ./drafter\n")
    with pytest.raises(DeployConfigError, match=r"deploy.yaml:2: `draft_model`: .*DFlash2DraftModel"):
        load_deploy_config(tmp_path / "deploy.yaml")


# --------------------------------------------------------------------------------------------------
# Overrides, argv, backends
def test_overrides_and_extra_args(tmp_path):
    write_drafter(tmp_path / "drafter", block_size=16)
    (tmp_path / "deploy.yaml").write_text("target_model: Qwen/Qwen3-8B\ndraft_model: ./drafter\n"
                                          "extra_args:\n  enable_metrics: false\n")
    cfg = load_deploy_config(tmp_path / "deploy.yaml", [
        "port=30001", "mem_fraction_static=0.5", "extra_args.cuda_graph_bs=[1, 2, 4]",
        "extra_args.served-model-name=my model", "extra_args.skip_server_warmup=true"])
    assert (cfg.port, cfg.mem_fraction_static, cfg.block_size) == (30001, 0.5, 16)
    argv = to_launch_args(cfg)
    assert argv[:3] == [sys.executable, "-m", "sglang.launch_server"]
    joined = " ".join(argv[3:])
    assert "--speculative-num-draft-tokens 16" in joined and "--port 30001" in joined
    assert "--cuda-graph-bs 1 2 4" in joined and "--skip-server-warmup" in argv
    assert argv[argv.index("--served-model-name") + 1] == "my model"
    assert "--enable-metrics" not in argv  # false: the flag is left out


def test_set_relative_path_uses_cwd(tmp_path, monkeypatch):
    write_drafter(tmp_path / "here" / "drafter")
    (tmp_path / "deploy.yaml").write_text("target_model: Qwen/Qwen3-8B\ndraft_model: z-lab/Qwen3-8B-DFlash-b16\n")
    monkeypatch.chdir(tmp_path / "here")
    cfg = load_deploy_config(tmp_path / "deploy.yaml", ["draft_model=./drafter"])
    assert cfg.draft_model == str(tmp_path / "here" / "drafter")


def test_duplicate_key_is_an_error(tmp_path):
    (tmp_path / "deploy.yaml").write_text("target_model: a/b\ndraft_model: c/d\nport: 1\nport: 2\n")
    with pytest.raises(DeployConfigError, match=r"deploy.yaml:4: key `port` is given twice \(first at .*:3\)"):
        load_deploy_config(tmp_path / "deploy.yaml")


def _gemma(tmp_path: Path, strict: bool = False):
    (tmp_path / "deploy.yaml").write_text("target_model: google/gemma-4-26B-A4B-it\n"
                                          "draft_model: z-lab/gemma-4-26B-A4B-it-DFlash\n"
                                          f"strict: {str(strict).lower()}\n")
    return load_deploy_config(tmp_path / "deploy.yaml")


@pytest.mark.parametrize("capability,cute,expected", [((9, 0), True, "fa4"), ((10, 0), True, "fa4"),
                                                     ((9, 0), False, "triton"), ((8, 0), True, "triton")])
def test_fa4_resolution(capability, cute, expected, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(deploy, "cuda_capability", lambda: capability)
    monkeypatch.setattr(deploy, "module_importable", lambda name: cute)
    cfg = resolve_backends(_gemma(tmp_path))
    assert (cfg.target_attention_backend, cfg.draft_attention_backend) == ("triton", expected)
    if expected == "triton":
        assert "`draft_attention_backend: fa4` cannot run here" in caplog.text and "using triton" in caplog.text


def test_fa4_strict_raises(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(deploy, "cuda_capability", lambda: (8, 9))
    # draft_attention_backend is defaulted (fa4), so the error names the file without a line
    with pytest.raises(DeployConfigError, match=r"deploy.yaml: `draft_attention_backend: fa4` cannot run here: "
                                                r"fa4 needs a Hopper or Blackwell GPU"):
        resolve_backends(_gemma(tmp_path), strict=True)
    _gemma(tmp_path, strict=True)  # `strict: true` in the YAML acts like --strict
    assert serve.main(["--config", str(tmp_path / "deploy.yaml"), "--dry-run"]) == 2
    assert "`draft_attention_backend: fa4` cannot run here" in capsys.readouterr().err


def test_cpu_falls_back_to_torch_native(tmp_path):
    (tmp_path / "deploy.yaml").write_text("target_model: a/b\ndraft_model: c/d\ndevice: cpu\n")
    cfg = resolve_backends(load_deploy_config(tmp_path / "deploy.yaml"))
    assert (cfg.target_attention_backend, cfg.draft_attention_backend) == ("torch_native", "torch_native")


def test_launch_execs_sglang(monkeypatch):
    calls = []

    def fake_execv(path, argv):
        calls.append((path, argv))
        raise SystemExit(0)

    monkeypatch.setattr(os, "execv", fake_execv)
    with pytest.raises(SystemExit):
        serve.main(["--config", str(REPO / "configs" / "qwen3-8b.yaml"), "--set", "port=31000"])
    (path, argv), = calls
    assert path == sys.executable and argv[1:3] == ["-m", "sglang.launch_server"]
    assert argv[argv.index("--port") + 1] == "31000"


@pytest.mark.parametrize("instructions", ["AMX-BF16", "AVX512-BF16", None])
def test_float32_cpu_deployments_are_told_about_bf16(instructions, tiny_repo, monkeypatch, caplog):
    """On a CPU with bf16 matrix instructions, dflash-serve says (once, before the command) that bfloat16 makes
    a float32 CPU deployment's DFLASH steps cheaper; not for bfloat16, not on a GPU, not on other CPUs."""
    monkeypatch.setattr(deploy, "cpu_bf16_instructions", lambda: instructions)
    caplog.set_level(logging.INFO, logger="dflash_sglang.deploy.serve")
    config = str(config_path(TINY, tiny_repo))
    assert serve.main(["--config", config, "--dry-run"]) == 0
    hints = [r.message for r in caplog.records if "--set dtype=bfloat16" in r.message]
    if instructions is None:
        assert hints == []
    else:
        assert len(hints) == 1 and hints[0].startswith(f"this CPU has {instructions}:"), hints
    caplog.clear()
    assert serve.main(["--config", config, "--set", "dtype=bfloat16", "--dry-run"]) == 0
    assert not [r for r in caplog.records if "--set dtype=bfloat16" in r.message]
    cuda = load_deploy_config(config, ["device=cuda"])
    assert deploy.cpu_dtype_hint(cuda) is None
