# SPDX-License-Identifier: Apache-2.0
"""The DFlash drafter as an SGLang model (``architectures: ["DFlashDraftModel"]``).

Built from SGLang's layers (RMSNorm, rotary embedding, SiLU-and-multiply, RadixAttention on the drafter's own KV
pool and attention backend), with each layer's q/k/v and gate/up projections fused into one GEMM each;
numerically the same model as ``dflash_sglang.core.model.DFlashDrafter``.

Tensor parallelism (``--tp-size N``) as SGLang's own Qwen3 (sgl-project/sglang ``python/sglang/srt/models/qwen3.py``):
``QKVParallelLinear`` / ``MergedColumnParallelLinear`` give each rank its query heads, KV heads (replicated when
fewer than N) and MLP columns, ``RowParallelLinear`` all-reduces ``o_proj`` and ``down_proj``; ``fc`` and the norms
are replicated (the target's captured hidden states are full-width on every rank: its layers end in row-parallel
all-reduces). SGLang's ModelRunner sizes the drafter's KV pool per rank from the config's KV heads, so the
injection writes this rank's heads only. The target's vocab-parallel embedding and LM head are read through
``vocab_parallel``, so every rank computes the same full draft logits.

Two entry points, both used by ``dflash_sglang.serving.worker``:

* :meth:`DFlashDraftModel.inject_context` -- the KV injection: projects the target's captured hidden
  states of N verified tokens (``fc`` + ``hidden_norm``), computes every layer's K/V with ONE GEMM over
  the stacked per-layer K/V weights, and lets ``ops.inject_kv`` apply K-norm + RoPE and scatter into the
  drafter's (layer-stacked) KV cache at the tokens' slots -- the same slots as the target's KV.
* :meth:`DFlashDraftModel.forward` -- the draft pass, run by SGLang's ModelRunner (eagerly or as a CUDA
  graph) as a TARGET_VERIFY batch whose prefix is the injected context and whose block is
  [last token, mask, ...]; returns the block's draft logits through the target's LM head.
  Attention is ``ENCODER_ONLY`` (non-causal) in layers the config marks non-causal
  (:meth:`DFlashDraftConfig.layer_is_causal`); sliding layers pass SGLang's window, the keys BEFORE the
  query (transformers' ``sliding_window`` minus one).

Sliding windows on SGLang's attention backends: triton, fa3/fa4 and flashinfer bound causal sliding layers as
the reference does (triton only because :meth:`DFlashDraftModel.get_attention_sliding_window_size` makes it
build its window KV indices). Non-causal sliding layers (an explicit ``is_causal: false``) run on triton only:
fa3/fa4 apply a window as ``(window, 0)``, i.e. causally (``draft_attention`` swaps them for triton); on triton
the block-attention kernel bounds both sides of the window, and SGLang's extend kernel
(``DFLASH_BLOCK_ATTENTION=off``) only the left side, which matches the reference while ``sliding_window >=
block_size``; other combinations are refused at load. torch_native
(the CPU backend) bounds both sides of the window in every pass (``patches/cpu_attention.py``).

Embedding and LM head are the target's tensors (:meth:`set_embed_and_head`), shared, not copied.
"""

from __future__ import annotations

import logging
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from sglang.srt.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from sglang.srt.layers.activation import SiluAndMul
from sglang.srt.layers.layernorm import RMSNorm
from sglang.srt.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from sglang.srt.layers.logits_processor import LogitsProcessorOutput
from sglang.srt.layers.radix_attention import AttentionType, RadixAttention
from sglang.srt.layers.rotary_embedding import get_rope
from sglang.srt.model_executor.forward_batch_info import ForwardBatch
from sglang.srt.model_loader.weight_utils import default_weight_loader
from sglang.srt.models.utils import apply_qk_norm

from dflash_sglang import ops
from dflash_sglang.core.checkpoint import canonical_name, check_state_dict, drafter_tensor_shapes
from dflash_sglang.core.config import DFlashDraftConfig, block_attention_mode
from dflash_sglang.core.model import finish_draft_logits
from dflash_sglang.serving.models import vocab_parallel
from dflash_sglang.serving.models.tp_split import check_tp_split

logger = logging.getLogger(__name__)


