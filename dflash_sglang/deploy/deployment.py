# SPDX-License-Identifier: Apache-2.0
"""Config-driven DFLASH deployments: one YAML file per deployment (``configs/<target>[_<gpu>].yaml``) becomes
the exact ``python -m sglang.launch_server ...`` command line.

* :class:`DeployConfig` is the schema (pydantic v2): YAML keys are its field names, unknown keys and wrong
  types are errors; ``extra_args`` passes any other SGLang server argument through.
* :func:`load_deploy_config` reads a file, applies ``--set key=value`` overrides and checks local
  checkpoints; every problem raises one :class:`DeployConfigError` naming the key, the file and the line.
* :func:`resolve_backends` checks that the attention backends can run on this machine.
* :func:`to_launch_args` builds the argv; ``dflash_sglang.deploy.serve`` runs it.

Model paths: a value starting with ``/``, ``./`` or ``../`` is a local folder; a relative one is resolved
against the folder holding the YAML file (so ``configs/tiny-cpu.yaml`` names ``../artifacts/tiny/target``),
or against the current directory when it comes from ``--set``. Anything else must look like a hub id
(``org/name``) and is left to SGLang; only local folders are checked here.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import json
import logging
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from dflash_sglang.core.config import DFlashDraftConfig, DraftConfigError

logger = logging.getLogger(__name__)

# sglang 0.5.10.post1 server_args.ATTENTION_BACKEND_CHOICES and --dtype choices (tests compare them).
ATTENTION_BACKENDS = ("triton", "torch_native", "flex_attention", "nsa", "cutlass_mla", "fa3", "fa4", "flashinfer",
                      "flashmla", "trtllm_mla", "trtllm_mha", "dual_chunk_flash_attn", "aiter", "wave", "intel_amx",
                      "ascend", "intel_xpu")
DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")
AttentionBackend = Literal[ATTENTION_BACKENDS]  # type: ignore[valid-type]
Dtype = Literal[DTYPES]  # type: ignore[valid-type]

# SGLang arguments that have a key of their own (or that DFLASH fixes): not allowed in extra_args.
RESERVED_ARGS = {
    "model_path": "target_model", "speculative_draft_model_path": "draft_model",
    "speculative_draft_model": "draft_model", "speculative_num_draft_tokens": "block_size",
    "attention_backend": "target_attention_backend",
    "speculative_draft_attention_backend": "draft_attention_backend", "dtype": "dtype", "tp_size": "tp_size",
    "tensor_parallel_size": "tp_size", "mem_fraction_static": "mem_fraction_static",
    "max_running_requests": "max_running_requests", "context_length": "context_length", "host": "host",
    "port": "port", "device": "device", "disable_cuda_graph": "disable_cuda_graph",
}
FIXED_ARGS = ("speculative_algorithm",)
_EXTRA_KEY = re.compile(r"[a-z][a-z0-9]*(?:[_-][a-z0-9]+)*")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(?:/[\w.-]+)?")
_LOCAL_PREFIXES = ("/", "./", "../")
PATH_KEYS = ("target_model", "draft_model")
SCALARS = (bool, int, float, str)


class DeployConfigError(ValueError):
    """A deployment config is invalid or cannot run here; the message names the key, file and line."""


class DeployConfig(BaseModel):
    """One DFLASH deployment. Field names are the YAML keys; see ``configs/*.yaml`` for examples."""

    model_config = ConfigDict(extra="forbid", strict=True)

    target_model: str = Field(description="target model: hub id or local folder")
    draft_model: str = Field(description="DFlash drafter: hub id or local folder")
    block_size: int | None = Field(None, ge=2, description="tokens verified a step: 2 up to the drafter's block_size "
                                   "(a shorter block costs less compute a step and caps the tokens accepted); "
                                   "default: the drafter's")
    target_attention_backend: AttentionBackend = "triton"
    draft_attention_backend: AttentionBackend = "fa4"
    dtype: Dtype = "auto"
    tp_size: int = Field(1, ge=1)
    mem_fraction_static: float | None = Field(None, gt=0, le=1)
    max_running_requests: int | None = Field(None, ge=1)
    context_length: int | None = Field(None, ge=1)
    host: str = "127.0.0.1"
    port: int = Field(30000, ge=1, le=65535)
    device: Literal["cuda", "cpu"] = "cuda"
    disable_cuda_graph: bool = False
    strict: bool = Field(False, description="fail instead of falling back when a backend cannot run here")
    extra_args: dict[str, Any] = Field(default_factory=dict,
                                       description="other SGLang arguments: ServerArgs field or flag name")

    _source: str = PrivateAttr("<config>")
    _origins: dict[tuple[str, ...], str] = PrivateAttr(default_factory=dict)

    def where(self, *key: str) -> str:
        """``file:line`` (or ``--set k=v``) that set ``key``; the file alone when it was defaulted."""
        return self._origins.get(key, self._source)


# --------------------------------------------------------------------------------------------------
# Loading
def load_deploy_config(path: str | os.PathLike[str], overrides: list[str] | tuple[str, ...] = ()) -> DeployConfig:
    """Reads and validates a deployment file.

    Args:
        path: the YAML file.
        overrides: ``key=value`` strings (``--set``); values are parsed as YAML, ``extra_args.<name>=v``
            sets one pass-through argument.
    Returns:
        The validated config; ``block_size`` is filled from a local drafter when the file leaves it out.
    Raises:
        DeployConfigError: naming the key and where it was set.
    """
    source = os.fspath(path)
    try:
        text = Path(source).read_text(encoding="utf-8")
    except OSError as error:
        raise DeployConfigError(f"{source}: cannot read the deployment config ({error.strerror})") from None
    data, origins = _parse_yaml(text, source)
    base = Path(source).resolve().parent
    for key in PATH_KEYS:
        if isinstance(data.get(key), str):
            data[key] = _resolve_model_path(data[key], base, key, origins.get((key,), source))
    for item in overrides:
        _apply_override(data, origins, item)
    try:
        cfg = DeployConfig.model_validate(data)
    except ValidationError as error:
        raise DeployConfigError(_describe(error, source, origins)) from None
    cfg._source, cfg._origins = source, origins
    _check_extra_args(cfg)
    return _check_local_checkpoints(cfg)


def _parse_yaml(text: str, source: str) -> tuple[dict[str, Any], dict[tuple[str, ...], str]]:
    """The document as a dict, plus the ``file:line`` of every top-level key and every extra_args key."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        raise DeployConfigError(f"{source}{line}: invalid YAML: {error.problem or error.context}") from None
    finally:
        loader.dispose()
    if not isinstance(data, dict) or not isinstance(node, yaml.MappingNode):
        found = "an empty file" if data is None else f"a {type(data).__name__}"
        raise DeployConfigError(f"{source}: a deployment config must be a YAML mapping (key: value lines), got "
                                f"{found}")
    origins: dict[tuple[str, ...], str] = {}
    for key_node, value_node in node.value:
        key = (key_node.value,)
        if key in origins:
            raise DeployConfigError(f"{source}:{key_node.start_mark.line + 1}: key `{key[0]}` is given twice "
                                    f"(first at {origins[key]})")
        origins[key] = f"{source}:{key_node.start_mark.line + 1}"
        if key == ("extra_args",) and isinstance(value_node, yaml.MappingNode):
            for sub_node, _ in value_node.value:
                sub = ("extra_args", str(sub_node.value))
                if sub in origins:
                    raise DeployConfigError(f"{source}:{sub_node.start_mark.line + 1}: `extra_args.{sub[1]}` is "
                                            f"given twice (first at {origins[sub]})")
                origins[sub] = f"{source}:{sub_node.start_mark.line + 1}"
    return data, origins


def _apply_override(data: dict[str, Any], origins: dict[tuple[str, ...], str], item: str) -> None:
    key, sep, raw = item.partition("=")
    where = f"--set {item}"
    if not sep or not key:
        raise DeployConfigError(f"{where}: expected key=value, e.g. --set port=30001 or "
                                "--set extra_args.max_total_tokens=4096")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as error:
        raise DeployConfigError(f"{where}: the value is not valid YAML ({error})") from None
    parts = tuple(key.split("."))
    if len(parts) == 2 and parts[0] == "extra_args" and parts[1]:
        if data.get("extra_args") is None:
            data["extra_args"] = {}
        extra = data["extra_args"]
        if not isinstance(extra, dict):
            raise DeployConfigError(f"{origins.get(('extra_args',), where)}: `extra_args` must be a mapping")
        extra[parts[1]] = value
    elif len(parts) == 1:
        if key in PATH_KEYS and isinstance(value, str):
            value = _resolve_model_path(value, Path.cwd(), key, where)
        data[key] = value
    else:
        raise DeployConfigError(f"{where}: only extra_args.<name> may have a dot; top-level keys are "
                                f"{', '.join(DeployConfig.model_fields)}")
    origins[parts] = where


def _resolve_model_path(value: str, base: Path, key: str, where: str) -> str:
    if value.startswith(_LOCAL_PREFIXES) or value in (".", ".."):
        return os.path.normpath(base / value)
    if _HUB_ID.fullmatch(value):
        return value
    raise DeployConfigError(f"{where}: `{key}: {value}` is neither a hub id (org/name) nor a local path; write a "
                            f"local folder as ./{value} (relative to {base}) or as an absolute path")


def _describe(error: ValidationError, source: str, origins: dict[tuple[str, ...], str]) -> str:
    problems = []
    for err in error.errors():
        loc = tuple(str(part) for part in err["loc"])
        dotted = ".".join(loc)
        where = origins.get(loc, origins.get(loc[:1], source))
        if err["type"] == "extra_forbidden":
            close = difflib.get_close_matches(dotted, DeployConfig.model_fields, n=1)
            hint = f"; did you mean `{close[0]}`?" if close else ""
            problems.append(f"{where}: unknown key `{dotted}`{hint} (known keys: "
                            f"{', '.join(DeployConfig.model_fields)}; other SGLang arguments go under extra_args)")
        elif err["type"] == "missing":
            problems.append(f"{source}: required key `{dotted}` is missing")
        else:
            problems.append(f"{where}: `{dotted}`: {err['msg']} (got {err['input']!r})")
    if len(problems) == 1:
        return problems[0]
    return f"{source}: {len(problems)} problems:\n  " + "\n  ".join(problems)


def _check_extra_args(cfg: DeployConfig) -> None:
    for name, value in cfg.extra_args.items():
        where = cfg.where("extra_args", name)
        if not isinstance(name, str) or not _EXTRA_KEY.fullmatch(name):
            raise DeployConfigError(f"{where}: `extra_args.{name}` is not an SGLang argument name: use the "
                                    "ServerArgs field (max_total_tokens) or the flag without dashes "
                                    "(max-total-tokens)")
        field = name.replace("-", "_")
        if field in RESERVED_ARGS:
            raise DeployConfigError(f"{where}: `extra_args.{name}` has a key of its own: set "
                                    f"`{RESERVED_ARGS[field]}` instead")
        if field in FIXED_ARGS:
            raise DeployConfigError(f"{where}: `extra_args.{name}` is fixed by dflash-serve (DFLASH); remove it")
        items = value if isinstance(value, list) else [value]
        if not items or not all(isinstance(item, SCALARS) for item in items):
            raise DeployConfigError(f"{where}: `extra_args.{name}` must be a string, number, boolean or a "
                                    f"non-empty list of them, got {value!r}")


def _check_local_checkpoints(cfg: DeployConfig) -> DeployConfig:
    """Checks local target/drafter folders; fills ``block_size`` from a local drafter."""
    target_raw = None
    if _is_local(cfg.target_model):
        if not os.path.isdir(cfg.target_model):
            raise DeployConfigError(f"{cfg.where('target_model')}: `target_model`: no folder at {cfg.target_model}")
        target_config = os.path.join(cfg.target_model, "config.json")
        if os.path.exists(target_config):
            try:
                with open(target_config, encoding="utf-8") as handle:
                    target_raw = json.load(handle)
            except json.JSONDecodeError as error:
                raise DeployConfigError(f"{cfg.where('target_model')}: {target_config} is not valid JSON: "
                                        f"{error}") from None
    if not _is_local(cfg.draft_model):
        return cfg
    where = cfg.where("draft_model")
    if not os.path.isdir(cfg.draft_model):
        raise DeployConfigError(f"{where}: `draft_model`: no folder at {cfg.draft_model}; it must hold a DFlash "
                                "drafter (config.json + model.safetensors)")
    try:
        draft = DFlashDraftConfig.from_pretrained(cfg.draft_model)
    except (DraftConfigError, NotImplementedError) as error:
        raise DeployConfigError(f"{where}: `draft_model`: {error}") from None
    if cfg.block_size is not None and cfg.block_size > draft.block_size:
        raise DeployConfigError(
            f"{cfg.where('block_size')}: `block_size: {cfg.block_size}` is longer than the drafter's, which was "
            f"trained with block_size {draft.block_size} ({cfg.draft_model}/config.json); set block_size: "
            f"2..{draft.block_size} or leave it out")
    if target_raw is not None:
        try:
            draft.check_target(target_raw)
        except DraftConfigError as error:
            raise DeployConfigError(f"{where}: `draft_model` does not fit `target_model`: {error}") from None
    return cfg.model_copy(update={"block_size": draft.block_size}) if cfg.block_size is None else cfg


def _is_local(path: str) -> bool:
    return os.path.isabs(path)  # relative local paths were made absolute while loading


# --------------------------------------------------------------------------------------------------
# Backends
BACKEND_FIELDS = ("target_attention_backend", "draft_attention_backend")


@functools.cache
def cuda_capability() -> tuple[int, int] | None:
    """Compute capability of the first visible GPU, or None when torch sees none."""
    import torch

    if not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability(0))


@functools.cache
def module_importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except (ImportError, OSError) as error:
        logger.debug("cannot import %s: %s", name, error)
        return False
    return True


def backend_problem(backend: str, device: str, capability: tuple[int, int] | None) -> str | None:
    """Why ``backend`` cannot run on ``device`` (a GPU of ``capability``), or None if it can or is not checked."""
    if device == "cpu":
        return None if backend == "torch_native" else "only torch_native runs on device cpu"
    if capability is None:
        return None
    sm = f"sm_{capability[0]}{capability[1]}"
    if backend == "fa4":
        if capability < (9, 0):
            return f"fa4 needs a Hopper or Blackwell GPU (compute capability >= 9.0), this one is {sm}"
        if not module_importable("flash_attn.cute"):
            return "fa4 needs the flash_attn.cute package (pip install flash-attn-4)"
    if backend == "fa3":
        if capability[0] not in (8, 9):
            return f"fa3 runs on sm_8x and sm_90 GPUs only, this one is {sm}"
        if not module_importable("sgl_kernel.flash_attn"):
            return "fa3 needs sgl_kernel's FlashAttention-3 library (sgl_kernel.flash_ops)"
    return None


def resolve_backends(cfg: DeployConfig, strict: bool = False) -> DeployConfig:
    """Returns ``cfg`` with backends that cannot run here replaced (fa3/fa4 -> triton on GPUs without them,
    anything -> torch_native on the CPU), each replacement logged; with ``strict`` raises instead.

    Whether a backend that can run here attends the drafter correctly is the server's decision, for every entry
    point (``serving/draft_attention.py``: fa3/fa4 -> triton for non-causal sliding-window drafter layers)."""
    capability = cuda_capability() if cfg.device == "cuda" else None
    if cfg.device == "cuda" and capability is None:
        logger.warning("no CUDA GPU is visible here: attention backends are not checked (SGLang checks them "
                       "at launch)")
    updates = {}
    for field in BACKEND_FIELDS:
        requested = getattr(cfg, field)
        problem = backend_problem(requested, cfg.device, capability)
        if problem is None:
            continue
        if strict:
            raise DeployConfigError(f"{cfg.where(field)}: `{field}: {requested}` cannot run here: {problem}; "
                                    "choose another backend, or drop strict to fall back automatically")
        fallback = "torch_native" if cfg.device == "cpu" else "triton"
        logger.warning("%s: `%s: %s` cannot run here (%s); using %s instead", cfg.where(field), field, requested,
                       problem, fallback)
        updates[field] = fallback
    return cfg.model_copy(update=updates) if updates else cfg


# --------------------------------------------------------------------------------------------------
# The CPU's dtype
@functools.cache
def cpu_bf16_instructions() -> str | None:
    """The bf16 matrix instructions of this CPU that torch's oneDNN GEMMs use ("AMX-BF16", "AVX512-BF16"), or
    None."""
    import torch

    if getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)():
        return "AMX-BF16"
    if getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
        return "AVX512-BF16"
    return None


def cpu_dtype_hint(cfg: DeployConfig) -> str | None:
    """A float32 CPU deployment on a CPU with bf16 matrix instructions: the line telling that bfloat16 makes its
    DFLASH steps much cheaper (there a 16-row bf16 GEMM costs about what a 1-row one does); else None."""
    if cfg.device != "cpu" or cfg.dtype != "float32":
        return None
    instructions = cpu_bf16_instructions()
    if instructions is None:
        return None
    return (f"this CPU has {instructions}: `--set dtype=bfloat16` makes DFLASH steps cheaper (1.8x for SmolLM2-135M "
            "on one AMX core: a 16-token block costs about what one token does in bf16 GEMMs), greedy outputs then "
            "being the target's up to bf16 near-ties (README, \"The first commands\")")


# --------------------------------------------------------------------------------------------------
# The command line
def to_launch_args(cfg: DeployConfig, speculative: bool = True) -> list[str]:
    """The exact argv: ``[sys.executable, "-m", "sglang.launch_server", ...]``.

    ``extra_args`` become ``--name value`` (underscores -> dashes); ``true`` is a bare flag, ``false`` is
    left out (SGLang's boolean flags are off by default), a list gives one flag followed by its items.
    With ``speculative=False`` it is the same deployment without speculation (no drafter, block size or
    draft backend): the baseline that DFLASH is measured against.
    """
    argv = [sys.executable, "-m", "sglang.launch_server", "--model-path", cfg.target_model]
    if speculative:
        argv += ["--speculative-algorithm", "DFLASH", "--speculative-draft-model-path", cfg.draft_model]
        if cfg.block_size is not None:  # a hub drafter without block_size: SGLang reads the drafter's
            argv += ["--speculative-num-draft-tokens", str(cfg.block_size)]
    argv += ["--attention-backend", cfg.target_attention_backend]
    if speculative:
        argv += ["--speculative-draft-attention-backend", cfg.draft_attention_backend]
    argv += ["--dtype", cfg.dtype, "--tp-size", str(cfg.tp_size)]
    for flag, value in (("--mem-fraction-static", cfg.mem_fraction_static),
                        ("--max-running-requests", cfg.max_running_requests),
                        ("--context-length", cfg.context_length)):
        if value is not None:
            argv += [flag, str(value)]
    argv += ["--host", cfg.host, "--port", str(cfg.port), "--device", cfg.device]
    if cfg.disable_cuda_graph:
        argv.append("--disable-cuda-graph")
    for name, value in cfg.extra_args.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is False:
            continue
        elif isinstance(value, list):
            argv += [flag, *(str(item) for item in value)]
        else:
            argv += [flag, str(value)]
    return argv


def launch_env(cfg: DeployConfig) -> dict[str, str]:
    """Environment variables the launch needs on top of the caller's (SGLang's CPU engine for device cpu)."""
    return {"SGLANG_USE_CPU_ENGINE": "1"} if cfg.device == "cpu" else {}


def format_command(argv: list[str], env: dict[str, str] | None = None) -> str:
    """One shell line: ``VAR=value ... argv`` with every word quoted as needed."""
    prefix = [f"{name}={shlex.quote(value)}" for name, value in (env or {}).items()]
    return " ".join(prefix + [shlex.join(argv)])
