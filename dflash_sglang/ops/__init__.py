# SPDX-License-Identifier: Apache-2.0
"""Public DFlash ops: argument checks, then the CUDA kernel or the PyTorch reference.

Dispatch is explicit: CUDA tensors go to ``torch.ops.dflash.<op>`` when the extension loads (see
``DFLASH_KERNELS`` in ``config.py``); CPU tensors, or CUDA with ``DFLASH_KERNELS=off``, use
``ops.reference``. With ``DFLASH_KERNELS=auto`` a CUDA run without the extension says so once in the log.
The Triton ops (``argmax``, ``block_inputs``, ``advance_state``, ``paged_kv_indices``, ``residual_norm``,
``qkv_norm_rope``, ``narrow_linear``, ``decode_mlp``; ``ops/argmax_kernel.py``, ``ops/step_state.py``,
``ops/paged_kv.py``, ``ops/residual_norm_kernel.py``, ``ops/qkv_norm_rope_kernel.py``, ``ops/narrow_linear_kernel.py``,
``ops/decode_mlp_kernel.py``) need no build:
they run on every CUDA tensor unless ``DFLASH_KERNELS=off``.
"""

from __future__ import annotations

import functools
import logging

import torch

from dflash_sglang.core.config import kernel_mode
from dflash_sglang.ops import reference
from dflash_sglang.ops._load import ExtensionUnavailable, load_ext

logger = logging.getLogger(__name__)

__all__ = ["inject_kv", "verify_block", "argmax", "block_inputs", "advance_state", "paged_kv_indices",
           "residual_norm", "qkv_norm_rope", "narrow_linear", "narrow_linear_serves", "decode_mlp",
           "decode_mlp_serves", "kernels_available", "use_kernels_for"]


@functools.cache
def kernels_available() -> bool:
    """Whether ``torch.ops.dflash`` is usable here (loads the extension on first call)."""
    mode = kernel_mode()
    if mode == "off":
        return False
    try:
        load_ext()
        _register_fakes()
        return True
    except ExtensionUnavailable as error:
        if mode == "on":
            raise
        logger.warning("DFlash CUDA kernels unavailable, using the PyTorch path: %s", error)
        return False


@functools.cache
def _register_fakes() -> None:
    """Fake (meta) kernels of ``torch.ops.dflash.*`` for torch.compile / FakeTensor; once the ops exist.

    registration.cpp names this module in ``m.set_python_module``, so they must be registered from here.
    """

    @torch.library.register_fake("dflash::inject_kv")
    def _inject_kv_fake(kv, positions, slots, k_norm_weight, cos_sin_cache, k_cache, v_cache, eps) -> None:
        return None

    @torch.library.register_fake("dflash::verify_block")
    def _verify_block_fake(block_tokens, target_ids, target_probs, draft_probs, uniforms, block_slots, prefix_lens,
                           stop_ids, budgets):
        bs, block_size = block_tokens.shape
        device = block_tokens.device
        return (torch.empty(bs, dtype=torch.int32, device=device),
                torch.empty(bs, dtype=torch.int32, device=device),
                torch.empty(bs, block_size, dtype=torch.int64, device=device),
                torch.empty(bs, block_size, dtype=torch.int64, device=device),
                torch.empty(bs, block_size, dtype=torch.int64, device=device),
                torch.empty(bs, dtype=torch.int64, device=device),
                torch.empty(bs, dtype=torch.bool, device=device))


def _ops_registered() -> bool:
    return hasattr(torch.ops.dflash, "inject_kv") and hasattr(torch.ops.dflash, "verify_block")


# The extension may have been loaded before this module was imported (torch imports it through
# set_python_module when it first needs a fake kernel).
if _ops_registered():
    _register_fakes()


def use_kernels_for(tensor: torch.Tensor) -> bool:
    return tensor.is_cuda and kernels_available()


def use_triton_for(tensor: torch.Tensor) -> bool:
    return tensor.is_cuda and kernel_mode() != "off"


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _check_tensor(name: str, tensor: torch.Tensor, ndim: int, dtypes: tuple[torch.dtype, ...],
                  device: torch.device) -> None:
    _check(isinstance(tensor, torch.Tensor), f"{name} must be a tensor, got {type(tensor).__name__}")
    _check(tensor.dim() == ndim, f"{name} must have {ndim} dims, got shape {tuple(tensor.shape)}")
    _check(tensor.dtype in dtypes, f"{name} must be one of {dtypes}, got {tensor.dtype}")
    _check(tensor.device == device, f"{name} is on {tensor.device} but the other inputs are on {device}")


