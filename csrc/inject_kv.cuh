// SPDX-License-Identifier: Apache-2.0
// inject_kv device code: per-head K RMSNorm + NeoX RoPE + cast + scatter of the drafter's context K/V into
// every layer's KV cache, one fused memory-bound pass. Spec: dflash_sglang/ops/reference.py::inject_kv_ref.
//
// Work split: one "item" is (token, layer, kv head); kGroup = head_dim / (2 * kVec) consecutive threads
// share an item, thread c owning elements [c*kVec, (c+1)*kVec) of the first half of the head and the same
// range of the second half, so the rotate-half pairs (i, i + head_dim/2) sit in one thread and only the
// RMS sum crosses threads (a shuffle reduction inside the group). Every global access is a 16-byte pack
// of kv (or of the cache when its dtype is as wide), consecutive items are consecutive heads of one
// (token, layer) row, so a warp reads whole contiguous K and V rows.
#pragma once

#include <cstdint>

#include "dtype_utils.cuh"

namespace dflash {

// Runtime dtype of k_norm_weight (the table is tiny and cache resident; a uniform branch beats 3x the
// kernel instantiations).
enum class WeightDtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct InjectKvParams {
  const void* kv;                // [N, L, 2, H, D] contiguous, dtype T
  const int64_t* positions;      // [N]
  const int64_t* slots;          // [N], < 0 = padding
  const void* k_norm_weight;     // [L, D] (row stride weight_stride), dtype weight_dtype
  const float* cos_sin_cache;    // [max_position, D] (row stride cos_sin_stride)
  void* k_cache;                 // [L, S, H, D], dtype C, last dim contiguous
  void* v_cache;                 // [L, S, H, D], dtype C, last dim contiguous
  int64_t num_tokens;
  int num_layers;
  int num_heads;
  int64_t num_slots;
  int64_t max_position;
  int64_t weight_stride;
  int64_t cos_sin_stride;
  int64_t k_stride[3];           // element strides of k_cache's layer, slot, head dims
  int64_t v_stride[3];
  WeightDtype weight_dtype;
  float eps;
  bool aligned;                  // every pack address is aligned: use vector accesses
};

template <int kVec>
__device__ __forceinline__ void load_weight(const InjectKvParams& p, int64_t offset, float (&out)[kVec]) {
  switch (p.weight_dtype) {
    case WeightDtype::kFloat32:
      load_pack<float, kVec>(static_cast<const float*>(p.k_norm_weight) + offset, false, out);
      break;
    case WeightDtype::kFloat16:
      load_pack<__half, kVec>(static_cast<const __half*>(p.k_norm_weight) + offset, false, out);
      break;
    default:
      load_pack<__nv_bfloat16, kVec>(static_cast<const __nv_bfloat16*>(p.k_norm_weight) + offset, false, out);
      break;
  }
}

// T: kv dtype; C: cache dtype; kGroup: threads per (token, layer, head) = head_dim / (2 * kVec).
template <typename T, typename C, int kGroup>
__global__ void __launch_bounds__(256) inject_kv_kernel(const InjectKvParams p) {
  constexpr int kVec = 16 / sizeof(T);  // elements per 16-byte pack of kv
  constexpr int kHalf = kVec * kGroup;  // head_dim / 2
  constexpr int kDim = 2 * kHalf;
  static_assert(kGroup >= 1 && kGroup <= 32 && (kGroup & (kGroup - 1)) == 0, "group must be a power of 2");

  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t item = thread / kGroup;
  const int c = static_cast<int>(thread % kGroup);
  const int64_t num_items = p.num_tokens * p.num_layers * p.num_heads;
  // Exits below are uniform across a group (same item), so the group's shuffle mask stays complete.
  if (item >= num_items) return;
  const int head = static_cast<int>(item % p.num_heads);
  const int64_t token_layer = item / p.num_heads;
  const int layer = static_cast<int>(token_layer % p.num_layers);
  const int64_t token = token_layer / p.num_layers;

  const int64_t slot = p.slots[token];
  const int64_t position = p.positions[token];
  // Negative slot = padding. Out-of-range slots/positions are caller bugs the host cannot check without a
  // sync; they write nothing rather than out of bounds (the reference raises an index error instead).
  if (slot < 0 || slot >= p.num_slots || position < 0 || position >= p.max_position) return;

  // kv[token, layer, 0, head, :] and kv[token, layer, 1, head, :]
  const T* k_src = static_cast<const T*>(p.kv) + ((token * p.num_layers + layer) * 2 * p.num_heads + head) * kDim;
  const T* v_src = k_src + static_cast<int64_t>(p.num_heads) * kDim;
  const int lo = c * kVec;  // this thread's offset in the first half; lo + kHalf in the second

  // Issue every load before the first use.
  float k_lo[kVec], k_hi[kVec], v_lo[kVec], v_hi[kVec], cos_v[kVec], sin_v[kVec], w_lo[kVec], w_hi[kVec];
  load_pack<T, kVec>(k_src + lo, p.aligned, k_lo);
  load_pack<T, kVec>(k_src + kHalf + lo, p.aligned, k_hi);
  load_pack<T, kVec>(v_src + lo, p.aligned, v_lo);
  load_pack<T, kVec>(v_src + kHalf + lo, p.aligned, v_hi);
  const float* cos_sin = p.cos_sin_cache + position * p.cos_sin_stride;
  load_pack<float, kVec>(cos_sin + lo, p.aligned, cos_v);          // cos(position * inv_freq[lo..])
  load_pack<float, kVec>(cos_sin + kHalf + lo, p.aligned, sin_v);  // sin(position * inv_freq[lo..])
  load_weight<kVec>(p, layer * p.weight_stride + lo, w_lo);
  load_weight<kVec>(p, layer * p.weight_stride + kHalf + lo, w_hi);

  // RMS over the head (fp32), reduced across the group's kGroup lanes.
  float sum_sq = 0.f;
#pragma unroll
  for (int i = 0; i < kVec; ++i) sum_sq += k_lo[i] * k_lo[i] + k_hi[i] * k_hi[i];
  const unsigned lane = threadIdx.x & 31u;
  const unsigned group_mask =
      kGroup == 32 ? 0xffffffffu : (((1u << kGroup) - 1u) << (lane & ~static_cast<unsigned>(kGroup - 1)));
#pragma unroll
  for (int offset = kGroup / 2; offset > 0; offset /= 2) sum_sq += __shfl_xor_sync(group_mask, sum_sq, offset);
  const float inv_rms = rsqrtf(sum_sq * (1.f / kDim) + p.eps);

  float out_lo[kVec], out_hi[kVec];
#pragma unroll
  for (int i = 0; i < kVec; ++i) {
    // Same rounding as the reference: normalize in fp32, round to T, scale by the weight, round to T.
    const float x_lo = round_to<T>(round_to<T>(k_lo[i] * inv_rms) * w_lo[i]);
    const float x_hi = round_to<T>(round_to<T>(k_hi[i] * inv_rms) * w_hi[i]);
    // rotate-half: [x_lo, x_hi] * cos + [-x_hi, x_lo] * sin
    out_lo[i] = x_lo * cos_v[i] + (-x_hi) * sin_v[i];
    out_hi[i] = x_hi * cos_v[i] + x_lo * sin_v[i];
  }

  C* k_dst = static_cast<C*>(p.k_cache) + layer * p.k_stride[0] + slot * p.k_stride[1] + head * p.k_stride[2];
  C* v_dst = static_cast<C*>(p.v_cache) + layer * p.v_stride[0] + slot * p.v_stride[1] + head * p.v_stride[2];
  store_pack<C, kVec>(k_dst + lo, p.aligned, out_lo);
  store_pack<C, kVec>(k_dst + kHalf + lo, p.aligned, out_hi);
  store_pack<C, kVec>(v_dst + lo, p.aligned, v_lo);
  store_pack<C, kVec>(v_dst + kHalf + lo, p.aligned, v_hi);
}

}  // namespace dflash
