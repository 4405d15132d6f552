# SPDX-License-Identifier: Apache-2.0
"""Pure-PyTorch reference of every DFlash op: the specification, the test oracle and the CPU path.

Each ``<op>_ref`` has the same signature and semantics as the CUDA op ``torch.ops.dflash.<op>`` and is
written for clarity, with fp32 arithmetic.

* :func:`inject_kv_ref` -- the epilogue of the KV injection: given the projected context K/V of ``N``
  tokens for all drafter layers (one batched GEMM's output), apply the per-head K RMSNorm and RoPE and
  scatter K and V into the drafter's KV cache at the tokens' slots, in the cache's dtype.
* :func:`verify_block_ref` -- tree-free block verification for a batch: accepted length, committed
  tokens (accepted drafts + bonus, cut at stop tokens / the token budget), KV slots to keep and to free,
  and new sequence lengths; greedy or speculative rejection sampling with caller-given uniforms.
* :func:`block_attention_ref` -- the attention of blocks of query tokens over a paged prefix and the block
  itself (causal or not): the Triton kernel of ``ops/block_attention.py``.
* :func:`argmax_ref` -- the greedy choice of each row of logits (first index of the maximum, as
  ``torch.argmax``): the Triton kernel of ``ops/argmax_kernel.py``.
* :func:`paged_kv_indices_ref` -- a batch's paged prefix listing (``kv_indptr``, ``kv_indices``) as the
  attention kernels read it: the Triton kernel of ``ops/paged_kv.py``.
* :func:`residual_norm_ref` -- a chain of RMSNorms around one residual add (Gemma 4's sandwich norms: the
  branch outputs normalized, summed, added to the residual, scaled, and the new residual normalized for each
  consumer): the Triton kernel of ``ops/residual_norm_kernel.py``.
* :func:`qkv_norm_rope_ref` -- per-head RMSNorm of q, k and v from a fused QKV projection, then RoPE on q and
  k: the Triton kernel of ``ops/qkv_norm_rope_kernel.py``.
* :func:`narrow_linear_ref` -- ``x @ weight.T`` with fp32 accumulation, rounded to x's dtype (a mixture-of-experts
  router at decode): the Triton kernel of ``ops/narrow_linear_kernel.py``.
* :func:`decode_mlp_ref` -- a GELU-gated MLP for a few tokens, dense or as routed experts (softmax top-k of the
  router's logits, renormalized): the Triton kernels of ``ops/decode_mlp_kernel.py``.
* :func:`block_inputs_ref` and :func:`advance_state_ref` -- the overlap loop's per-step bookkeeping on the
  device (the inputs of a step from the state the previous step left; that state advanced by the verdict):
  the Triton kernels of ``ops/step_state.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def inject_kv_ref(kv: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, k_norm_weight: torch.Tensor,
                  cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, eps: float) -> None:
    """Writes the drafter context K/V of ``N`` tokens into every layer's cache.

    Args:
        kv: [N, L, 2, num_kv_heads, head_dim] bf16/fp16/fp32; ``kv[:, l, 0]`` is layer l's k_proj output
            and ``kv[:, l, 1]`` its v_proj output for the tokens' projected context features.
        positions: [N] int64 absolute positions (RoPE).
        slots: [N] int64 cache slots; a negative slot marks padding and writes nothing.
        k_norm_weight: [L, head_dim] the layers' per-head K RMSNorm weights.
        cos_sin_cache: [max_position, head_dim] fp32; row p is cat(cos(p * inv_freq), sin(p * inv_freq))
            (NeoX / rotate-half RoPE over the whole head).
        k_cache, v_cache: [L, num_slots, num_kv_heads, head_dim], mutated in place; cast to their dtype.
        eps: RMSNorm epsilon.
    """
    valid = slots >= 0
    kv, positions, slots = kv[valid], positions[valid], slots[valid]
    k = kv[:, :, 0].float()  # [n, L, H, D]
    v = kv[:, :, 1]
    k = k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + eps)
    # RMSNorm's reference casts back to the input dtype before the weight multiply; keep that rounding.
    k = k.to(kv.dtype).float() * k_norm_weight.float()[None, :, None, :]
    k = k.to(kv.dtype).float()
    half = k.shape[-1] // 2
    cos_sin = cos_sin_cache[positions].float()  # [n, D]
    cos = torch.cat([cos_sin[:, :half], cos_sin[:, :half]], dim=-1)[:, None, None, :]
    sin = torch.cat([cos_sin[:, half:], cos_sin[:, half:]], dim=-1)[:, None, None, :]
    rotated = torch.cat([-k[..., half:], k[..., :half]], dim=-1)
    k = k * cos + rotated * sin
    k_cache[:, slots] = k.transpose(0, 1).to(k_cache.dtype)
    v_cache[:, slots] = v.transpose(0, 1).to(v_cache.dtype)


def verify_block_ref(
    block_tokens: torch.Tensor,
    target_ids: torch.Tensor | None,
    target_probs: torch.Tensor | None,
    draft_probs: torch.Tensor | None,
    uniforms: torch.Tensor | None,
    block_slots: torch.Tensor,
    prefix_lens: torch.Tensor,
    stop_ids: torch.Tensor,
    budgets: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Verifies one drafted block per request against the target's verify pass.

    The block of request i is ``block_tokens[i] = [t0, d1, ..., d_{B-1}]``: ``t0`` is the last verified
    token (already emitted) and ``d1..`` are the drafts; the target's verify pass ran over the block at
    positions ``prefix_lens[i] + j`` and wrote its KV to ``block_slots[i, j]``.

    Greedy mode (``target_ids`` given, the target's argmax at each block position): accept the longest
    prefix with ``d_{j+1} == target_ids[j]``; the bonus is ``target_ids[a]``.
    Sampling mode (``target_probs``/``draft_probs``/``uniforms`` given): accept ``d_{j+1}`` while
    ``uniforms[i, j] * q(d) < p(d)`` (i.e. with probability min(1, p/q)); at the first rejection the bonus
    is drawn from normalize(max(0, p_j - q_j)) by inverse CDF with ``uniforms[i, B-1]``; after a full accept
    it is drawn from ``p_{B-1}`` the same way.

    The emitted tokens ``[d1..da, bonus]`` are then cut after the first stop token and to ``budgets[i]``
    tokens (a budget of 0 emits nothing).

    Args:
        block_tokens: [bs, B] int64.
        target_ids: [bs, B] int64 or None.
        target_probs: [bs, B, V] fp32 or None (the target's processed distribution at each position).
        draft_probs: [bs, B-1, V] fp32 or None (the drafter's distribution q that proposed d1..).
        uniforms: [bs, B] fp32 in [0, 1) or None.
        block_slots: [bs, B] int64 KV slots of the block positions.
        prefix_lens: [bs] int64, tokens with committed KV before the block (``t0``'s position).
        stop_ids: [bs, S] int64 stop token ids, padded with -1.
        budgets: [bs] int64, how many more tokens each request may emit.
    Returns:
        (num_accepted [bs] int32: drafts accepted before any cut,
         num_emitted [bs] int32: tokens emitted this step, in [0, B],
         emitted [bs, B] int64: the emitted tokens, -1 padded,
         keep_slots [bs, B] int64: block slots whose KV stays (t0 and the emitted drafts), -1 elsewhere,
         free_slots [bs, B] int64: block slots to free, -1 elsewhere,
         new_prefix_lens [bs] int64: prefix_lens + number of kept slots (max(num_emitted, 1)),
         finished [bs] bool: a stop token was emitted or the budget is used up.)
    """
    bs, block_size = block_tokens.shape
    device = block_tokens.device
    greedy = target_ids is not None
    num_accepted = torch.zeros(bs, dtype=torch.int32, device=device)
    num_emitted = torch.zeros(bs, dtype=torch.int32, device=device)
    emitted = torch.full((bs, block_size), -1, dtype=torch.int64, device=device)
    keep_slots = torch.full((bs, block_size), -1, dtype=torch.int64, device=device)
    free_slots = torch.full((bs, block_size), -1, dtype=torch.int64, device=device)
    new_prefix_lens = prefix_lens.clone().to(torch.int64)
    finished = torch.zeros(bs, dtype=torch.bool, device=device)
    for i in range(bs):
        drafts = block_tokens[i, 1:].tolist()
        accepted = 0
        if greedy:
            while accepted < block_size - 1 and drafts[accepted] == int(target_ids[i, accepted]):
                accepted += 1
            bonus = int(target_ids[i, accepted])
        else:
            bonus = None
            for j, token in enumerate(drafts):
                p = float(target_probs[i, j, token])
                q = float(draft_probs[i, j, token])
                if float(uniforms[i, j]) * q < p:
                    accepted += 1
                    continue
                residual = (target_probs[i, j].double() - draft_probs[i, j].double()).clamp_min(0)
                if float(residual.sum()) <= 0:
                    residual = target_probs[i, j]
                bonus = sample_inverse_cdf(residual, float(uniforms[i, block_size - 1]))
                break
            if bonus is None:
                bonus = sample_inverse_cdf(target_probs[i, block_size - 1], float(uniforms[i, block_size - 1]))
        tokens = drafts[:accepted] + [bonus]
        stops = {int(s) for s in stop_ids[i].tolist() if s >= 0}
        stop_at = next((j for j, token in enumerate(tokens) if token in stops), None)
        budget = int(budgets[i])
        n = max(0, min(len(tokens), budget, len(tokens) if stop_at is None else stop_at + 1))
        num_accepted[i] = accepted
        num_emitted[i] = n
        if n:
            emitted[i, :n] = torch.tensor(tokens[:n], dtype=torch.int64, device=device)
        # t0's KV (computed by this verify pass) always stays; so does that of each emitted draft except
        # the last emitted token, which has no KV yet (the bonus) or becomes the next block's t0.
        kept = max(n, 1)
        keep_slots[i, :kept] = block_slots[i, :kept]
        free_slots[i, kept:] = block_slots[i, kept:]
        new_prefix_lens[i] = prefix_lens[i] + kept
        finished[i] = n >= budget or (stop_at is not None and stop_at < n)
    return num_accepted, num_emitted, emitted, keep_slots, free_slots, new_prefix_lens, finished


