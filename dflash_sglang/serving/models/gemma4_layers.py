# SPDX-License-Identifier: Apache-2.0
"""Gemma 4 attention, MLP and mixture-of-experts blocks built from SGLang's layers.

Numerics follow transformers' ``models/gemma4/modeling_gemma4.py`` (>= 5.17):

* attention: per-head RMSNorm on q and k (weighted) and on v (no weight), then RoPE on q and k; scaling 1.0
  (the norms set the scale); ``attention_k_eq_v`` full-attention layers have no ``v_proj`` and use the raw
  key projection as values (before ``k_norm``, through ``v_norm``).
* RoPE per layer type: sliding layers the default RoPE over the whole head; full layers the
  ``proportional`` RoPE: frequencies ``theta^(-2i/head_dim)`` for the first ``partial_rotary_factor`` of the
  pairs and zero (no rotation) for the rest, with rotate-half pairing over the whole head.
* MoE (26B-A4B): a router (weight-free RMSNorm, times ``scale * hidden^-0.5``, linear, softmax, top-k,
  renormalized, times ``per_expert_scale`` of the chosen experts) and GELU-gated experts.

Fused for the decode step, with the same math up to floating-point rounding (a few kernels per layer instead of
~30 elementwise ones): q, k and v's per-head norms and RoPE are one kernel (``ops.qkv_norm_rope``; the norm
modules hold the weights); the RMSNorms around the residual adds are the decoder layer's (``gemma4.py``, through
``ops.residual_norm``), the router's included: its weight is ``scale * hidden^-0.5``, folded when
``router.scale`` loads, so the router receives its normalized input; its projection at decode batch sizes is
``ops.narrow_linear`` (one kernel where cuBLAS runs a split-K GEMM and a reduce); softmax, top-k and
renormalization are SGLang's ``TopK`` (on CUDA its ``topk_softmax`` kernel, as Qwen3-MoE's router; on the CPU its
PyTorch ``forward_native``); and ``per_expert_scale`` multiplies each expert's down projection ``w2`` once after loading
(:meth:`Gemma4MoE.fold_per_expert_scale`), which is exact because an expert's output is linear in its ``w2`` and
scaled by its routing weight. Decode batches of ``ops/decode_mlp_kernel.MAX_TOKENS`` token(s) run the routed
experts (top-k from the router's logits included) and a small dense MLP as ``ops.decode_mlp``'s two kernels each, on
the same weights (``DFLASH_GEMMA4_DECODE_MLP``: ``on`` by default, ``experts`` for the experts only, ``off``). The
proportional RoPE module (and its cos/sin cache) is shared by all layers of one shape (:func:`proportional_rope`).

KV cache layout. Each layer attends with its own shape -- RadixAttention gets the layer's head size and KV
heads (31B: sliding 16 x 256, full 4 x 512 with 32 query heads, so grouped-query ratios 2 and 8) -- and its
K/V go to buffers of exactly that shape: the target's KV pool is ``gemma4_kv_pool.Gemma4KVPool`` (SGLang's
``SWAKVPool``, one sub-pool per layer type, one slot space), sized by what each layer type takes.
Sliding layers still keep every token's K/V (not only their window's).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from sglang.srt.distributed import tensor_model_parallel_all_reduce
from sglang.srt.layers.activation import GeluAndMul
from sglang.srt.layers.layernorm import RMSNorm
from sglang.srt.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, ReplicatedLinear, RowParallelLinear
from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE
from sglang.srt.layers.moe.topk import StandardTopKOutput, TopK, TopKOutputFormat
from sglang.srt.layers.quantization.unquant import UnquantizedFusedMoEMethod
from sglang.srt.layers.radix_attention import RadixAttention
from sglang.srt.layers.rotary_embedding import RotaryEmbedding, get_rope
from sglang.srt.model_executor.forward_batch_info import ForwardBatch
from sglang.srt.model_loader.weight_utils import default_weight_loader
from sglang.srt.utils import add_prefix

from dflash_sglang import ops
from dflash_sglang.core.config import decode_mlp_mode
from dflash_sglang.serving.models.gemma4_config import Gemma4TextConfig


class ProportionalRotaryEmbedding(RotaryEmbedding):
    """Gemma 4's ``proportional`` RoPE: ``num_rotated`` frequency pairs rotate, the others keep cos 1 / sin 0."""

    def __init__(self, head_dim: int, max_position: int, base: float, rotary_fraction: float,
                 dtype: torch.dtype) -> None:
        self._num_rotated = int(rotary_fraction * head_dim // 2)  # as transformers' rope_angles
        super().__init__(head_dim, head_dim, max_position, base, True, dtype)

    def _compute_inv_freq(self, base: float) -> torch.Tensor:
        inv_freq = super()._compute_inv_freq(base)
        inv_freq[self._num_rotated:] = 0.0
        return inv_freq


@functools.cache
def proportional_rope(head_dim: int, max_position: int, base: float, rotary_fraction: float,
                      dtype: torch.dtype) -> ProportionalRotaryEmbedding:
    """One module per shape, shared by every layer that uses it, as SGLang's ``get_rope`` shares its own: the cos/sin
    cache is [max_position, head_dim] fp32 on CUDA (512 MiB for Gemma 4's 262144 positions x 512), which a module
    per full-attention layer would repeat (31B: 10 layers, 5 GiB taken from the KV cache)."""
    return ProportionalRotaryEmbedding(head_dim, max_position, base, rotary_fraction, dtype)


class Gemma4Attention(nn.Module):
    """This rank's heads (SGLang's ``QKVParallelLinear`` split: query heads evenly, KV heads evenly or one
    replicated head); ``o_proj`` is row-parallel and all-reduces. ``attention_k_eq_v`` layers load no ``v_proj``
    (a zero-width v block) and take the values from the raw key projection."""

    def __init__(self, config: Gemma4TextConfig, layer_id: int, quant_config=None, prefix: str = "") -> None:
        super().__init__()
        spec = config.layer_attention(layer_id)
        self.head_dim = spec.head_dim
        self.k_eq_v = spec.k_eq_v
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, config.num_attention_heads,
                                          spec.num_kv_heads, bias=config.attention_bias, quant_config=quant_config,
                                          prefix=add_prefix("qkv_proj", prefix), v_head_size=0 if self.k_eq_v else None)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads  # this rank's
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.o_proj = RowParallelLinear(config.num_attention_heads * self.head_dim, config.hidden_size,
                                        bias=config.attention_bias, quant_config=quant_config,
                                        prefix=add_prefix("o_proj", prefix))
        # the weights and eps of the per-head norms (checkpoint names q_norm.weight, k_norm.weight), applied by
        # ops.qkv_norm_rope; v's norm has no weight
        self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        max_position = config.max_position_embeddings
        if spec.rotary_fraction < 1.0:
            self.rotary_emb = proportional_rope(self.head_dim, max_position, spec.rope_theta, spec.rotary_fraction,
                                                torch.get_default_dtype())
        else:
            self.rotary_emb = get_rope(self.head_dim, rotary_dim=self.head_dim, max_position=max_position,
                                       base=spec.rope_theta, is_neox_style=True)
        # SGLang's window counts the keys before the query; transformers' counts the query too.
        window = -1 if spec.sliding_window is None else spec.sliding_window - 1
        self.attn = RadixAttention(self.num_heads, self.head_dim, 1.0, num_kv_heads=self.num_kv_heads,
                                   layer_id=layer_id, sliding_window_size=window, prefix=add_prefix("attn", prefix))

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, forward_batch: ForwardBatch) -> torch.Tensor:
        """``hidden``: the layer's normalized input (``input_layernorm`` ran in the previous fused step)."""
        qkv, _ = self.qkv_proj(hidden)
        q, k, v = ops.qkv_norm_rope(qkv, positions, self.q_norm.weight, self.k_norm.weight,
                                    self.rotary_emb.cos_sin_cache, self.num_heads, self.num_kv_heads, self.head_dim,
                                    self.k_eq_v, self.q_norm.variance_epsilon)
        out, _ = self.o_proj(self.attn(q, k, v, forward_batch))
        return out