class DFlashDraftAttention(nn.Module):
    """This rank's heads: ``num_attention_heads / tp_size`` query heads and ``num_key_value_heads / tp_size`` KV
    heads (one, replicated, when there are fewer KV heads than ranks), as SGLang's ``QKVParallelLinear`` splits
    them; ``o_proj`` is row-parallel and all-reduces."""

    def __init__(self, config: DFlashDraftConfig, layer_id: int, max_position: int, tp_rank: int,
                 tp_size: int) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        # q_proj, k_proj and v_proj rows of this rank in one GEMM (k/v rows also sit in the model's kv_weight).
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, config.num_attention_heads,
                                          config.num_key_value_heads, bias=False, tp_rank=tp_rank, tp_size=tp_size,
                                          prefix=f"layers.{layer_id}.self_attn.qkv_proj")
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.o_proj = RowParallelLinear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=False,
                                        tp_rank=tp_rank, tp_size=tp_size, prefix=f"layers.{layer_id}.self_attn.o_proj")
        self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.rotary_emb = get_rope(self.head_dim, rotary_dim=self.head_dim, max_position=max_position,
                                   base=config.rope_theta, is_neox_style=True)
        self.attn = RadixAttention(
            self.num_heads, self.head_dim, self.head_dim ** -0.5, num_kv_heads=self.num_kv_heads,
            layer_id=layer_id, sliding_window_size=sglang_window(config.layer_sliding_window(layer_id)),
            attn_type=AttentionType.DECODER if config.layer_is_causal(layer_id) else AttentionType.ENCODER_ONLY,
            prefix=f"layers.{layer_id}.self_attn.attn")

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, forward_batch: ForwardBatch) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        # SGLang's Qwen3 q/k norm: in place on the fused output in one kernel on CUDA, per head elsewhere.
        q, k = apply_qk_norm(q, k, self.q_norm, self.k_norm, self.head_dim)
        q, k = self.rotary_emb(positions, q, k)
        out, _ = self.o_proj(self.attn(q, k, v.contiguous(), forward_batch))
        return out


class DFlashDraftMLP(nn.Module):
    def __init__(self, config: DFlashDraftConfig, layer_id: int, tp_rank: int, tp_size: int) -> None:
        super().__init__()
        # gate_proj then up_proj rows of this rank, one GEMM; SGLang's fused SiLU-and-multiply; row-parallel down.
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [config.intermediate_size] * 2, bias=False,
                                                       tp_rank=tp_rank, tp_size=tp_size,
                                                       prefix=f"layers.{layer_id}.mlp.gate_up_proj")
        self.act = SiluAndMul()
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, bias=False, tp_rank=tp_rank,
                                           tp_size=tp_size, prefix=f"layers.{layer_id}.mlp.down_proj")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up, _ = self.gate_up_proj(x)
        out, _ = self.down_proj(self.act(gate_up))
        return out