def sample_inverse_cdf(weights: torch.Tensor, uniform: float) -> int:
    """The first token whose running weight sum exceeds ``uniform * sum(weights)``: [V] -> token id.

    Weights need not be normalized; zero-weight tokens are never chosen (ties go to the last token with
    weight, which also absorbs rounding when the running sum never exceeds the threshold).
    """
    weights = weights.double()  # fp64 running sums: fp32 rounding over a 262k vocabulary exceeds a token's mass
    cdf = torch.cumsum(weights, dim=0)
    threshold = torch.tensor([uniform], dtype=cdf.dtype, device=cdf.device) * cdf[-1]
    index = int(torch.searchsorted(cdf, threshold, right=True).item())
    last_nonzero = int(torch.nonzero(weights > 0).max())
    return min(index, last_nonzero)


def block_attention_ref(q: torch.Tensor, k_block: torch.Tensor, v_block: torch.Tensor, k_cache: torch.Tensor,
                        v_cache: torch.Tensor, kv_indptr: torch.Tensor, kv_indices: torch.Tensor, *, block_size: int,
                        causal: bool, sm_scale: float, window: int = -1,
                        kv_slot_map: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of ``bs`` blocks of ``B = block_size`` query tokens (the Triton kernel of
    ``ops/block_attention.py``).

    Args:
        q: [bs * B, Hq, D]; request r's block is rows ``r * B .. r * B + B - 1``.
        k_block, v_block: [bs * B, Hkv, D] the blocks' own keys and values (Hq = G * Hkv: query head h reads
            KV head ``h // G``).
        k_cache, v_cache: [slots, Hkv, D] the cached keys and values.
        kv_indptr: [bs + 1]; request r's prefix is ``kv_indices[kv_indptr[r]:kv_indptr[r + 1]]`` (cache slots),
            the P keys right before its block: block token t sits at position P + t, prefix key c at c.
        block_size: B.
        causal: block token i sees block keys 0..i (the target's verify pass); else all B (the drafter's).
        sm_scale: the softmax scale.
        window: a sliding window as SGLang counts it (``sliding_window_size``: transformers' window - 1): a
            query sees the keys at most ``window`` positions before it, and (non-causal) after it; -1 for all.
            Prefix keys before the first one the block's first query sees (position ``P - window``) are not read.
        kv_slot_map: [full_slots] int32/int64 or None. Given, ``kv_indices`` lists full-pool slots and the key
            listed as slot s is cache row ``kv_slot_map[s]`` (SGLang's ``full_to_swa_index_mapping``: the
            sliding layers' window-sized pool); positions and the window still count by listing offset. Only the
            keys read are mapped, so keys evicted from the window (map entry 0) never reach the output.
    Returns:
        [bs * B, Hq, D] in q's dtype: each block token attends to the visible prefix and block keys.
    """
    batch_size = kv_indptr.numel() - 1
    group = q.shape[1] // k_block.shape[1]
    out = torch.empty_like(q)
    tokens = torch.arange(block_size)
    for r in range(batch_size):
        rows = slice(r * block_size, (r + 1) * block_size)
        listed = kv_indices[int(kv_indptr[r]):int(kv_indptr[r + 1])].long()
        first = max(len(listed) - window, 0) if window >= 0 else 0  # keys before it: no query sees them
        prefix = listed[first:] if kv_slot_map is None else kv_slot_map[listed[first:]].long()  # cache rows
        # the K = P - first + B keys read, by position
        keys = torch.cat([k_cache[prefix], k_block[rows]]).float().repeat_interleave(group, dim=1)  # [K, Hq, D]
        values = torch.cat([v_cache[prefix], v_block[rows]]).float().repeat_interleave(group, dim=1)
        scores = torch.einsum("thd,shd->hts", q[rows].float(), keys) * sm_scale  # [Hq, B, K]
        key_positions = torch.arange(first, len(listed) + block_size)
        distance = (len(listed) + tokens)[:, None] - key_positions[None, :]  # query minus key position [B, K]
        visible = distance >= 0 if causal else torch.ones_like(distance, dtype=torch.bool)
        if window >= 0:
            visible &= distance.abs() <= window
        probs = scores.masked_fill(~visible.to(scores.device), float("-inf")).softmax(dim=-1)
        out[rows] = torch.einsum("hts,shd->thd", probs, values).to(q.dtype)
    return out


def argmax_ref(logits: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The index of each row's maximum (the first one on ties): ``logits`` [..., V] float -> [...] int64,
    written into ``out`` (same leading shape; may be a strided view) when given."""
    choice = logits.argmax(dim=-1)
    if out is None:
        return choice
    out.copy_(choice)
    return out


def block_inputs_ref(verified_id: torch.Tensor, seq_lens: torch.Tensor, req_pool_indices: torch.Tensor,
                     req_to_token: torch.Tensor, budget_table: torch.Tensor, mask_token_id: int,
                     block_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inputs of one decode step of the overlap loop, from the state the previous step left on the device.

    Args:
        verified_id: [bs] int64, each request's last token t0 (no KV yet).
        seq_lens: [bs] int32/int64, its committed tokens (the block starts at this position).
        req_pool_indices: [bs] int32/int64, its row of ``req_to_token`` and ``budget_table``.
        req_to_token: [rows, width] int32, the KV slot of each (row, position); the block's slots were
            assigned there before the step. A position past ``width`` reads slot 0 (SGLang's padding slot).
        budget_table: [rows] int64, how many more tokens each request may emit.
        mask_token_id, block_size: the drafter's mask token and B.
    Returns:
        (block_input [bs, B] int64: [t0, mask, ..., mask],
         positions [bs, B] int64: seq_lens + 0 .. B-1,
         block_slots [bs, B] int64: the KV slots of those positions,
         prefix_lens [bs] int64: seq_lens,
         budgets [bs] int64: the requests' rows of ``budget_table``.)
    """
    prefix_lens = seq_lens.to(torch.int64)
    rows = req_pool_indices.to(torch.int64)
    positions = prefix_lens[:, None] + torch.arange(block_size, device=seq_lens.device)[None, :]
    inside = positions < req_to_token.shape[1]
    block_slots = req_to_token[rows[:, None], positions.clamp(max=req_to_token.shape[1] - 1)].to(torch.int64)
    block_slots = torch.where(inside, block_slots, torch.zeros_like(block_slots))
    block_input = torch.full_like(positions, mask_token_id)
    block_input[:, 0] = verified_id
    return block_input, positions, block_slots, prefix_lens, budget_table[rows]


def advance_state_ref(verified_id: torch.Tensor, prefix_lens: torch.Tensor, budgets: torch.Tensor,
                      num_emitted: torch.Tensor, emitted: torch.Tensor, req_pool_indices: torch.Tensor,
                      budget_table: torch.Tensor, seq_lens_dtype: torch.dtype
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The overlap loop's state after a step's verdict (``verify_block``'s ``num_emitted`` [bs] int32 and
    ``emitted`` [bs, B] int64), for the next step to start from without a host read.

    ``budget_table[req_pool_indices]`` becomes ``budgets - num_emitted`` (mutated). Returns
    (next verified_id [bs] int64: the last emitted token, or ``verified_id`` where nothing was emitted,
     new seq_lens [bs] in ``seq_lens_dtype``: ``prefix_lens + num_emitted``,
     accept_lens [bs] int32: ``max(num_emitted, 1)``, the tokens whose KV the step kept.)
    """
    n = num_emitted.to(torch.int64)
    budget_table[req_pool_indices.to(torch.int64)] = budgets - n
    last = emitted.gather(1, (n - 1).clamp(min=0)[:, None]).squeeze(1)
    next_id = torch.where(n > 0, last, verified_id)
    return next_id, (prefix_lens + n).to(seq_lens_dtype), n.clamp(min=1).to(torch.int32)


def paged_kv_indices_ref(req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor,
                         kv_indptr: torch.Tensor, kv_indices: torch.Tensor) -> None:
    """Fills ``kv_indptr`` [bs + 1] (0, then the running sum of ``seq_lens``) and ``kv_indices`` (request i's
    prefix slots ``req_to_token[req_pool_indices[i], :seq_lens[i]]`` at ``kv_indptr[i] .. kv_indptr[i + 1]``),
    in their own dtypes; entries of ``kv_indices`` past the total are left alone."""
    lengths = seq_lens.to(torch.int64)
    kv_indptr[0] = 0
    kv_indptr[1:lengths.shape[0] + 1] = lengths.cumsum(0).to(kv_indptr.dtype)
    rows = [req_to_token[int(row), :int(length)] for row, length in zip(req_pool_indices, lengths)]
    if rows:
        listing = torch.cat(rows)
        kv_indices[:listing.shape[0]] = listing.to(kv_indices.dtype)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim in fp32 (the weight multiplied in fp32, as SGLang's CUDA kernel does), rounded
    once to ``x``'s dtype; ``weight`` None is a weight of ones."""
    xf = x.float()
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (out if weight is None else out * weight.float()).to(x.dtype)


def residual_norm_ref(residual: torch.Tensor, out_weights: list[torch.Tensor], eps: float,
                      branches: list[torch.Tensor] = (), branch_weights: list[torch.Tensor] = (),
                      combine_weight: torch.Tensor | None = None,
                      scalar: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The new residual and its normalizations, every intermediate rounded to ``residual``'s dtype as the
    op-by-op sequence rounds it::

        m = sum_i rms(branches[i]) * branch_weights[i]        (no branches: m = 0)
        m = rms(m) * combine_weight                             (when given)
        new = (residual + m) * scalar                           (scalar: a 1-element tensor, when given)
        outs = [rms(new) * w for w in out_weights]

    Args:
        residual: [T, H]; branches: up to two [T, H] (any row stride); weights [H]; eps: every norm's epsilon.
    Returns:
        (new [T, H], outs: one [T, H] per out weight), new tensors (the inputs are not written).
    """
    dtype = residual.dtype
    new = residual
    if branches:
        mix = None
        for branch, weight in zip(branches, branch_weights):
            normed = rms_norm_ref(branch, weight, eps)
            mix = normed if mix is None else (mix.float() + normed.float()).to(dtype)
        if combine_weight is not None:
            mix = rms_norm_ref(mix, combine_weight, eps)
        new = (residual.float() + mix.float()).to(dtype)
    if scalar is not None:
        new = (new.float() * scalar.float()).to(dtype)
    elif new is residual:
        new = residual.clone()
    return new, [rms_norm_ref(new, weight, eps) for weight in out_weights]


def qkv_norm_rope_ref(qkv: torch.Tensor, positions: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                      cos_sin_cache: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
                      k_eq_v: bool, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v of a fused QKV projection, each head RMS-normalized (q and k with their weights, v without one;
    ``k_eq_v``: no v columns, v is the raw k), then NeoX (rotate-half) RoPE on q and k over the whole head.

    Args:
        qkv: [T, (num_heads + num_kv_heads * (1 if k_eq_v else 2)) * head_dim] (any row stride).
        positions: [T] int64; q_weight, k_weight: [head_dim];
        cos_sin_cache: [max_position, head_dim] (cos of the head_dim / 2 frequencies, then their sin).
    Returns:
        q [T, num_heads * head_dim], k and v [T, num_kv_heads * head_dim], contiguous, in ``qkv``'s dtype.
    """
    tokens, dtype = qkv.shape[0], qkv.dtype
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    q = qkv[:, :q_size].reshape(tokens, num_heads, head_dim)
    k = qkv[:, q_size:q_size + kv_size].reshape(tokens, num_kv_heads, head_dim)
    v = k if k_eq_v else qkv[:, q_size + kv_size:q_size + 2 * kv_size].reshape(tokens, num_kv_heads, head_dim)
    half = head_dim // 2
    cos_sin = cos_sin_cache[positions].float()[:, None, :]
    cos, sin = cos_sin[..., :half], cos_sin[..., half:]

    def rope(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.float()[..., :half], x.float()[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(dtype)

    q = rope(rms_norm_ref(q, q_weight, eps))
    k_out = rope(rms_norm_ref(k, k_weight, eps))
    v = rms_norm_ref(v, None, eps)
    return q.reshape(tokens, q_size), k_out.reshape(tokens, kv_size), v.reshape(tokens, kv_size)


def narrow_linear_ref(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x`` [tokens, in] times ``weight`` [out, in] transposed: [tokens, out], accumulated in fp32 and rounded to
    x's dtype."""
    return (x.float() @ weight.float().T).to(x.dtype)


def decode_mlp_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, router_logits: torch.Tensor | None,
                   top_k: int, tanh_gelu: bool) -> torch.Tensor:
    """A GELU-gated MLP, dense or as routed experts, with the rounding points of the GEMMs it replaces.

    Args:
        x: [tokens, hidden]; w13: [experts, 2 * inter, hidden] (gate rows, then up rows); w2: [experts, hidden,
            inter]; a dense MLP is one expert and no ``router_logits``.
        router_logits: [tokens, experts] or None. Routed: each token's ``top_k`` experts by logit, weighted by the
            softmax over all experts renormalized over the chosen ones (softmax of the chosen logits).
        tanh_gelu: GELU's tanh approximation (Gemma's dense MLP) or the erf GELU (SGLang's fused MoE).

    Per (token, expert): gate and up accumulated in fp32 and rounded to x's dtype, ``gelu(gate) * up`` rounded
    to x's dtype, the down projection in fp32; the experts' weighted sum in fp32, rounded once.
    """
    dtype = x.dtype
    if router_logits is None:
        weights = torch.ones(x.shape[0], 1)
        ids = torch.zeros(x.shape[0], 1, dtype=torch.long)
    else:
        weights, ids = router_logits.float().cpu().topk(top_k, dim=-1)
        weights = torch.softmax(weights, dim=-1)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for token in range(x.shape[0]):
        for weight, expert in zip(weights[token].tolist(), ids[token].tolist()):
            gate, up = (x[token].float() @ w13[expert].float().T).to(dtype).float().chunk(2)
            act = (F.gelu(gate, approximate="tanh" if tanh_gelu else "none") * up).to(dtype).float()
            out[token] += weight * (w2[expert].float() @ act)
    return out.to(dtype)
