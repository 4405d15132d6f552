// SPDX-License-Identifier: Apache-2.0
// Device helpers shared by the dflash kernels: fp32 <-> storage-type conversions and 16-byte vector
// loads/stores of small per-thread chunks. Raw CUDA only (no torch headers), like FlashInfer's include/.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace dflash {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// Round-to-nearest-even, as torch's .to(dtype) does.
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// x rounded to T and back: the reference's `.to(dtype).float()`.
template <typename T>
__device__ __forceinline__ float round_to(float x) {
  return to_float(from_float<T>(x));
}

// N consecutive elements of T, aligned so that the whole pack moves in 8- or 16-byte accesses.
template <typename T, int N>
struct alignas(sizeof(T) * N >= 16 ? 16 : sizeof(T) * N) Pack {
  T v[N];
};

// Loads N elements of T at src into fp32. `aligned`: src is aligned to the pack size (else scalar loads).
template <typename T, int N>
__device__ __forceinline__ void load_pack(const T* __restrict__ src, bool aligned, float (&out)[N]) {
  if (aligned) {
    Pack<T, N> pack;
    constexpr int kBytes = sizeof(T) * N;
    static_assert(kBytes % 8 == 0, "packs move in 8- or 16-byte accesses");
    if constexpr (kBytes % 16 == 0) {
#pragma unroll
      for (int i = 0; i < kBytes / 16; ++i) {
        reinterpret_cast<uint4*>(&pack)[i] = __ldg(reinterpret_cast<const uint4*>(src) + i);
      }
    } else {
#pragma unroll
      for (int i = 0; i < kBytes / 8; ++i) {
        reinterpret_cast<uint2*>(&pack)[i] = __ldg(reinterpret_cast<const uint2*>(src) + i);
      }
    }
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = to_float(pack.v[i]);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = to_float(src[i]);
  }
}

// Stores N fp32 values at dst as T (rounded). `aligned`: dst is aligned to the pack size.
template <typename T, int N>
__device__ __forceinline__ void store_pack(T* __restrict__ dst, bool aligned, const float (&in)[N]) {
  if (aligned) {
    Pack<T, N> pack;
#pragma unroll
    for (int i = 0; i < N; ++i) pack.v[i] = from_float<T>(in[i]);
    constexpr int kBytes = sizeof(T) * N;
    static_assert(kBytes % 8 == 0, "packs move in 8- or 16-byte accesses");
    if constexpr (kBytes % 16 == 0) {
#pragma unroll
      for (int i = 0; i < kBytes / 16; ++i) {
        reinterpret_cast<uint4*>(dst)[i] = reinterpret_cast<const uint4*>(&pack)[i];
      }
    } else {
#pragma unroll
      for (int i = 0; i < kBytes / 8; ++i) {
        reinterpret_cast<uint2*>(dst)[i] = reinterpret_cast<const uint2*>(&pack)[i];
      }
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) dst[i] = from_float<T>(in[i]);
  }
}

}  // namespace dflash
