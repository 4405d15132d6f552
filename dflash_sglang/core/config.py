# SPDX-License-Identifier: Apache-2.0
"""The DFlash drafter's configuration: parsed from a released drafter's ``config.json``, validated, and
checked against the target model it is meant to draft for.

This module owns every rule about what a drafter config may contain. It imports neither SGLang nor
transformers, so the model code and the SGLang plugin share one parser.

Checkpoint facts (z-lab/dflash ``dflash/model.py``): the DFlash keys live in ``dflash_config`` and, in
older checkpoints, at the top level (``block_size`` at the top level is common); ``dflash_config`` wins.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

SUPPORTED_ARCHITECTURES = ("DFlashDraftModel",)
# Known drafter architectures that this package does not run yet: fail with their name, not a KeyError.
UNSUPPORTED_ARCHITECTURES = {
    "DFlash2DraftModel": "it adds grouped dynamic causal convolutions and a candidate selector",
    "MuseGlimmerAssistantModel": "it is a different assistant architecture",
}
SUPPORTED_ROPE_TYPES = ("default",)
LAYER_TYPES = ("full_attention", "sliding_attention")
DEFAULT_BLOCK_SIZE = 16


class DraftConfigError(ValueError):
    """A drafter ``config.json`` (or its pairing with a target) is invalid; the message names the field."""


@dataclass(frozen=True)
class DFlashDraftConfig:
    """Everything the drafter needs from its ``config.json``.

    Invariants (checked in ``__post_init__``): ``num_attention_heads`` is a multiple of
    ``num_key_value_heads``; ``layer_types`` has one entry per layer; ``target_layer_ids`` is non-empty
    with distinct non-negative ids; ``block_size >= 2`` (one verified token plus at least one draft).
    """

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    target_layer_ids: tuple[int, ...]
    mask_token_id: int
    block_size: int = DEFAULT_BLOCK_SIZE
    layer_types: tuple[str, ...] = ()
    sliding_window: int | None = None
    is_causal: bool | None = None
    attention_bias: bool = False
    hidden_act: str = "silu"
    max_position_embeddings: int = 40960
    num_target_layers: int | None = None
    input_embedding_scale: float | None = None
    output_multiplier: float | None = None
    final_logit_softcapping: float | None = None
    architecture: str = "DFlashDraftModel"
    torch_dtype: str | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        positive = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                    "head_dim", "intermediate_size", "vocab_size")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise DraftConfigError(f"config.json: `{name}` must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise DraftConfigError(
                f"config.json: `num_attention_heads` ({self.num_attention_heads}) must be a multiple of "
                f"`num_key_value_heads` ({self.num_key_value_heads})")
        if not self.target_layer_ids:
            raise DraftConfigError("config.json: `dflash_config.target_layer_ids` is empty")
        if len(set(self.target_layer_ids)) != len(self.target_layer_ids) or min(self.target_layer_ids) < 0:
            raise DraftConfigError(
                f"config.json: `dflash_config.target_layer_ids` must be distinct non-negative layer indices, "
                f"got {list(self.target_layer_ids)}")
        if not isinstance(self.block_size, int) or self.block_size < 2:
            raise DraftConfigError(f"config.json: `block_size` must be an integer >= 2, got {self.block_size!r}")
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise DraftConfigError(
                f"config.json: `dflash_config.mask_token_id` ({self.mask_token_id}) is outside the "
                f"vocabulary [0, {self.vocab_size})")
        if len(self.layer_types) != self.num_hidden_layers:
            raise DraftConfigError(
                f"config.json: `layer_types` has {len(self.layer_types)} entries but `num_hidden_layers` "
                f"is {self.num_hidden_layers}")
        for layer_type in self.layer_types:
            if layer_type not in LAYER_TYPES:
                raise DraftConfigError(
                    f"config.json: `layer_types` entry {layer_type!r} is not one of {LAYER_TYPES}")
        if "sliding_attention" in self.layer_types and not self.sliding_window:
            raise DraftConfigError(
                "config.json: `layer_types` has sliding_attention layers but `sliding_window` is not set")
        if self.num_target_layers is not None and max(self.target_layer_ids) >= self.num_target_layers:
            raise DraftConfigError(
                f"config.json: `dflash_config.target_layer_ids` {list(self.target_layer_ids)} reaches beyond "
                f"`num_target_layers` ({self.num_target_layers})")

    # ----------------------------------------------------------------------------------------------
    # Derived facts
    @property
    def num_context_features(self) -> int:
        """Width of the concatenated target hidden states fed to ``fc``."""
        return len(self.target_layer_ids) * self.hidden_size

    def layer_is_causal(self, layer_id: int) -> bool:
        """Whether drafter layer ``layer_id`` masks the block causally.

        As in the reference (z-lab/dflash ``Qwen3DFlashAttention.__init__``): an explicit ``is_causal`` applies
        to every layer; without it, sliding-window layers are causal and full-attention layers are not. vLLM and
        SGLang serve z-lab's Gemma 4 drafters (sliding + full layers) the same way. NOTE: z-lab's code of April
        2026 (44947fb) ran every layer non-causally; the rule above replaced it.
        """
        if self.is_causal is not None:
            return self.is_causal
        return self.layer_types[layer_id] == "sliding_attention"

    def layer_sliding_window(self, layer_id: int) -> int | None:
        """transformers' window of layer ``layer_id`` (it counts the query itself), None for full attention."""
        return self.sliding_window if self.layer_types[layer_id] == "sliding_attention" else None

    # ----------------------------------------------------------------------------------------------
    # Parsing
    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "DFlashDraftConfig":
        """Parses a ``config.json`` dict; every problem raises :class:`DraftConfigError` naming the key."""
        if not isinstance(raw, Mapping):
            raise DraftConfigError(f"config.json must hold a JSON object, got {type(raw).__name__}")
        architecture = _architecture(raw)
        dflash = raw.get("dflash_config") or {}
        if not isinstance(dflash, Mapping):
            raise DraftConfigError("config.json: `dflash_config` must be an object")

        def draft_value(name: str, default: Any = None) -> Any:
            return dflash.get(name, raw.get(name, default))

        def required(name: str, kind: type, *, where: Mapping[str, Any] = raw, prefix: str = "") -> Any:
            if name not in where or where[name] is None:
                raise DraftConfigError(f"config.json: `{prefix}{name}` is missing")
            return _typed(where[name], kind, prefix + name)

        target_layer_ids = draft_value("target_layer_ids")
        if target_layer_ids is None:
            raise DraftConfigError("config.json: `dflash_config.target_layer_ids` is missing; a DFlash drafter "
                                   "must say which target layers it reads")
        if not isinstance(target_layer_ids, Sequence) or isinstance(target_layer_ids, str):
            raise DraftConfigError("config.json: `dflash_config.target_layer_ids` must be a list of integers")
        mask_token_id = draft_value("mask_token_id")
        if mask_token_id is None:
            raise DraftConfigError("config.json: `dflash_config.mask_token_id` is missing")

        num_heads = required("num_attention_heads", int)
        hidden_size = required("hidden_size", int)
        num_layers = required("num_hidden_layers", int)
        head_dim = raw.get("head_dim") or (hidden_size // num_heads)
        layer_types = raw.get("layer_types") or ["full_attention"] * num_layers
        is_causal = raw.get("is_causal")
        return cls(
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=_typed(raw.get("num_key_value_heads", num_heads), int, "num_key_value_heads"),
            head_dim=_typed(head_dim, int, "head_dim"),
            intermediate_size=required("intermediate_size", int),
            vocab_size=required("vocab_size", int),
            rms_norm_eps=_typed(raw.get("rms_norm_eps", 1e-6), float, "rms_norm_eps"),
            rope_theta=_rope_theta(raw),
            target_layer_ids=tuple(_typed(i, int, "dflash_config.target_layer_ids[]") for i in target_layer_ids),
            mask_token_id=_typed(mask_token_id, int, "dflash_config.mask_token_id"),
            block_size=_typed(draft_value("block_size", DEFAULT_BLOCK_SIZE), int, "block_size"),
            layer_types=tuple(layer_types),
            sliding_window=raw.get("sliding_window"),
            is_causal=None if is_causal is None else bool(is_causal),
            attention_bias=bool(raw.get("attention_bias", False)),
            hidden_act=str(raw.get("hidden_act", "silu")),
            max_position_embeddings=int(raw.get("max_position_embeddings", 40960)),
            num_target_layers=raw.get("num_target_layers"),
            input_embedding_scale=_optional_float(draft_value("input_embedding_scale"), "input_embedding_scale"),
            output_multiplier=_optional_float(draft_value("output_multiplier"), "output_multiplier"),
            final_logit_softcapping=_optional_float(draft_value("final_logit_softcapping"),
                                                    "final_logit_softcapping"),
            architecture=architecture,
            torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
            raw=dict(raw),
        )

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str]) -> "DFlashDraftConfig":
        """Reads ``<path>/config.json`` (``path`` may also name the file itself)."""
        config_path = os.path.join(path, "config.json") if os.path.isdir(path) else os.fspath(path)
        if not os.path.exists(config_path):
            raise DraftConfigError(
                f"no drafter config at {config_path}: pass the folder of a DFlash drafter checkpoint "
                "(config.json + model.safetensors)")
        with open(config_path, encoding="utf-8") as handle:
            try:
                raw = json.load(handle)
            except json.JSONDecodeError as error:
                raise DraftConfigError(f"{config_path} is not valid JSON: {error}") from None
        try:
            return cls.from_dict(raw)
        except DraftConfigError as error:
            raise DraftConfigError(f"{config_path}: {error}") from None

    # ----------------------------------------------------------------------------------------------
    # Pairing with a target
    def check_target(self, target: Mapping[str, Any] | Any, *, block_size: int | None = None) -> None:
        """Raises :class:`DraftConfigError` unless this drafter can draft for ``target``.

        Args:
            target: the target's config (a ``config.json`` dict or an object with the same attributes;
                multimodal wrappers with a ``text_config`` are unwrapped).
            block_size: the block size the server was asked to use, if any: from 2 (one draft a step) up to the
                drafter's own. A shorter block is the reference's runtime ``block_size`` (z-lab's benchmark takes
                one too): the drafter fills fewer masked positions and the target verifies fewer tokens.
        """
        text = _text_config(target)
        target_hidden = _get(text, "hidden_size")
        target_layers = _get(text, "num_hidden_layers")
        target_vocab = _get(text, "vocab_size")
        if target_hidden is not None and target_hidden != self.hidden_size:
            raise DraftConfigError(
                f"drafter/target mismatch: the drafter's hidden_size is {self.hidden_size} but the target's is "
                f"{target_hidden}; this drafter was trained for another target model")
        if target_layers is not None and max(self.target_layer_ids) >= target_layers:
            raise DraftConfigError(
                f"drafter/target mismatch: dflash_config.target_layer_ids {list(self.target_layer_ids)} reach "
                f"layer {max(self.target_layer_ids)} but the target has only {target_layers} layers")
        if (target_layers is not None and self.num_target_layers is not None
                and self.num_target_layers != target_layers):
            raise DraftConfigError(
                f"drafter/target mismatch: the drafter was trained on a {self.num_target_layers}-layer target "
                f"(num_target_layers) but the target has {target_layers} layers")
        if target_vocab is not None and self.mask_token_id >= target_vocab:
            raise DraftConfigError(
                f"drafter/target mismatch: mask_token_id {self.mask_token_id} is outside the target's "
                f"vocabulary of {target_vocab}")
        if target_vocab is not None and self.vocab_size != target_vocab:
            raise DraftConfigError(
                f"drafter/target mismatch: the drafter's vocab_size is {self.vocab_size} but the target's is "
                f"{target_vocab}; the drafter shares the target's embedding and LM head")
        if block_size is not None and not 2 <= block_size <= self.block_size:
            raise DraftConfigError(
                f"block size {block_size} was requested but the drafter was trained with block_size "
                f"{self.block_size}: --speculative-num-draft-tokens takes 2..{self.block_size} (a shorter block "
                f"verifies fewer drafts for less compute a step) or drop it for {self.block_size}")


