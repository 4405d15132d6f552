# SPDX-License-Identifier: Apache-2.0
"""The byte floor of a decode step: the weight bytes one forward pass over ``tokens`` new tokens must read,
counted from a config.json (Qwen3 and Gemma 4, dense and MoE), and the device-to-device copy bandwidth that
turns bytes into a time (``scripts/bench_step.py`` reports each AR step as a multiple of that floor).

Counted: every attention and MLP weight of every layer, the LM head (the vocabulary x hidden matrix, read
whole at any batch), the MoE router, and of the experts only those the tokens touch: with ``tokens`` routed
independently and uniformly, an expert is touched with probability ``1 - (1 - k / E) ** tokens``. Not
counted (each under 1% at the benchmark's shapes): norms, embedding rows, the KV cache.
"""

from __future__ import annotations


def _text_config(config: dict) -> dict:
    return config.get("text_config", config)


def expected_experts_touched(num_experts: int, top_k: int, tokens: int) -> float:
    """Mean count of distinct experts ``tokens`` uniformly routed tokens use (top-``top_k`` of ``num_experts``)."""
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** tokens)


def _attention_params(text: dict, layer: int) -> int:
    hidden, heads = text["hidden_size"], text["num_attention_heads"]
    if text.get("model_type") == "gemma4_text":
        full = text["layer_types"][layer] == "full_attention"
        head_dim = text["global_head_dim"] if full else text["head_dim"]
        k_eq_v = full and bool(text.get("attention_k_eq_v"))
        kv_heads = (text.get("num_global_key_value_heads") or text["num_key_value_heads"]) if k_eq_v \
            else text["num_key_value_heads"]
        kv_projections = 1 if k_eq_v else 2
    else:
        head_dim = text.get("head_dim") or hidden // heads
        kv_heads, kv_projections = text["num_key_value_heads"], 2
    return hidden * head_dim * (2 * heads + kv_projections * kv_heads)  # q, o, then k (and v)


def weight_bytes_per_step(config: dict, tokens: int, bytes_per_param: int = 2) -> int:
    """Weight bytes one forward pass over ``tokens`` tokens reads (a decode step of batch ``tokens``; a DFLASH
    verify pass of b requests is ``tokens = 16 * b``)."""
    text = _text_config(config)
    hidden, layers = text["hidden_size"], text["num_hidden_layers"]
    params = text["vocab_size"] * hidden  # the LM head (tied or not, read once per step)
    experts = text.get("num_experts") if text.get("enable_moe_block", "num_experts" in text) else None
    for layer in range(layers):
        params += _attention_params(text, layer)
        params += 3 * hidden * text["intermediate_size"]  # gate, up, down (Gemma 4 MoE layers keep a dense MLP)
        if experts:
            top_k = text.get("top_k_experts") or text["num_experts_per_tok"]
            params += hidden * experts  # router
            params += round(expected_experts_touched(experts, top_k, tokens)
                            * 3 * hidden * text["moe_intermediate_size"])
    return params * bytes_per_param


def measure_copy_bandwidth_gbs(size_bytes: int = 1 << 30, repeats: int = 20) -> float:
    """Device-to-device copy rate on the current CUDA device, counting bytes read plus bytes written (GB/s),
    the median of ``repeats`` timed copies after warm-up."""
    import torch

    source = torch.randn(size_bytes // 4, device="cuda")
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        target.copy_(source)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    del source, target
    torch.cuda.empty_cache()
    return 2 * size_bytes / times[len(times) // 2] / 1e9
