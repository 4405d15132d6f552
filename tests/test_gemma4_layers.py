# SPDX-License-Identifier: Apache-2.0
"""Gemma 4's fused router and folded expert scales against the unfused formulas, on the CPU without a server.

The router used to run transformers' formula step by step (``models/gemma4/modeling_gemma4.py``: weight-free
RMSNorm, times ``scale``, times ``hidden^-0.5``, linear, fp32 softmax, top-k, renormalize, times
``per_expert_scale`` of the chosen experts); now the norm is one RMSNorm with the folded weight, the top-k is
SGLang's TopK and ``per_expert_scale`` lives in the experts' ``w2``. These tests write the old formula out
as the reference, check the MoE block's output against an expert-by-expert sum on the raw weights, and check
that the fold is applied exactly once whatever the load order, repetitions or a dummy load. End to end the
golden tests (tests/test_gemma4.py) check the served model against transformers.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from child_pytest import sglang_cpu_rerun
from safetensors.torch import load_file

from dflash_sglang.deploy.cpu_stub import driver_present

CHILD = "DFLASH_TEST_GEMMA4_LAYERS_CHILD"
IMPORTED = False
if driver_present() or os.environ.get(CHILD):  # SGLang's layers load sgl_kernel, which needs a GPU driver
    from sglang.srt.model_loader.utils import set_default_torch_dtype  # or the CPU stand-in at start-up
    from sglang.srt.model_loader.weight_utils import initialize_dummy_weights

    from dflash_sglang import ops
    from dflash_sglang.serving.models.gemma4 import Gemma4ForCausalLM
    from dflash_sglang.serving.models.gemma4_config import Gemma4Config, Gemma4TextConfig
    from dflash_sglang.serving.models.gemma4_layers import Gemma4MoE, Gemma4Router
    from dflash_sglang.testing.sglang_layers import init_sglang_single_process
    IMPORTED = True

in_sglang = pytest.mark.skipif(not IMPORTED, reason="runs in the child process of test_in_a_child_process")
MOE_FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "gemma4", "moe")
HIDDEN, EXPERTS, TOP_K, INTERMEDIATE = 32, 8, 3, 16


test_in_a_child_process = sglang_cpu_rerun(__file__, CHILD, IMPORTED)


@pytest.fixture(scope="module", autouse=True)
def sglang_process():
    if IMPORTED:
        init_sglang_single_process()


def _config() -> Gemma4TextConfig:
    return Gemma4TextConfig(hidden_size=HIDDEN, enable_moe_block=True, num_experts=EXPERTS, top_k_experts=TOP_K,
                            moe_intermediate_size=INTERMEDIATE, rms_norm_eps=1e-6)


def _checkpoint(seed: int) -> dict[str, torch.Tensor]:
    """One layer's router and experts in the released layout (scales around 1, as in the tiny fixtures)."""
    generator = torch.Generator().manual_seed(seed)
    return {"router.proj.weight": torch.randn(EXPERTS, HIDDEN, generator=generator),
            "router.scale": 0.5 + torch.rand(HIDDEN, generator=generator),
            "router.per_expert_scale": 0.5 + torch.rand(EXPERTS, generator=generator),
            "experts.gate_up_proj": torch.randn(EXPERTS, 2 * INTERMEDIATE, HIDDEN, generator=generator) / 4,
            "experts.down_proj": torch.randn(EXPERTS, HIDDEN, INTERMEDIATE, generator=generator) / 4}


def _load(moe: Gemma4MoE, checkpoint: dict[str, torch.Tensor], names: list[str] | None = None) -> None:
    """What ``Gemma4ForCausalLM.load_weights`` does for these names (default: all), in the given order."""
    params = dict(moe.named_parameters())
    for name in names or list(checkpoint):
        tensor = checkpoint[name]
        if name == "experts.gate_up_proj":
            param = moe.experts.w13_weight
            for e, (gate, up) in enumerate(zip(*tensor.chunk(2, dim=1))):
                param.weight_loader(param, gate, "w13_weight", shard_id="w1", expert_id=e)
                param.weight_loader(param, up, "w13_weight", shard_id="w3", expert_id=e)
        elif name == "experts.down_proj":
            param = moe.experts.w2_weight
            for e in range(EXPERTS):
                param.weight_loader(param, tensor[e], "w2_weight", shard_id="w2", expert_id=e)
        else:
            param = params[name]
            getattr(param, "weight_loader", lambda p, t: p.data.copy_(t))(param, tensor)