# The dense MLP runs ops.decode_mlp's kernels only up to this many weight bytes per rank: they win where launches
# cost, not where the read does. H100, bf16, one token: Gemma-4-26B-A4B's 36 MB MLP on the kernels (with its
# experts) took the AR step from 4.40 to 4.15 ms; Gemma-4-31B's 693 MB MLP read at 1.25 TB/s on them (22.3 ms of a
# 36.3 ms step) where cuBLAS's step was 23.2 ms, 1.13x the model's weight-read floor.
DENSE_DECODE_KERNEL_MAX_BYTES = 64 << 20


class Gemma4MLP(nn.Module):
    """The dense gated MLP: SGLang's GEMMs and activation, or where ``ops.decode_mlp`` serves the batch (and
    ``DFLASH_GEMMA4_DECODE_MLP=on``, the default, for an MLP of at most ``DENSE_DECODE_KERNEL_MAX_BYTES`` per rank)
    its kernels on the same weights, this rank's intermediate columns, all-reduced as ``down_proj`` would."""

    def __init__(self, hidden_size: int, intermediate_size: int, quant_config=None, prefix: str = "") -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2, bias=False,
                                                       quant_config=quant_config,
                                                       prefix=add_prefix("gate_up_proj", prefix))
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias=False, quant_config=quant_config,
                                           prefix=add_prefix("down_proj", prefix))
        self.act_fn = GeluAndMul(approximate="tanh")  # gelu_pytorch_tanh
        weight_bytes = sum(w.numel() * w.element_size() for w in (self.gate_up_proj.weight, self.down_proj.weight))
        self.decode_kernels = (quant_config is None and decode_mlp_mode() == "on"
                               and weight_bytes <= DENSE_DECODE_KERNEL_MAX_BYTES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.decode_kernels:
            w13, w2 = self.gate_up_proj.weight[None], self.down_proj.weight[None]
            if ops.decode_mlp_serves(x, w13, w2):
                out = ops.decode_mlp(x, w13, w2, tanh_gelu=True)
                return tensor_model_parallel_all_reduce(out) if self.down_proj.tp_size > 1 else out
        gate_up, _ = self.gate_up_proj(x)
        out, _ = self.down_proj(self.act_fn(gate_up))
        return out


class Gemma4Router(nn.Module):
    """Checkpoint names ``router.proj.weight``, ``router.scale``, ``router.per_expert_scale``.

    ``scale`` is the weight of the router's ``RMSNorm`` (one Parameter under both names) and holds the checkpoint's
    ``scale`` times ``hidden^-0.5``, multiplied in as it loads. ``per_expert_scale`` is not used here: the MoE block
    folds it into the experts' ``w2`` (:meth:`Gemma4MoE.fold_per_expert_scale`).
    """

    def __init__(self, config: Gemma4TextConfig, layer_id: int, prefix: str = "") -> None:
        super().__init__()
        self.input_scale = config.hidden_size ** -0.5
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.scale = self.norm.weight
        self.scale.weight_loader = self._load_scale
        self.proj = ReplicatedLinear(config.hidden_size, config.num_experts, bias=False,
                                     prefix=add_prefix("proj", prefix))
        self.per_expert_scale = nn.Parameter(torch.ones(config.num_experts), requires_grad=False)
        # softmax over the experts, top-k, renormalized; STANDARD: the (weights, ids) that FusedMoE's triton runner
        # and the CPU experts take, whatever MoE runner backend is configured
        self.topk = TopK(config.top_k_experts, layer_id=layer_id, renormalize=True, scoring_func="softmax",
                         output_format=TopKOutputFormat.STANDARD)

    def _load_scale(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        default_weight_loader(param, loaded_weight.float() * self.input_scale)

    def logits(self, normed: torch.Tensor) -> torch.Tensor:
        """``normed`` [tokens, hidden], the residual through this router's norm (``self.norm``'s weight, applied by
        the decoder layer's fused step) -> the experts' logits [tokens, experts]."""
        if ops.narrow_linear_serves(normed, self.proj.weight):  # decode batches: one kernel instead of cuBLAS's two
            return ops.narrow_linear(normed, self.proj.weight)
        logits, _ = self.proj(normed)
        return logits

    def forward(self, normed: torch.Tensor) -> StandardTopKOutput:
        """``normed`` as for :meth:`logits` -> fp32 routing weights [tokens, k] (without ``per_expert_scale``) and
        expert ids."""
        logits = self.logits(normed)
        if normed.is_cuda:
            return self.topk(normed, logits)
        # NOTE(gemma4): SGLang's TopK.forward_cpu calls the CUDA top-k kernel unless the CPU has AMX; its
        # forward_native is the same math in PyTorch (fp32 softmax, torch.topk, divide by the sum)
        return self.topk.forward_native(normed, logits)


class Gemma4MoE(nn.Module):
    """Router + SGLang's FusedMoE experts (``w13_weight`` [E, 2I, H] gate|up, ``w2_weight`` [E, H, I]).

    On CUDA the experts run SGLang's fused MoE kernels. NOTE(gemma4): its ``gelu`` activation is the erf
    GELU, not Gemma's tanh approximation (|difference| < 1e-3 of the activation). SGLang's CPU MoE path
    supports SiLU only, so on the CPU the experts run in PyTorch on the same weights (exact tanh GELU).

    Invariant: ``experts.w2_weight[l]`` is this rank's part of the checkpoint's ``down_proj`` of local expert ``l``
    times ``w2_folded_scale[l]``. Writing an expert's ``w2`` resets its factor to 1; :meth:`fold_per_expert_scale`
    (called at the end of every ``Gemma4ForCausalLM.load_weights``) brings every factor to the router's
    ``per_expert_scale`` of that expert, so the scale is applied once whatever the load order or repetitions.
    """

    def __init__(self, config: Gemma4TextConfig, layer_id: int, quant_config=None, prefix: str = "") -> None:
        super().__init__()
        self.router = Gemma4Router(config, layer_id, prefix=add_prefix("router", prefix))
        self.experts = FusedMoE(num_experts=config.num_experts, hidden_size=config.hidden_size,
                                intermediate_size=config.moe_intermediate_size, layer_id=layer_id,
                                top_k=config.top_k_experts, reduce_results=True, quant_config=quant_config,
                                activation="gelu", prefix=add_prefix("experts", prefix))
        if not isinstance(self.experts.quant_method, UnquantizedFusedMoEMethod):
            raise NotImplementedError("Gemma 4 MoE with quantized experts: per_expert_scale is folded into the bf16 "
                                      "down projections; serve an unquantized checkpoint")
        # FusedMoE's own global -> local expert map (the one its weight loader uses): EP rank r holds a contiguous
        # range of the experts; Gemma 4 declares no EPLB expert placement, so no physical replicas exist
        to_local = [self.experts._map_global_expert_id_to_local_expert_id(e) for e in range(config.num_experts)]
        local_experts = sorted((local, e) for e, local in enumerate(to_local) if local >= 0)
        assert [local for local, _ in local_experts] == list(range(self.experts.num_local_experts)), to_local
        self.register_buffer("local_expert_ids", torch.tensor([e for _, e in local_experts]), persistent=False)
        self.register_buffer("w2_folded_scale", torch.ones(self.experts.num_local_experts, dtype=torch.float32),
                             persistent=False)
        self.experts.w2_weight.weight_loader = self._load_w2
        # ops.decode_mlp at decode batch sizes: every expert on this rank (no expert parallelism), bf16/fp16 weights
        self.decode_kernels = decode_mlp_mode() in ("experts", "on") and self.experts.moe_ep_size == 1

    def _load_w2(self, param: nn.Parameter, loaded_weight: torch.Tensor, weight_name: str, shard_id: str,
                 expert_id: int) -> None:
        self.experts.weight_loader(param, loaded_weight, weight_name, shard_id=shard_id, expert_id=expert_id)
        local = self.experts._map_global_expert_id_to_local_expert_id(expert_id)
        if local >= 0:
            self.w2_folded_scale[local] = 1.0

    @torch.no_grad()
    def fold_per_expert_scale(self) -> None:
        """Multiplies each local expert's ``w2`` by what its ``per_expert_scale`` still needs (see the invariant);
        a no-op when nothing changed since the last fold."""
        target = self.router.per_expert_scale.float()[self.local_expert_ids]
        changed = (target != self.w2_folded_scale).nonzero().flatten().tolist()
        if any(self.w2_folded_scale[local] == 0 for local in changed):
            raise ValueError("Gemma 4 MoE: per_expert_scale changed for an expert whose down projection holds a "
                             "zero scale; load the experts' down_proj together with router.per_expert_scale")
        w2 = self.experts.w2_weight.data
        for local in changed:
            w2[local].mul_(float(target[local] / self.w2_folded_scale[local]))
            self.w2_folded_scale[local] = target[local]

    def forward(self, router_input: torch.Tensor, expert_input: torch.Tensor) -> torch.Tensor:
        """``router_input``: the residual through the router's norm; ``expert_input``: through
        ``pre_feedforward_layernorm_2``."""
        w13, w2 = self.experts.w13_weight, self.experts.w2_weight
        if self.decode_kernels and ops.decode_mlp_serves(expert_input, w13, w2):
            # the router's softmax top-k inside the kernels; erf GELU, as SGLang's fused MoE runs the wider batches
            out = ops.decode_mlp(expert_input, w13, w2, self.router.logits(router_input), self.experts.top_k,
                                 tanh_gelu=False)
            return tensor_model_parallel_all_reduce(out) if self.experts.moe_tp_size > 1 else out
        routing = self.router(router_input)
        if expert_input.is_cuda:
            return self.experts(expert_input, routing)
        if getattr(self.experts, "use_intel_amx_backend", False):
            raise NotImplementedError("Gemma 4 MoE on an AMX CPU: SGLang packs the expert weights for a SiLU-only "
                                      "kernel; serve it on a GPU or a CPU without AMX")
        if self.experts.moe_ep_size > 1:
            raise NotImplementedError("Gemma 4 MoE with expert parallelism (--ep-size > 1) on the CPU: the PyTorch "
                                      "experts hold no local-expert map; serve it on a GPU, or with --ep-size 1")
        out = experts_reference(expert_input, routing.topk_weights, routing.topk_ids.long(),
                                self.experts.w13_weight, self.experts.w2_weight)
        # each MoE TP rank holds a column slice of every expert: partial sums, reduced as FusedMoE does
        return tensor_model_parallel_all_reduce(out) if self.experts.moe_tp_size > 1 else out


def experts_reference(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, w13: torch.Tensor,
                      w2: torch.Tensor) -> torch.Tensor:
    """GELU(tanh)-gated experts in PyTorch, expert by expert (fp32 accumulation of the weighted sum).

    Args:
        x: [tokens, hidden]; topk_weights: [tokens, k] fp32; topk_ids: [tokens, k] int64;
        w13: [experts, 2 * intermediate, hidden] (gate rows, then up rows); w2: [experts, hidden, intermediate].
    """
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    for expert in topk_ids.unique().tolist():
        token_idx, slot = torch.where(topk_ids == expert)
        gate, up = F.linear(x[token_idx], w13[expert]).chunk(2, dim=-1)
        y = F.linear(F.gelu(gate, approximate="tanh") * up, w2[expert])
        out.index_add_(0, token_idx, y.float() * topk_weights[token_idx, slot, None])
    return out.to(x.dtype)