INJECT_KV_KERNEL_HEAD_DIMS = (64, 128, 256)


def _kernel_covers_head_dim(head_dim: int) -> bool:
    if head_dim in INJECT_KV_KERNEL_HEAD_DIMS:
        return True
    _log_once(f"inject_kv: no fused kernel for head_dim {head_dim} (kernels cover {INJECT_KV_KERNEL_HEAD_DIMS}); "
              "using the PyTorch path")
    return False


@functools.cache
def _log_once(message: str) -> None:
    logger.warning(message)


def inject_kv(kv: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, k_norm_weight: torch.Tensor,
              cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, eps: float) -> None:
    """K-norm + RoPE + cast + scatter of the context K/V of N tokens into every drafter layer's cache.

    Shapes as in :func:`dflash_sglang.ops.reference.inject_kv_ref`: kv [N, L, 2, H, D]; positions, slots
    [N] int64; k_norm_weight [L, D]; cos_sin_cache [P, D] fp32; k_cache, v_cache [L, S, H, D] (mutated).
    """
    device = kv.device
    floats = (torch.bfloat16, torch.float16, torch.float32)
    _check_tensor("kv", kv, 5, floats, device)
    num_tokens, num_layers, two, num_heads, head_dim = kv.shape
    _check(two == 2, f"kv must be [N, L, 2, H, D] (K then V), got shape {tuple(kv.shape)}")
    _check_tensor("positions", positions, 1, (torch.int64,), device)
    _check_tensor("slots", slots, 1, (torch.int64,), device)
    _check(positions.shape[0] == num_tokens and slots.shape[0] == num_tokens,
           f"positions {tuple(positions.shape)} and slots {tuple(slots.shape)} must have N={num_tokens} entries")
    _check_tensor("k_norm_weight", k_norm_weight, 2, floats, device)
    _check(tuple(k_norm_weight.shape) == (num_layers, head_dim),
           f"k_norm_weight must be [L={num_layers}, D={head_dim}], got {tuple(k_norm_weight.shape)}")
    _check_tensor("cos_sin_cache", cos_sin_cache, 2, (torch.float32,), device)
    _check(cos_sin_cache.shape[1] == head_dim,
           f"cos_sin_cache must be [max_position, D={head_dim}], got {tuple(cos_sin_cache.shape)}")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        _check_tensor(name, cache, 4, (torch.bfloat16, torch.float16, torch.float32), device)
        _check(cache.shape[0] == num_layers and tuple(cache.shape[2:]) == (num_heads, head_dim),
               f"{name} must be [L={num_layers}, slots, H={num_heads}, D={head_dim}], got {tuple(cache.shape)}")
    _check(k_cache.dtype == v_cache.dtype, f"k_cache ({k_cache.dtype}) and v_cache ({v_cache.dtype}) differ")
    if num_tokens == 0:
        return
    if use_kernels_for(kv) and _kernel_covers_head_dim(head_dim):
        torch.ops.dflash.inject_kv(kv.contiguous(), positions.contiguous(), slots.contiguous(),
                                   k_norm_weight.contiguous(), cos_sin_cache.contiguous(), k_cache, v_cache,
                                   float(eps))
    else:
        reference.inject_kv_ref(kv, positions, slots, k_norm_weight, cos_sin_cache, k_cache, v_cache, eps)


