# SPDX-License-Identifier: Apache-2.0
"""Gemma 4 text decoder for SGLang (``Gemma4ForConditionalGeneration`` checkpoints served text-only, and
``Gemma4ForCausalLM``), matching transformers' ``models/gemma4`` (>= 5.17); blocks in ``gemma4_layers.py``.

A decoder layer (transformers' ``Gemma4TextDecoderLayer``)::

    h = h + post_attention_layernorm(attn(input_layernorm(h)))
    m = mlp(pre_feedforward_layernorm(h))
    if MoE:  m = post_feedforward_layernorm_1(m)
                 + post_feedforward_layernorm_2(experts(pre_feedforward_layernorm_2(h), router(h)))
    h = (h + post_feedforward_layernorm(m)) * layer_scalar

Between the GEMMs a layer runs two fused steps (``ops.residual_norm``, one kernel each on CUDA): from the
attention output to the new residual and its feed-forward inputs (``pre_feedforward_layernorm``, and in MoE
layers ``pre_feedforward_layernorm_2`` and the router's norm), and from the feed-forward outputs to the scaled
residual and the next layer's ``input_layernorm`` of it (the final ``norm`` after the last layer). The
embedding's scale and the first ``input_layernorm`` are one more. In CUDA graphs at tensor parallel size 1 an MoE
layer's router and experts run on a second stream beside its dense MLP (``DFLASH_GEMMA4_MOE_STREAM``, default on).

Embeddings are scaled by sqrt(hidden_size) (rounded to the weights' dtype, as transformers does); the LM
head is the tied embedding; final logits are soft-capped by ``final_logit_softcapping``.

DFLASH / EAGLE-3 capture (:meth:`Gemma4ForCausalLM.set_eagle3_layers_to_capture`): the hidden state at the
input of layer ``i + 1`` (the output of layer ``i``, transformers' ``hidden_states[i + 1]``) for each
requested id ``i``, handed to SGLang's LogitsProcessor as ``aux_hidden_states``.

Checkpoint names: ``model.language_model.*`` (wrapper) or ``model.*`` (text-only), transformers' module
names; the vision / audio towers (``model.vision_tower``, ``model.embed_vision``, ``model.audio_tower``,
``model.embed_audio``) are skipped with one log line. Unknown or missing tensors raise, naming them.
"""

from __future__ import annotations

import logging
from typing import Iterable

import torch
from torch import nn

from sglang.srt.distributed import get_moe_tensor_parallel_world_size, get_tensor_model_parallel_world_size
from sglang.srt.layers.layernorm import RMSNorm
from sglang.srt.layers.logits_processor import LogitsProcessor
from sglang.srt.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from sglang.srt.model_executor.cuda_graph_runner import get_is_capture_mode
from sglang.srt.model_executor.forward_batch_info import ForwardBatch
from sglang.srt.model_loader.weight_utils import default_weight_loader
from sglang.srt.utils import add_prefix

from dflash_sglang import ops
from dflash_sglang.core.checkpoint import check_state_dict
from dflash_sglang.core.config import moe_stream_enabled
from dflash_sglang.serving.models.gemma4_config import Gemma4TextConfig, check_servable, text_config_of
from dflash_sglang.serving.models.gemma4_kv_pool import sliding_slots_translated_once
from dflash_sglang.serving.models.gemma4_layers import Gemma4Attention, Gemma4MLP, Gemma4MoE

logger = logging.getLogger(__name__)
SKIPPED_TOWERS = ("vision_tower.", "embed_vision.", "audio_tower.", "embed_audio.")
# checkpoint projection -> (our fused parameter, shard id)
STACKED = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
           "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}