def default_target_layer_ids(num_target_layers: int, num_ids: int) -> list[int]:
    """The reference's default target layers for a new drafter: ``num_ids`` ids evenly spaced (rounded) over
    [1, num_target_layers - 3], the middle layer for one id, deduplicated for very shallow targets."""
    if num_ids == 1:
        return [num_target_layers // 2]
    start, end = 1, max(num_target_layers - 3, 1)
    return sorted({round(start + i * (end - start) / (num_ids - 1)) for i in range(num_ids)})


def _architecture(raw: Mapping[str, Any]) -> str:
    architectures = raw.get("architectures") or ["DFlashDraftModel"]
    if not isinstance(architectures, Sequence) or isinstance(architectures, str) or not architectures:
        raise DraftConfigError("config.json: `architectures` must be a non-empty list")
    architecture = architectures[0]
    if architecture in UNSUPPORTED_ARCHITECTURES:
        raise NotImplementedError(
            f"drafter architecture {architecture!r} is not supported yet ({UNSUPPORTED_ARCHITECTURES[architecture]}); "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise DraftConfigError(
            f"config.json: `architectures` is {list(architectures)}, not a DFlash drafter; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    return architecture


def _rope_theta(raw: Mapping[str, Any]) -> float:
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise NotImplementedError(
            f"config.json: rope_type {rope_type!r} is not supported by the DFlash drafter yet; supported: "
            f"{SUPPORTED_ROPE_TYPES}")
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    return _typed(theta, float, "rope_parameters.rope_theta")


def _typed(value: Any, kind: type, name: str) -> Any:
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    raise DraftConfigError(f"config.json: `{name}` must be {'a number' if kind is float else 'an integer'}, "
                           f"got {value!r}")


def _optional_float(value: Any, name: str) -> float | None:
    return None if value is None else _typed(value, float, f"dflash_config.{name}")


def _get(config: Mapping[str, Any] | Any, name: str) -> Any:
    if isinstance(config, Mapping):
        return config.get(name)
    return getattr(config, name, None)


def _text_config(target: Mapping[str, Any] | Any) -> Mapping[str, Any] | Any:
    """The language-model part of a (possibly multimodal) target config."""
    text = _get(target, "text_config")
    return text if text is not None else target


# --------------------------------------------------------------------------------------------------
# Process-wide settings from the environment (the only place that reads os.environ).
KERNEL_MODES = ("auto", "on", "off")


def _env_choice(name: str, choices: tuple[str, ...]) -> str:
    """The environment variable ``name`` (case-insensitive), one of ``choices``; unset means ``choices[0]``."""
    value = os.environ.get(name, choices[0]).strip().lower()
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {choices}")
    return value


def kernel_mode() -> str:
    """``DFLASH_KERNELS``: ``auto`` (default: use the CUDA extension where it loads, else the PyTorch path,
    said once in the log), ``on`` (fail if it cannot load) or ``off`` (always the PyTorch path)."""
    return _env_choice("DFLASH_KERNELS", KERNEL_MODES)


def kernel_build_dir() -> str:
    """Where a JIT build of the CUDA extension is cached (``DFLASH_BUILD_DIR``)."""
    default = os.path.join(os.path.expanduser("~"), ".cache", "dflash_sglang", "build")
    return os.environ.get("DFLASH_BUILD_DIR", default)


def hook_disabled() -> bool:
    """``DFLASH_SGLANG_DISABLE=1`` leaves SGLang exactly as installed (the start-up hook does nothing)."""
    return os.environ.get("DFLASH_SGLANG_DISABLE", "").strip().lower() in ("1", "true", "yes")


def _cache_root() -> str:
    return os.environ.get("DFLASH_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "dflash_sglang"))


def stub_cache_dir() -> str:
    """Where the CPU-only libcuda stand-in is built (``DFLASH_CACHE_DIR``, default ~/.cache/dflash_sglang)."""
    return os.path.join(_cache_root(), "libcuda-stub")


def model_cache_dir() -> str:
    """Where the tests keep real models converted from PyPI's GGUF files (``DFLASH_CACHE_DIR``/models), one
    folder per model and GGUF sha256, so a second test run reuses the first's conversion."""
    return os.path.join(_cache_root(), "models")


def step_profile_path() -> str | None:
    """DFLASH_STEP_PROFILE: a file the DFLASH worker appends per-part decode-step timings to (JSON lines),
    for scripts/bench_step.py; unset (the default) = no timing and no extra synchronisation."""
    return os.environ.get("DFLASH_STEP_PROFILE") or None


BLOCK_ATTENTION_MODES = ("on", "off")


def block_attention_mode() -> str:
    """``DFLASH_BLOCK_ATTENTION``: ``on`` (default: DFLASH's block passes on the triton backend use the split-KV
    block kernel of ``ops/block_attention.py``, and on the CPU's torch_native backend one SDPA call over the
    block's queries, ``patches.cpu_attention.block_attention_cpu``) or ``off`` (SGLang's extend kernel /
    torch_native's per-request loop, e.g. to compare)."""
    return _env_choice("DFLASH_BLOCK_ATTENTION", BLOCK_ATTENTION_MODES)


DECODE_ATTENTION_MODES = ("auto", "block", "sglang")


def decode_attention_mode() -> str:
    """``DFLASH_DECODE_ATTENTION``: which kernel runs one-token decode steps on SGLang's triton backend (plain
    decoding; DFLASH's steps are block passes). ``auto`` (default): sliding-window layers run the block kernel of
    ``ops/block_attention.py`` with blocks of one token, other layers SGLang's decode kernel: the block kernel
    bounds the full listing by the window, where SGLang's needs a window listing whose graph replay reads a length
    on the host every step; ``block``: every layer the block kernel covers; ``sglang``: SGLang's kernel everywhere.
    Either way a decode sees ``sliding_window_size`` keys before the query and its own: SGLang 0.5.10 lists one
    key fewer (sgl-project/sglang#32087), and ``patches/cuda_graphs.py`` widens its decode listing by one."""
    return _env_choice("DFLASH_DECODE_ATTENTION", DECODE_ATTENTION_MODES)


def moe_stream_enabled() -> bool:
    """``DFLASH_GEMMA4_MOE_STREAM``: ``on`` (default: in CUDA graphs a Gemma 4 MoE layer's router and experts run on
    a second stream beside its dense MLP, at tensor parallel size 1; on an H100, 26B-A4B AR 8% faster at c1 and
    12% at c8, the golden checkpoints within tolerance of transformers on the GPU) or ``off`` (one stream)."""
    return _env_choice("DFLASH_GEMMA4_MOE_STREAM", ("on", "off")) == "on"


DECODE_MLP_MODES = ("on", "experts", "off")


def decode_mlp_mode() -> str:
    """``DFLASH_GEMMA4_DECODE_MLP``: which of a Gemma 4 layer's feed-forward blocks run ``ops.decode_mlp`` (two
    Triton kernels, ``ops/decode_mlp_kernel.py``) at decode batch sizes it serves: ``on`` (default: the routed
    experts, router top-k included, and a dense MLP of at most ``gemma4_layers.DENSE_DECODE_KERNEL_MAX_BYTES`` per
    rank; on an H100, 26B-A4B AR 5.6% faster at c1), ``experts`` (the routed experts only) or ``off`` (SGLang's
    fused MoE and cuBLAS GEMMs)."""
    return _env_choice("DFLASH_GEMMA4_DECODE_MLP", DECODE_MLP_MODES)


def bench_dummy_scales() -> str:
    """``DFLASH_BENCH_DUMMY_SCALES``: ``upstream`` (default: ``--load-format dummy`` as SGLang fills it) or
    ``neutral`` (norm weights and scalars set to 1 after the fill, so routers see distinct tokens; see
    ``serving/patches/dummy_weights.py``). Set by ``scripts/bench_step.py``."""
    return _env_choice("DFLASH_BENCH_DUMMY_SCALES", ("upstream", "neutral"))