def verify_block(block_tokens: torch.Tensor, block_slots: torch.Tensor, prefix_lens: torch.Tensor,
                 stop_ids: torch.Tensor, budgets: torch.Tensor, *, target_ids: torch.Tensor | None = None,
                 target_probs: torch.Tensor | None = None, draft_probs: torch.Tensor | None = None,
                 uniforms: torch.Tensor | None = None):
    """Tree-free verification of one block per request; greedy when ``target_ids`` is given, else
    rejection sampling from ``target_probs``/``draft_probs`` with ``uniforms``.

    See :func:`dflash_sglang.ops.reference.verify_block_ref` for shapes and the returned tuple.
    """
    device = block_tokens.device
    _check_tensor("block_tokens", block_tokens, 2, (torch.int64,), device)
    bs, block_size = block_tokens.shape
    _check(2 <= block_size <= 32, f"block size must be in [2, 32], got {block_size}")
    _check_tensor("block_slots", block_slots, 2, (torch.int64,), device)
    _check(tuple(block_slots.shape) == (bs, block_size),
           f"block_slots must be [bs={bs}, B={block_size}], got {tuple(block_slots.shape)}")
    _check_tensor("prefix_lens", prefix_lens, 1, (torch.int64,), device)
    _check_tensor("budgets", budgets, 1, (torch.int64,), device)
    _check(prefix_lens.shape[0] == bs and budgets.shape[0] == bs,
           f"prefix_lens {tuple(prefix_lens.shape)} and budgets {tuple(budgets.shape)} must have bs={bs} entries")
    _check_tensor("stop_ids", stop_ids, 2, (torch.int64,), device)
    _check(stop_ids.shape[0] == bs, f"stop_ids must be [bs={bs}, S], got {tuple(stop_ids.shape)}")
    greedy = target_ids is not None
    if greedy:
        _check(target_probs is None and draft_probs is None and uniforms is None,
               "give either target_ids (greedy) or target_probs + draft_probs + uniforms (sampling), not both")
        _check_tensor("target_ids", target_ids, 2, (torch.int64,), device)
        _check(tuple(target_ids.shape) == (bs, block_size),
               f"target_ids must be [bs={bs}, B={block_size}], got {tuple(target_ids.shape)}")
    else:
        _check(target_probs is not None and draft_probs is not None and uniforms is not None,
               "sampling verification needs target_probs, draft_probs and uniforms (or pass target_ids)")
        _check_tensor("target_probs", target_probs, 3, (torch.float32,), device)
        vocab = target_probs.shape[2]
        _check(tuple(target_probs.shape) == (bs, block_size, vocab),
               f"target_probs must be [bs={bs}, B={block_size}, V], got {tuple(target_probs.shape)}")
        _check_tensor("draft_probs", draft_probs, 3, (torch.float32,), device)
        _check(tuple(draft_probs.shape) == (bs, block_size - 1, vocab),
               f"draft_probs must be [bs={bs}, B-1={block_size - 1}, V={vocab}], got {tuple(draft_probs.shape)}")
        _check_tensor("uniforms", uniforms, 2, (torch.float32,), device)
        _check(tuple(uniforms.shape) == (bs, block_size),
               f"uniforms must be [bs={bs}, B={block_size}], got {tuple(uniforms.shape)}")
    if use_kernels_for(block_tokens):
        empty = block_tokens.new_empty(0)
        return torch.ops.dflash.verify_block(
            block_tokens.contiguous(), target_ids.contiguous() if greedy else empty,
            empty.float() if greedy else target_probs.contiguous(),
            empty.float() if greedy else draft_probs.contiguous(),
            empty.float() if greedy else uniforms.contiguous(),
            block_slots.contiguous(), prefix_lens.contiguous(), stop_ids.contiguous(), budgets.contiguous())
    return reference.verify_block_ref(block_tokens, target_ids, target_probs, draft_probs, uniforms, block_slots,
                                      prefix_lens, stop_ids, budgets)