def _reference_routing(checkpoint: dict[str, torch.Tensor], hidden: torch.Tensor):
    """transformers' Gemma 4 router, step by step: fp32 weights [tokens, k] (with per_expert_scale), ids."""
    x = hidden.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    x = x * checkpoint["router.scale"] * HIDDEN ** -0.5
    probs = torch.softmax(F.linear(x, checkpoint["router.proj.weight"]), dim=-1)
    weights, ids = torch.topk(probs, TOP_K, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights * checkpoint["router.per_expert_scale"][ids], ids


def _reference_moe(checkpoint: dict[str, torch.Tensor], router_input: torch.Tensor, expert_input: torch.Tensor):
    """Every expert on every token from the raw checkpoint tensors, weighted by the reference routing (0 if
    not chosen)."""
    weights, ids = _reference_routing(checkpoint, router_input)
    dense = torch.zeros(router_input.shape[0], EXPERTS).scatter(1, ids, weights)
    gate, up = torch.einsum("th,eih->tei", expert_input, checkpoint["experts.gate_up_proj"]).chunk(2, dim=-1)
    out = torch.einsum("tei,ehi->teh", F.gelu(gate, approximate="tanh") * up, checkpoint["experts.down_proj"])
    return torch.einsum("te,teh->th", dense, out)


def _router_input(moe: Gemma4MoE, hidden: torch.Tensor) -> torch.Tensor:
    """The residual through the router's norm, as the decoder layer's fused step hands it to the router."""
    return ops.residual_norm(hidden, [moe.router.norm.weight], 1e-6)[1][0]


def _hidden(tokens: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, HIDDEN, generator=generator) * (1 + 4 * torch.rand(tokens, 1, generator=generator))


@in_sglang
def test_router_matches_the_unfused_formula():
    checkpoint = _checkpoint(seed=1)
    moe = Gemma4MoE(_config(), layer_id=0)
    _load(moe, checkpoint, ["router.proj.weight", "router.scale", "router.per_expert_scale"])
    assert isinstance(moe.router, Gemma4Router)
    hidden = _hidden(64, seed=2)
    routing = moe.router(_router_input(moe, hidden))
    weights, ids = _reference_routing(checkpoint, hidden)
    assert torch.equal(routing.topk_ids.long(), ids)
    # the router's weights leave per_expert_scale to the experts' w2
    scale = checkpoint["router.per_expert_scale"][ids]
    torch.testing.assert_close(routing.topk_weights * scale, weights, rtol=1e-5, atol=1e-6)
    assert routing.topk_weights.dtype == torch.float32
    torch.testing.assert_close(routing.topk_weights.sum(-1), torch.ones(64))
    torch.testing.assert_close(moe.router.norm.weight, checkpoint["router.scale"] * HIDDEN ** -0.5)


@in_sglang
def test_moe_output_with_folded_w2_equals_the_unfolded_computation():
    checkpoint = _checkpoint(seed=3)
    moe = Gemma4MoE(_config(), layer_id=0)
    _load(moe, checkpoint)
    moe.fold_per_expert_scale()
    torch.testing.assert_close(moe.experts.w2_weight,
                               checkpoint["experts.down_proj"] * checkpoint["router.per_expert_scale"][:, None, None])
    router_input, expert_input = _hidden(16, seed=4), _hidden(16, seed=5)
    torch.testing.assert_close(moe(_router_input(moe, router_input), expert_input),
                               _reference_moe(checkpoint, router_input, expert_input), rtol=1e-5, atol=1e-5)


@in_sglang
def test_per_expert_scale_is_folded_once_in_any_load_order():
    checkpoint = _checkpoint(seed=6)
    expected = checkpoint["experts.down_proj"] * checkpoint["router.per_expert_scale"][:, None, None]
    names = list(checkpoint)
    orders = {"scale last": names, "scale first": names[::-1]}
    for label, order in orders.items():
        moe = Gemma4MoE(_config(), layer_id=0)
        _load(moe, checkpoint, order)
        moe.fold_per_expert_scale()
        torch.testing.assert_close(moe.experts.w2_weight, expected, msg=label)
        moe.fold_per_expert_scale()  # again: nothing left to fold
        torch.testing.assert_close(moe.experts.w2_weight, expected, msg=f"{label}, folded twice")
        _load(moe, checkpoint)  # a second full load (update_weights_from_disk) folds from the raw weights again
        moe.fold_per_expert_scale()
        torch.testing.assert_close(moe.experts.w2_weight, expected, msg=f"{label}, loaded twice")
    # only per_expert_scale changes: the folded w2 is rescaled to the new scale, not multiplied on top
    new_scale = {"router.per_expert_scale": checkpoint["router.per_expert_scale"].flip(0)}
    _load(moe, new_scale)
    moe.fold_per_expert_scale()
    torch.testing.assert_close(moe.experts.w2_weight,
                               checkpoint["experts.down_proj"] * new_scale["router.per_expert_scale"][:, None, None])


@in_sglang
def test_bf16_fold_rounds_once():
    """A bf16 model (SGLang builds it under its dtype): w2 = bf16(raw * scale), one rounding of the fp32 product,
    and the fold's bookkeeping stays in fp32."""
    checkpoint = {name: tensor.bfloat16() for name, tensor in _checkpoint(seed=10).items()}
    with set_default_torch_dtype(torch.bfloat16):
        moe = Gemma4MoE(_config(), layer_id=0)
    _load(moe, checkpoint)
    moe.fold_per_expert_scale()
    assert moe.w2_folded_scale.dtype == torch.float32 and moe.experts.w2_weight.dtype == torch.bfloat16
    scale = checkpoint["router.per_expert_scale"].float()[:, None, None]
    assert torch.equal(moe.experts.w2_weight, (checkpoint["experts.down_proj"].float() * scale).bfloat16())


@in_sglang
def test_dummy_weights_then_a_real_load_fold_once():
    """SGLang's --load-format dummy randomizes the state dict and never calls load_weights: the fold state (a
    non-persistent buffer) stays "nothing folded", the model runs, and a later real load folds once."""
    checkpoint = _checkpoint(seed=7)
    moe = Gemma4MoE(_config(), layer_id=0)
    initialize_dummy_weights(moe)
    assert torch.equal(moe.w2_folded_scale, torch.ones(EXPERTS))
    assert torch.isfinite(moe(_hidden(4, seed=8), _hidden(4, seed=9))).all()
    _load(moe, checkpoint)
    moe.fold_per_expert_scale()
    torch.testing.assert_close(moe.experts.w2_weight,
                               checkpoint["experts.down_proj"] * checkpoint["router.per_expert_scale"][:, None, None])


@in_sglang
def test_model_load_weights_folds_once_under_the_checkpoint_names():
    """The tiny MoE golden checkpoint through ``Gemma4ForCausalLM.load_weights``, twice."""
    with open(os.path.join(MOE_FIXTURE, "config.json"), encoding="utf-8") as handle:
        model = Gemma4ForCausalLM(Gemma4Config.from_dict(json.load(handle)))
    tensors = load_file(os.path.join(MOE_FIXTURE, "model.safetensors"))
    prefix = "model.language_model.layers.0."
    expected_w2 = (tensors[prefix + "experts.down_proj"].float()
                   * tensors[prefix + "router.per_expert_scale"].float()[:, None, None])
    moe = model.model.layers[0].moe
    for _ in range(2):
        model.load_weights(tensors.items())
        torch.testing.assert_close(moe.experts.w2_weight, expected_w2)
    hidden = model.config.hidden_size
    torch.testing.assert_close(moe.router.norm.weight, tensors[prefix + "router.scale"].float() * hidden ** -0.5)


@in_sglang
def test_full_attention_layers_share_one_rope_table():
    """Each proportional-RoPE module holds a [max_position, head_dim] fp32 cos/sin table (512 MiB at Gemma 4's
    262144 x 512): the full-attention layers must share one module, as the sliding layers share get_rope's."""
    with open(os.path.join(MOE_FIXTURE, "config.json"), encoding="utf-8") as handle:
        model = Gemma4ForCausalLM(Gemma4Config.from_dict(json.load(handle)))
    by_type: dict[str, set[int]] = {}
    for layer, kind in zip(model.model.layers, model.config.layer_types):
        by_type.setdefault(kind, set()).add(id(layer.self_attn.rotary_emb.cos_sin_cache))
    assert sorted(by_type) == ["full_attention", "sliding_attention"]
    assert all(len(tables) == 1 for tables in by_type.values()), by_type
    assert model.config.layer_types.count("full_attention") >= 2  # the fixture has something to share


@in_sglang
def test_benchmark_dummy_weights_keep_norms_and_scalars_at_one(monkeypatch):
    """``DFLASH_BENCH_DUMMY_SCALES=neutral`` (bench_step.py's servers): SGLang's dummy loader, through its own
    ``initialize_dummy_weights`` (patched on import), leaves every norm weight, layer scalar and per-expert scale at
    1 and the matrices at upstream's [-1e-3, 1e-3]; unset, the scales are upstream's too (the 26B's residual then
    shrinks a thousandfold per layer and every token routes alike)."""
    from sglang.srt.model_loader import loader

    with open(os.path.join(MOE_FIXTURE, "config.json"), encoding="utf-8") as handle:
        config = Gemma4Config.from_dict(json.load(handle))
    scale_names = {"layer_scalar", "input_layernorm.weight", "router.per_expert_scale", "router.norm.weight",
                   "self_attn.q_norm.weight"}
    for setting in ("upstream", "neutral"):
        monkeypatch.setenv("DFLASH_BENCH_DUMMY_SCALES", setting)
        model = Gemma4ForCausalLM(config)
        loader.initialize_dummy_weights(model)
        params = dict(model.named_parameters())
        scales = {name: params[name] for name in params if any(name.endswith(s) for s in scale_names)}
        assert len(scales) >= len(scale_names)
        for name, param in scales.items():
            if setting == "neutral":
                assert torch.equal(param, torch.ones_like(param)), name
            else:
                assert param.abs().max() <= 1e-3, name
        w13 = model.model.layers[0].moe.experts.w13_weight
        assert 0 < w13.abs().max() <= 1e-3
    moe = model.model.layers[0].moe
    ids = moe.router(_hidden(16, seed=3)).topk_ids
    assert len({tuple(sorted(row)) for row in ids.tolist()}) > 1  # distinct tokens, distinct experts


@in_sglang
def test_dense_mlp_takes_the_decode_kernels_only_up_to_its_size_bound(monkeypatch):
    """``DFLASH_GEMMA4_DECODE_MLP=on`` puts a dense MLP on ``ops.decode_mlp`` only while its weights are at most
    ``DENSE_DECODE_KERNEL_MAX_BYTES`` (the 26B-A4B's 36 MB MLP gained on an H100; the 31B's 693 MB one read at
    1.25 TB/s there); ``experts`` and ``off`` keep every dense MLP on SGLang's GEMMs."""
    from dflash_sglang.serving.models import gemma4_layers

    def takes_kernels(hidden: int, inter: int) -> bool:
        with set_default_torch_dtype(torch.bfloat16):
            return gemma4_layers.Gemma4MLP(hidden, inter).decode_kernels

    weight_bytes = 3 * HIDDEN * INTERMEDIATE * 2
    assert takes_kernels(HIDDEN, INTERMEDIATE)
    monkeypatch.setattr(gemma4_layers, "DENSE_DECODE_KERNEL_MAX_BYTES", weight_bytes)
    assert takes_kernels(HIDDEN, INTERMEDIATE)
    assert not takes_kernels(HIDDEN, INTERMEDIATE + 1)
    for mode in ("experts", "off"):
        monkeypatch.setenv("DFLASH_GEMMA4_DECODE_MLP", mode)
        assert not takes_kernels(HIDDEN, INTERMEDIATE)