class Gemma4DecoderLayer(nn.Module):
    def __init__(self, config: Gemma4TextConfig, layer_id: int, quant_config=None, prefix: str = "",
                 moe_stream: torch.cuda.Stream | None = None) -> None:
        super().__init__()
        self.moe_stream = moe_stream
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Gemma4Attention(config, layer_id, quant_config, prefix=add_prefix("self_attn", prefix))
        self.mlp = Gemma4MLP(hidden, config.intermediate_size, quant_config, prefix=add_prefix("mlp", prefix))
        for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            setattr(self, name, RMSNorm(hidden, eps=eps))
        self.layer_scalar = nn.Parameter(torch.ones(1), requires_grad=False)
        self.moe = Gemma4MoE(config, layer_id, quant_config, prefix=prefix) if config.enable_moe_block else None
        if self.moe is not None:
            self.post_feedforward_layernorm_1 = RMSNorm(hidden, eps=eps)
            self.post_feedforward_layernorm_2 = RMSNorm(hidden, eps=eps)
            self.pre_feedforward_layernorm_2 = RMSNorm(hidden, eps=eps)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, normed: torch.Tensor,
                forward_batch: ForwardBatch, next_norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """(the residual after this layer, it through ``next_norm``) from the residual and ``normed``, the residual
        through this layer's ``input_layernorm`` (which the previous fused step applied)."""
        eps = self.input_layernorm.variance_epsilon
        attn = self.self_attn(positions, normed, forward_batch)
        ff_norms = [self.pre_feedforward_layernorm.weight]
        if self.moe is not None:
            ff_norms += [self.pre_feedforward_layernorm_2.weight, self.moe.router.norm.weight]
        hidden, ff_inputs = ops.residual_norm(hidden, ff_norms, eps, branches=[attn],
                                              branch_weights=[self.post_attention_layernorm.weight])
        branches = self._feed_forward(ff_inputs)
        if self.moe is None:
            branch_weights, combine_weight = [self.post_feedforward_layernorm.weight], None
        else:
            branch_weights = [self.post_feedforward_layernorm_1.weight, self.post_feedforward_layernorm_2.weight]
            combine_weight = self.post_feedforward_layernorm.weight
        hidden, (normed,) = ops.residual_norm(hidden, [next_norm.weight], eps, branches=branches,
                                              branch_weights=branch_weights, combine_weight=combine_weight,
                                              scalar=self.layer_scalar)
        return hidden, normed

    def _feed_forward(self, ff_inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """The dense MLP's output, and in MoE layers the experts' (``ff_inputs``: mlp, experts, router). While a
        CUDA graph is captured with a ``moe_stream``, the router and experts run on it beside the dense MLP: at
        decode the router's chain (projection, top-k, the experts' alignment) is a few one-block kernels that leave
        the GPU idle, and the dense MLP's GEMMs fill it (SGLang runs DeepSeek's shared experts so). Not under
        dynamo (SGLang's piecewise CUDA graphs of prefill), which does not trace stream switches."""
        if self.moe is None:
            return [self.mlp(ff_inputs[0])]
        if self.moe_stream is None or not get_is_capture_mode() or torch.compiler.is_compiling():
            return [self.mlp(ff_inputs[0]), self.moe(ff_inputs[2], ff_inputs[1])]
        current = torch.cuda.current_stream()
        self.moe_stream.wait_stream(current)
        with torch.cuda.stream(self.moe_stream):
            experts = self.moe(ff_inputs[2], ff_inputs[1])
        mlp = self.mlp(ff_inputs[0])
        current.wait_stream(self.moe_stream)
        return [mlp, experts]


class Gemma4TextModel(nn.Module):
    def __init__(self, config: Gemma4TextConfig, quant_config=None, prefix: str = "") -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                   prefix=add_prefix("embed_tokens", prefix))
        moe_stream = None
        if config.enable_moe_block and moe_stream_enabled() and torch.cuda.is_available() \
                and get_tensor_model_parallel_world_size() == 1 and get_moe_tensor_parallel_world_size() == 1:
            moe_stream = torch.cuda.Stream()  # at TP > 1 both branches all-reduce: one stream keeps NCCL's order
        self.layers = nn.ModuleList(
            Gemma4DecoderLayer(config, i, quant_config, prefix=add_prefix(f"layers.{i}", prefix),
                               moe_stream=moe_stream)
            for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        # transformers multiplies by sqrt(hidden) cast to the weights' dtype (bf16: sqrt(2816) -> 53.0); a
        # 1-element tensor, as ops.residual_norm takes its scalar
        scale = float(torch.tensor(config.hidden_size ** 0.5, dtype=self.embed_tokens.weight.dtype))
        self.register_buffer("embed_scale", torch.tensor([scale]), persistent=False)
        self.layers_to_capture: list[int] = []

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, forward_batch: ForwardBatch,
                input_embeds: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        first_norm = [self.layers[0].input_layernorm.weight]
        eps = self.norm.variance_epsilon
        if input_embeds is None:
            hidden, (normed,) = ops.residual_norm(self.embed_tokens(input_ids), first_norm, eps,
                                                  scalar=self.embed_scale)
        else:
            hidden, (normed,) = ops.residual_norm(input_embeds, first_norm, eps)
        aux_hidden_states = []
        with sliding_slots_translated_once(forward_batch):
            for i, layer in enumerate(self.layers):
                if i in self.layers_to_capture:
                    aux_hidden_states.append(hidden)
                next_norm = self.layers[i + 1].input_layernorm if i + 1 < len(self.layers) else self.norm
                hidden, normed = layer(positions, hidden, normed, forward_batch, next_norm)
        return (normed, aux_hidden_states) if aux_hidden_states else normed


class _SoftcapLogitsProcessor(LogitsProcessor):
    """SGLang's LogitsProcessor; off CUDA the final soft-capping runs in PyTorch (SGLang's ``fused_softcap``
    is a Triton kernel), before logprobs are computed from the logits, as upstream."""

    def _get_logits(self, hidden_states, lm_head, logits_metadata, embedding_bias=None):
        cap = self.final_logit_softcapping
        if hidden_states.is_cuda or not cap:
            return super()._get_logits(hidden_states, lm_head, logits_metadata, embedding_bias)
        self.final_logit_softcapping = None
        try:
            logits = super()._get_logits(hidden_states, lm_head, logits_metadata, embedding_bias)
        finally:
            self.final_logit_softcapping = cap
        return torch.tanh(logits / cap) * cap


class Gemma4ForCausalLM(nn.Module):
    def __init__(self, config, quant_config=None, prefix: str = "") -> None:
        super().__init__()
        text = text_config_of(config)
        check_servable(text, get_tensor_model_parallel_world_size(), get_moe_tensor_parallel_world_size())
        self.config = text
        self.model = Gemma4TextModel(text, quant_config, prefix=add_prefix("model", prefix))
        if text.tie_word_embeddings:
            self.lm_head = self.model.embed_tokens
        else:
            self.lm_head = ParallelLMHead(text.vocab_size, text.hidden_size, quant_config=quant_config,
                                          prefix=add_prefix("lm_head", prefix))
        self.logits_processor = _SoftcapLogitsProcessor(text)
        self.capture_aux_hidden_states = False

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, forward_batch: ForwardBatch,
                input_embeds: torch.Tensor | None = None, get_embedding: bool = False, **_: object):
        if get_embedding:
            raise NotImplementedError("Gemma 4 is served as a generation model; embeddings are not supported")
        hidden = self.model(input_ids, positions, forward_batch, input_embeds)
        aux_hidden_states = None
        if self.capture_aux_hidden_states:
            hidden, aux_hidden_states = hidden
        return self.logits_processor(input_ids, hidden, self.lm_head, forward_batch, aux_hidden_states)

    # ----------------------------------------------------------------------------------------------
    # What SGLang and the DFLASH worker call
    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_embed_and_head(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The raw (unscaled) embedding table and the LM head weight; drafters scale as their config says."""
        return self.model.embed_tokens.weight, self.lm_head.weight

    def set_eagle3_layers_to_capture(self, layer_ids: list[int] | None = None) -> None:
        if layer_ids is None:
            num_layers = self.config.num_hidden_layers
            layer_ids = [1, num_layers // 2 - 1, num_layers - 4]  # SGLang's EAGLE-3 default, as in qwen3.py
        self.capture_aux_hidden_states = True
        self.model.layers_to_capture = [i + 1 for i in layer_ids]

    def get_attention_sliding_window_size(self) -> int | None:
        """SGLang's window (keys before the query) for the backends that honour per-layer windows."""
        has_sliding = any(t == "sliding_attention" for t in self.config.layer_types)
        return self.config.sliding_window - 1 if has_sliding else None

    # ----------------------------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.named_parameters())
        expected = {name: tuple(p.shape) for name, p in params.items()
                    if not (self.config.tie_word_embeddings and name.startswith("lm_head."))}
        loaded: dict[str, tuple[int, ...]] = {}
        skipped = 0
        for raw_name, tensor in weights:
            name = _canonical(raw_name)
            if name is None:
                skipped += 1
                continue
            if name.startswith("lm_head.") and self.config.tie_word_embeddings:
                continue  # some exports write the tied head out
            for target, tensor_part, shard in self._targets(name, tensor):
                if target not in params:
                    loaded[name] = tuple(tensor.shape)  # reported as unexpected below
                    continue
                param = params[target]
                loader = getattr(param, "weight_loader", default_weight_loader)
                if shard is None:
                    loader(param, tensor_part)
                elif isinstance(shard, tuple):  # FusedMoE: (shard id, expert id)
                    loader(param, tensor_part, target, shard_id=shard[0], expert_id=shard[1])
                else:
                    loader(param, tensor_part, shard)
                loaded[target] = expected.get(target, ())
        if skipped:
            logger.info("Gemma 4: serving text only; skipped %d vision/audio tower tensors", skipped)
        check_state_dict(loaded, expected, "Gemma 4 checkpoint",
                         hint="is it a Gemma 4 text checkpoint (google/gemma-4-*) for this config?")
        for module in self.modules():
            if isinstance(module, Gemma4MoE):
                module.fold_per_expert_scale()

    def _targets(self, name: str, tensor: torch.Tensor):
        """(our parameter, tensor, shard) for one checkpoint tensor; fused projections and stacked experts
        map to several shards of one parameter."""
        parts = name.split(".")
        if len(parts) >= 4 and parts[3] == "experts":  # model.layers.N.experts.{gate_up_proj,down_proj}
            prefix = ".".join(parts[:3]) + ".moe.experts."
            if parts[4] == "gate_up_proj":
                gate, up = tensor.chunk(2, dim=1)
                return [(prefix + "w13_weight", gate[e], ("w1", e)) for e in range(tensor.shape[0])] + \
                       [(prefix + "w13_weight", up[e], ("w3", e)) for e in range(tensor.shape[0])]
            return [(prefix + "w2_weight", tensor[e], ("w2", e)) for e in range(tensor.shape[0])]
        if len(parts) >= 4 and parts[3] == "router":
            return [(".".join(parts[:3]) + ".moe." + ".".join(parts[3:]), tensor, None)]
        if len(parts) >= 5 and parts[4] in STACKED and parts[3] in ("self_attn", "mlp"):
            fused, shard = STACKED[parts[4]]
            if parts[4] == "v_proj" and self.config.layer_attention(int(parts[2])).k_eq_v:
                return [(name, tensor, None)]  # no v_proj in attention_k_eq_v layers: unexpected
            return [(".".join(parts[:4] + [fused] + parts[5:]), tensor, shard)]
        return [(name, tensor, None)]


class Gemma4ForConditionalGeneration(Gemma4ForCausalLM):
    """The released "it" checkpoints' architecture, served text-only (see the module docstring)."""


def _canonical(name: str) -> str | None:
    """Checkpoint name -> our name (``model.layers...``), or None for a skipped vision/audio tensor."""
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    if name.startswith("model.") and name[len("model."):].startswith(SKIPPED_TOWERS):
        return None
    return name


EntryClass = [Gemma4ForCausalLM, Gemma4ForConditionalGeneration]