def argmax(logits: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Each row's greedy choice (first index of the maximum): ``logits`` [R, V] or [G, C, V] -> int64 [R] or
    [G, C], into ``out`` (any strides) when given. See :func:`dflash_sglang.ops.reference.argmax_ref`."""
    if use_triton_for(logits):
        from dflash_sglang.ops import argmax_kernel

        return argmax_kernel.argmax(logits, out)
    return reference.argmax_ref(logits, out)


def block_inputs(verified_id: torch.Tensor, seq_lens: torch.Tensor, req_pool_indices: torch.Tensor,
                 req_to_token: torch.Tensor, budget_table: torch.Tensor, mask_token_id: int, block_size: int):
    """A decode step's inputs from the overlap loop's device state; see
    :func:`dflash_sglang.ops.reference.block_inputs_ref` for shapes and the returned tuple."""
    device = seq_lens.device
    _check_tensor("verified_id", verified_id, 1, (torch.int64,), device)
    _check_tensor("seq_lens", seq_lens, 1, (torch.int32, torch.int64), device)
    _check_tensor("req_pool_indices", req_pool_indices, 1, (torch.int32, torch.int64), device)
    _check_tensor("req_to_token", req_to_token, 2, (torch.int32, torch.int64), device)
    _check_tensor("budget_table", budget_table, 1, (torch.int64,), device)
    bs = seq_lens.shape[0]
    _check(req_to_token.stride(1) == 1, "req_to_token needs unit stride in its last dim")
    _check(verified_id.shape[0] == bs and req_pool_indices.shape[0] == bs,
           f"verified_id {tuple(verified_id.shape)} and req_pool_indices {tuple(req_pool_indices.shape)} "
           f"must have bs={bs} entries")
    if use_triton_for(seq_lens):
        from dflash_sglang.ops import step_state

        return step_state.block_inputs(verified_id.contiguous(), seq_lens.contiguous(), req_pool_indices.contiguous(),
                                       req_to_token, budget_table, mask_token_id, block_size)
    return reference.block_inputs_ref(verified_id, seq_lens, req_pool_indices, req_to_token, budget_table,
                                      mask_token_id, block_size)


def advance_state(verified_id: torch.Tensor, prefix_lens: torch.Tensor, budgets: torch.Tensor,
                  num_emitted: torch.Tensor, emitted: torch.Tensor, req_pool_indices: torch.Tensor,
                  budget_table: torch.Tensor, seq_lens_dtype: torch.dtype):
    """The overlap loop's device state after a verdict; see
    :func:`dflash_sglang.ops.reference.advance_state_ref` (``budget_table`` is mutated)."""
    device = prefix_lens.device
    for name, tensor in (("verified_id", verified_id), ("prefix_lens", prefix_lens), ("budgets", budgets),
                         ("budget_table", budget_table)):
        _check_tensor(name, tensor, 1, (torch.int64,), device)
    _check_tensor("num_emitted", num_emitted, 1, (torch.int32, torch.int64), device)
    _check_tensor("emitted", emitted, 2, (torch.int64,), device)
    _check_tensor("req_pool_indices", req_pool_indices, 1, (torch.int32, torch.int64), device)
    bs = prefix_lens.shape[0]
    _check(all(t.shape[0] == bs for t in (verified_id, budgets, num_emitted, emitted, req_pool_indices)),
           f"every per-request input must have bs={bs} rows")
    _check(emitted.stride(1) == 1, "emitted needs unit stride in its last dim")
    if use_triton_for(prefix_lens):
        from dflash_sglang.ops import step_state

        return step_state.advance_state(verified_id.contiguous(), prefix_lens.contiguous(), budgets.contiguous(),
                                        num_emitted.contiguous(), emitted, req_pool_indices.contiguous(),
                                        budget_table, seq_lens_dtype)
    return reference.advance_state_ref(verified_id, prefix_lens, budgets, num_emitted, emitted, req_pool_indices,
                                       budget_table, seq_lens_dtype)


def paged_kv_indices(req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor,
                     kv_indptr: torch.Tensor, kv_indices: torch.Tensor) -> None:
    """A batch's paged prefix listing, into ``kv_indptr`` [bs + 1] and ``kv_indices``; see
    :func:`dflash_sglang.ops.reference.paged_kv_indices_ref`."""
    device = seq_lens.device
    _check_tensor("req_to_token", req_to_token, 2, (torch.int32, torch.int64), device)
    _check(req_to_token.stride(1) == 1, "req_to_token needs unit stride in its last dim")
    _check_tensor("req_pool_indices", req_pool_indices, 1, (torch.int32, torch.int64), device)
    _check_tensor("seq_lens", seq_lens, 1, (torch.int32, torch.int64), device)
    _check_tensor("kv_indptr", kv_indptr, 1, (torch.int32, torch.int64), device)
    _check_tensor("kv_indices", kv_indices, 1, (torch.int32, torch.int64), device)
    _check(kv_indptr.stride(0) == 1 and kv_indices.stride(0) == 1, "kv_indptr and kv_indices must be contiguous")
    bs = seq_lens.shape[0]
    _check(req_pool_indices.shape[0] == bs and kv_indptr.shape[0] == bs + 1,
           f"req_pool_indices {tuple(req_pool_indices.shape)} must have bs={bs} entries and kv_indptr "
           f"{tuple(kv_indptr.shape)} bs + 1")
    if use_triton_for(seq_lens):
        from dflash_sglang.ops import paged_kv

        paged_kv.paged_kv_indices(req_to_token, req_pool_indices.contiguous(), seq_lens.contiguous(), kv_indptr,
                                  kv_indices)
    else:
        reference.paged_kv_indices_ref(req_to_token, req_pool_indices, seq_lens, kv_indptr, kv_indices)


FLOATS = (torch.bfloat16, torch.float16, torch.float32)


def residual_norm(residual: torch.Tensor, out_weights: list[torch.Tensor], eps: float, *,
                  branches: list[torch.Tensor] = (), branch_weights: list[torch.Tensor] = (),
                  combine_weight: torch.Tensor | None = None,
                  scalar: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A residual add between RMSNorms: the new residual and its normalizations, as fresh tensors; see
    :func:`dflash_sglang.ops.reference.residual_norm_ref`."""
    device = residual.device
    _check_tensor("residual", residual, 2, FLOATS, device)
    tokens, hidden = residual.shape
    _check(residual.stride(1) == 1, "residual needs unit stride in its last dim")
    _check(len(branches) == len(branch_weights) and len(branches) <= 2,
           f"give one weight per branch, at most two branches (got {len(branches)} and {len(branch_weights)})")
    _check(len(out_weights) <= 3, f"at most three out weights, got {len(out_weights)}")
    _check(combine_weight is None or len(branches) > 0, "combine_weight normalizes the branches' sum: give a branch")
    for i, branch in enumerate(branches):
        _check_tensor(f"branches[{i}]", branch, 2, (residual.dtype,), device)
        _check(tuple(branch.shape) == (tokens, hidden) and branch.stride(1) == 1,
               f"branches[{i}] must be [{tokens}, {hidden}] with unit stride in its last dim, got "
               f"{tuple(branch.shape)} strides {branch.stride()}")
    weights = [("out_weights", w) for w in out_weights] + [("branch_weights", w) for w in branch_weights] + (
        [("combine_weight", combine_weight)] if combine_weight is not None else [])
    for name, weight in weights:
        _check_tensor(name, weight, 1, FLOATS, device)
        _check(weight.shape[0] == hidden and weight.stride(0) == 1,
               f"{name} must be contiguous [{hidden}], got {tuple(weight.shape)}")
    _check(scalar is None or (isinstance(scalar, torch.Tensor) and scalar.numel() == 1 and scalar.device == device),
           f"scalar must be a 1-element tensor on {device}")
    if use_triton_for(residual):
        from dflash_sglang.ops import residual_norm_kernel as kernel

        return kernel.residual_norm(residual, list(out_weights), float(eps), list(branches), list(branch_weights),
                                    combine_weight, scalar)
    return reference.residual_norm_ref(residual, list(out_weights), eps, list(branches), list(branch_weights),
                                       combine_weight, scalar)


def qkv_norm_rope(qkv: torch.Tensor, positions: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                  cos_sin_cache: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int, k_eq_v: bool,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v from a fused QKV projection: per-head RMSNorm (v without a weight), RoPE on q and k; see
    :func:`dflash_sglang.ops.reference.qkv_norm_rope_ref`."""
    device = qkv.device
    _check_tensor("qkv", qkv, 2, FLOATS, device)
    width = (num_heads + num_kv_heads * (1 if k_eq_v else 2)) * head_dim
    _check(qkv.shape[1] == width and qkv.stride(1) == 1,
           f"qkv must be [T, {width}] (heads {num_heads} + {num_kv_heads} KV x {head_dim}, k_eq_v={k_eq_v}) with "
           f"unit stride in its last dim, got {tuple(qkv.shape)}")
    _check(head_dim % 2 == 0, f"head_dim must be even for RoPE, got {head_dim}")
    _check_tensor("positions", positions, 1, (torch.int32, torch.int64), device)
    _check(positions.shape[0] == qkv.shape[0], f"positions must have T={qkv.shape[0]} entries")
    for name, weight in (("q_weight", q_weight), ("k_weight", k_weight)):
        _check_tensor(name, weight, 1, FLOATS, device)
        _check(weight.shape[0] == head_dim and weight.stride(0) == 1, f"{name} must be contiguous [{head_dim}]")
    _check_tensor("cos_sin_cache", cos_sin_cache, 2, FLOATS, device)
    _check(cos_sin_cache.shape[1] == head_dim and cos_sin_cache.is_contiguous(),
           f"cos_sin_cache must be contiguous [max_position, {head_dim}], got {tuple(cos_sin_cache.shape)}")
    if use_triton_for(qkv):
        from dflash_sglang.ops import qkv_norm_rope_kernel as kernel

        return kernel.qkv_norm_rope(qkv, positions.contiguous(), q_weight, k_weight, cos_sin_cache, num_heads,
                                    num_kv_heads, head_dim, k_eq_v, float(eps))
    return reference.qkv_norm_rope_ref(qkv, positions, q_weight, k_weight, cos_sin_cache, num_heads, num_kv_heads,
                                       head_dim, k_eq_v, eps)


def narrow_linear_serves(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`narrow_linear` runs its kernel for these inputs (CUDA, at most ``MAX_TOKENS`` rows, a weight
    of unit stride in its last dim), where a caller would otherwise run its linear layer."""
    from dflash_sglang.ops.narrow_linear_kernel import MAX_TOKENS

    return (use_triton_for(x) and x.dim() == 2 and 0 < x.shape[0] <= MAX_TOKENS and x.stride(1) == 1
            and weight.dim() == 2 and weight.stride(1) == 1)


def narrow_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x`` [tokens, in] times ``weight`` [out, in] transposed, in x's dtype (fp32 accumulation); see
    :func:`dflash_sglang.ops.reference.narrow_linear_ref`. The kernel serves up to ``MAX_TOKENS`` rows
    (:func:`narrow_linear_serves`); other inputs take the reference."""
    device = x.device
    _check_tensor("x", x, 2, FLOATS, device)
    _check_tensor("weight", weight, 2, (x.dtype,), device)
    _check(weight.shape[1] == x.shape[1], f"weight must be [out, {x.shape[1]}], got {tuple(weight.shape)}")
    if narrow_linear_serves(x, weight):
        from dflash_sglang.ops import narrow_linear_kernel as kernel

        return kernel.narrow_linear(x, weight)
    return reference.narrow_linear_ref(x, weight)


def decode_mlp_serves(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> bool:
    """Whether :func:`decode_mlp` runs its kernels for these inputs (CUDA, at most ``MAX_TOKENS`` rows, weights of
    unit stride in their last dim), where a caller would otherwise run its GEMMs or fused MoE."""
    from dflash_sglang.ops.decode_mlp_kernel import MAX_TOKENS

    return (use_triton_for(x) and x.dim() == 2 and 0 < x.shape[0] <= MAX_TOKENS and x.stride(1) == 1
            and w13.dim() == 3 and w13.stride(2) == 1 and w2.dim() == 3 and w2.stride(2) == 1)


def decode_mlp(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, router_logits: torch.Tensor | None = None,
               top_k: int = 1, tanh_gelu: bool = True) -> torch.Tensor:
    """A GELU-gated MLP for a few tokens: dense (one expert, no logits) or the ``top_k`` experts of each token's
    ``router_logits``, weighted by their renormalized softmax; see :func:`dflash_sglang.ops.reference.decode_mlp_ref`.
    The kernels serve what :func:`decode_mlp_serves` accepts; other inputs take the reference."""
    device = x.device
    _check_tensor("x", x, 2, FLOATS, device)
    _check_tensor("w13", w13, 3, (x.dtype,), device)
    _check_tensor("w2", w2, 3, (x.dtype,), device)
    experts, hidden = w13.shape[0], x.shape[1]
    _check(w13.shape[1] % 2 == 0 and w13.shape[2] == hidden,
           f"w13 must be [experts, 2 * inter, {hidden}] (gate rows, then up rows), got {tuple(w13.shape)}")
    inter = w13.shape[1] // 2
    _check(tuple(w2.shape) == (experts, hidden, inter), f"w2 must be [{experts}, {hidden}, {inter}] for w13 "
           f"{tuple(w13.shape)}, got {tuple(w2.shape)}")
    if router_logits is None:
        _check(experts == 1 and top_k == 1, f"a dense MLP is one expert with top_k 1 (got {experts} experts, "
               f"top_k {top_k}); routed experts need router_logits")
    else:
        _check_tensor("router_logits", router_logits, 2, FLOATS, device)
        _check(tuple(router_logits.shape) == (x.shape[0], experts) and router_logits.stride(1) == 1,
               f"router_logits must be [{x.shape[0]}, {experts}] with unit stride in its last dim, got "
               f"{tuple(router_logits.shape)}")
        _check(1 <= top_k <= experts, f"top_k must be in 1..{experts}, got {top_k}")
    if decode_mlp_serves(x, w13, w2):
        from dflash_sglang.ops import decode_mlp_kernel as kernel

        return kernel.decode_mlp(x, w13, w2, router_logits, top_k, tanh_gelu)
    return reference.decode_mlp_ref(x, w13, w2, router_logits, top_k, tanh_gelu)