class DFlashDraftLayer(nn.Module):
    def __init__(self, config: DFlashDraftConfig, layer_id: int, max_position: int, tp_rank: int,
                 tp_size: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = DFlashDraftAttention(config, layer_id, max_position, tp_rank, tp_size)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = DFlashDraftMLP(config, layer_id, tp_rank, tp_size)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None,
                forward_batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, forward_batch)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class DFlashDraftModel(nn.Module):
    """SGLang entry class for released DFlash drafters (checkpoint names as in ``checkpoint.py``), sharded over
    SGLang's tensor-parallel group as its own Qwen3 is (see the module docstring)."""

    def __init__(self, config, quant_config=None, prefix: str = "") -> None:
        super().__init__()
        if quant_config is not None:
            raise NotImplementedError("quantized DFlash drafters are not supported; serve the bf16 checkpoint")
        if config.to_dict().get("attention_bias"):
            raise NotImplementedError("DFlash drafters with attention biases (attention_bias: true) are not supported; "
                                      "the released z-lab drafters have none")
        self.config = config
        self.draft_config = _draft_config(config)
        draft = self.draft_config
        check_windows_on_backends(draft, *_served_attention())
        if draft.hidden_act != "silu":
            raise NotImplementedError(f"drafter hidden_act {draft.hidden_act!r} is not supported; expected 'silu' "
                                      "(the released DFlash drafters' SwiGLU MLP)")
        tp_rank, tp_size = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
        check_tp_split("the DFlash drafter", tp_size,
                       even={"num_attention_heads": draft.num_attention_heads,
                             "intermediate_size": draft.intermediate_size},
                       kv_heads={"num_key_value_heads": draft.num_key_value_heads})
        max_position = max(draft.max_position_embeddings, getattr(config, "max_position_embeddings", 0),
                           _server_context_length())
        # fc and hidden_norm are replicated: the target's captured hidden states are full-width on every rank.
        self.fc = nn.Linear(draft.num_context_features, draft.hidden_size, bias=False)
        self.hidden_norm = RMSNorm(draft.hidden_size, eps=draft.rms_norm_eps)
        self.layers = nn.ModuleList(
            DFlashDraftLayer(draft, i, max_position, tp_rank, tp_size) for i in range(draft.num_hidden_layers))
        self.norm = RMSNorm(draft.hidden_size, eps=draft.rms_norm_eps)
        attn = self.layers[0].self_attn
        self.num_kv_heads = attn.num_kv_heads  # this rank's
        # This rank's k_proj and v_proj rows of every layer, stacked: one GEMM computes all layers' context K/V.
        self.kv_weight = nn.Parameter(torch.empty(draft.num_hidden_layers, 2 * attn.kv_size, draft.hidden_size),
                                      requires_grad=False)
        self.embed_weight: torch.Tensor | None = None
        self.lm_head_weight: torch.Tensor | None = None
        self.vocab_size = draft.vocab_size
        self._k_norm_weights: torch.Tensor | None = None
        self._cos_sin_cache: torch.Tensor | None = None

    # ----------------------------------------------------------------------------------------------
    def get_attention_sliding_window_size(self) -> int | None:
        """SGLang's window (keys before the query) of the sliding layers; None without any. SGLang's ModelRunner
        hands it to the attention backend, which the triton backend needs to build its window KV indices."""
        has_sliding = "sliding_attention" in self.draft_config.layer_types
        return sglang_window(self.draft_config.sliding_window) if has_sliding else None

    def set_embed_and_head(self, embed_weight: torch.Tensor, lm_head_weight: torch.Tensor) -> None:
        """Shares the target's embedding and LM head (no copy; this rank's vocabulary shard at TP > 1)."""
        self.embed_weight = embed_weight
        self.lm_head_weight = lm_head_weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, forward_batch: ForwardBatch,
                input_embeds: torch.Tensor | None = None, **_: object) -> LogitsProcessorOutput:
        """The draft pass over blocks [t0, mask, ...]: logits [num_tokens, vocab] fp32 of every block row."""
        if input_embeds is None:
            hidden = vocab_parallel.embed(input_ids, self.embed_weight, self.vocab_size)
        else:
            hidden = input_embeds
        if self.draft_config.input_embedding_scale is not None:
            hidden = hidden * self.draft_config.input_embedding_scale
        residual = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, forward_batch)
        hidden, _ = self.norm(hidden, residual)
        return LogitsProcessorOutput(next_token_logits=self.compute_logits(hidden))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Draft logits through the target's LM head (+ output_multiplier, soft-capping): [n, vocab] fp32, the
        full vocabulary on every rank."""
        return finish_draft_logits(vocab_parallel.logits(hidden, self.lm_head_weight, self.vocab_size).float(),
                                   self.draft_config)

    @torch.no_grad()
    def inject_context(self, target_features: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                       k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
        """Writes the context K/V of N verified tokens into every drafter layer's cache (this rank's KV heads).

        Args:
            target_features: [N, len(target_layer_ids) * hidden], the target's captured hidden states (full
                width on every rank).
            positions: [N] int64 absolute positions.
            slots: [N] int64 KV slots (the target's slots of the same tokens).
            k_cache, v_cache: [L, num_slots, num_kv_heads / tp_size, head_dim], this rank's stacked KV pool.
        """
        draft = self.draft_config
        context = self.hidden_norm(self.fc(target_features.to(self.fc.weight.dtype)))
        kv = F.linear(context, self.kv_weight.view(-1, draft.hidden_size))
        kv = kv.view(-1, draft.num_hidden_layers, 2, self.num_kv_heads, draft.head_dim)
        ops.inject_kv(kv, positions.long(), slots.long(), self._stacked_k_norm_weights(), self._cos_sin(),
                      k_cache, v_cache, draft.rms_norm_eps)

    def _stacked_k_norm_weights(self) -> torch.Tensor:
        if self._k_norm_weights is None:
            self._k_norm_weights = torch.stack([layer.self_attn.k_norm.weight.data for layer in self.layers])
        return self._k_norm_weights

    def _cos_sin(self) -> torch.Tensor:
        if self._cos_sin_cache is None:
            rotary = self.layers[0].self_attn.rotary_emb
            self._cos_sin_cache = rotary.cos_sin_cache.float().to(self.kv_weight.device).contiguous()
        return self._cos_sin_cache

    # ----------------------------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Loads released checkpoint tensors through SGLang's sharding weight loaders (this rank's rows or
        columns); missing/unexpected/mis-shaped names raise listing them. Each layer's q/k/v_proj go into its
        ``qkv_proj``, gate/up_proj into its ``gate_up_proj``; the k/v rows of this rank are then stacked into
        ``kv_weight``."""
        expected = drafter_tensor_shapes(self.draft_config)
        params = dict(self.named_parameters())
        loaded: dict[str, tuple[int, ...]] = {}
        for raw_name, tensor in weights:
            name = canonical_name(raw_name)
            loaded[name] = tuple(tensor.shape)
            if name not in expected or tuple(tensor.shape) != expected[name]:
                continue  # reported together below
            parts = name.split(".")
            if parts[0] == "layers" and parts[3] in FUSED:
                fused, shard = FUSED[parts[3]]
                param = params[".".join(parts[:3] + [fused, "weight"])]
                param.weight_loader(param, tensor, shard)
            else:
                param = params[name]
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
        check_state_dict(loaded, expected, "DFlash drafter checkpoint")
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            self.kv_weight.data[i].copy_(attn.qkv_proj.weight.data[attn.q_size:])
        self._k_norm_weights = None


# checkpoint projection -> (our fused parameter, SGLang's shard id)
FUSED = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
         "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}


def sglang_window(sliding_window: int | None) -> int:
    """SGLang's ``sliding_window_size`` for a transformers ``sliding_window`` (None: no window, -1).

    transformers' window counts the query itself (query p sees keys p - W + 1 .. p); SGLang's backends count
    the keys before the query (they keep key k while p - k <= window)."""
    return -1 if sliding_window is None else sliding_window - 1


def check_windows_on_backends(draft: DFlashDraftConfig, backends: set[str], block_size: int | None = None) -> None:
    """Refuses drafter layers whose sliding window one of the draft attention ``backends`` would apply wrongly
    (see the module docstring)."""
    windowed = [i for i in range(draft.num_hidden_layers) if draft.layer_sliding_window(i) is not None]
    if not windowed:
        return
    non_causal = [i for i in windowed if not draft.layer_is_causal(i)]
    if not non_causal:
        return
    unsupported = sorted(backends - {"triton", "torch_native"})
    if unsupported:  # a server never gets here with fa3/fa4: draft_attention.choose_draft_attention_backend swaps them
        raise NotImplementedError(
            f"drafter layers {non_causal} are non-causal (config `is_causal: false`) with a sliding window, which "
            f"the {unsupported} attention backend(s) would bound causally: pass "
            "--speculative-draft-attention-backend triton")
    block_size = block_size or draft.block_size
    if "triton" in backends and draft.sliding_window < block_size and block_attention_mode() != "on":
        raise NotImplementedError(
            f"drafter layers {non_causal} are non-causal with sliding_window {draft.sliding_window} < block_size "
            f"{block_size}: the reference then also hides block keys more than the window AFTER a query, "
            "which SGLang's triton extend kernel (left bound only) cannot do; DFLASH's block-attention kernel "
            "bounds both sides: unset DFLASH_BLOCK_ATTENTION=off")


def _served_attention() -> tuple[set[str], int | None]:
    """The attention backends the drafter's ModelRunner will use (its override, else the prefill and decode
    backends) and the block size the server runs; empty and None outside a server (a model built directly)."""
    from sglang.srt.server_args import get_global_server_args

    try:
        args = get_global_server_args()
    except ValueError:  # not set: no server
        return set(), None
    block_size = args.speculative_num_draft_tokens
    if args.speculative_draft_attention_backend:
        return {args.speculative_draft_attention_backend}, block_size
    return {backend for backend in args.get_attention_backends() if backend}, block_size


def _draft_config(config) -> DFlashDraftConfig:
    """The drafter's config.json as written (read through the server's drafter path), not transformers' parse
    of it: ``Qwen3Config`` drops ``sliding_window`` unless ``use_sliding_window`` is set, while DFlash drafters
    mark their sliding layers in ``layer_types``. Outside a server (a model built directly), the parse."""
    from sglang.srt.server_args import get_global_server_args

    from dflash_sglang.serving.server_defaults import load_draft_config

    try:
        args = get_global_server_args()
    except ValueError:  # not set: no server
        return DFlashDraftConfig.from_dict(config.to_dict())
    return load_draft_config(args)


def _server_context_length() -> int:
    from sglang.srt.server_args import get_global_server_args

    try:
        return int(get_global_server_args().context_length or 0)
    except (AttributeError, TypeError, ValueError):
        return 0


EntryClass = DFlashDraftModel
