// SPDX-License-Identifier: Apache-2.0
// Host launcher of dflash::inject_kv (schema in registration.cpp, device code in inject_kv.cuh):
// argument checks, dtype/head-dim dispatch, launch on the current stream.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>

#include "inject_kv.cuh"

namespace dflash {
namespace {

constexpr int kThreadsPerBlock = 256;

bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

template <typename T, typename C, int kGroup>
void launch(const InjectKvParams& params, cudaStream_t stream) {
  const int64_t threads = params.num_tokens * params.num_layers * params.num_heads * kGroup;
  const int64_t blocks = (threads + kThreadsPerBlock - 1) / kThreadsPerBlock;
  TORCH_CHECK(blocks <= INT32_MAX, "inject_kv: too many tokens for one launch (", params.num_tokens, ")");
  inject_kv_kernel<T, C, kGroup><<<static_cast<unsigned>(blocks), kThreadsPerBlock, 0, stream>>>(params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename C>
void dispatch_head_dim(const InjectKvParams& params, int head_dim, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  switch (head_dim) {
    case 64:
      return launch<T, C, 64 / (2 * kVec)>(params, stream);
    case 128:
      return launch<T, C, 128 / (2 * kVec)>(params, stream);
    case 256:
      return launch<T, C, 256 / (2 * kVec)>(params, stream);
    default:
      TORCH_CHECK(false, "inject_kv: head_dim must be 64, 128 or 256, got ", head_dim);
  }
}

template <typename T>
void dispatch_cache(const InjectKvParams& params, at::ScalarType cache_dtype, int head_dim, cudaStream_t stream) {
  switch (cache_dtype) {
    case at::kFloat:
      return dispatch_head_dim<T, float>(params, head_dim, stream);
    case at::kHalf:
      return dispatch_head_dim<T, __half>(params, head_dim, stream);
    case at::kBFloat16:
      return dispatch_head_dim<T, __nv_bfloat16>(params, head_dim, stream);
    default:
      TORCH_CHECK(false, "inject_kv: k_cache must be float32, float16 or bfloat16, got ", cache_dtype);
  }
}

void check_cuda(const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK(t.is_cuda(), "inject_kv: ", name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == device, "inject_kv: ", name, " is on ", t.device(), " but kv is on ", device);
}

void check_token_index(const at::Tensor& t, const char* name, const at::Device& device, int64_t num_tokens) {
  check_cuda(t, name, device);
  TORCH_CHECK(t.scalar_type() == at::kLong, "inject_kv: ", name, " must be int64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == num_tokens, "inject_kv: ", name, " must be [N=", num_tokens,
              "], got shape ", t.sizes());
}

void check_cache(const at::Tensor& t, const char* name, const at::Device& device, int64_t num_layers,
                 int64_t num_heads, int64_t head_dim) {
  check_cuda(t, name, device);
  TORCH_CHECK(t.dim() == 4 && t.size(0) == num_layers && t.size(2) == num_heads && t.size(3) == head_dim,
              "inject_kv: ", name, " must be [L=", num_layers, ", slots, H=", num_heads, ", D=", head_dim,
              "], got shape ", t.sizes());
  TORCH_CHECK(t.stride(3) == 1, "inject_kv: ", name, "'s last dim must be contiguous, got strides ", t.strides());
}

}  // namespace

// kv [N, L, 2, H, D] bf16/fp16/fp32; positions, slots [N] int64; k_norm_weight [L, D]; cos_sin_cache [P, D]
// fp32; k_cache, v_cache [L, S, H, D] (mutated; their last dim contiguous).
void inject_kv(const at::Tensor& kv, const at::Tensor& positions, const at::Tensor& slots,
               const at::Tensor& k_norm_weight, const at::Tensor& cos_sin_cache, at::Tensor& k_cache,
               at::Tensor& v_cache, double eps) {
  const at::Device device = kv.device();
  TORCH_CHECK(kv.is_cuda(), "inject_kv: kv must be a CUDA tensor, got one on ", device);
  TORCH_CHECK(kv.dim() == 5 && kv.size(2) == 2, "inject_kv: kv must be [N, L, 2, H, D], got shape ", kv.sizes());
  TORCH_CHECK(is_float_dtype(kv.scalar_type()), "inject_kv: kv must be float32, float16 or bfloat16, got ",
              kv.scalar_type());
  const int64_t num_tokens = kv.size(0);
  const int64_t num_layers = kv.size(1);
  const int64_t num_heads = kv.size(3);
  const int64_t head_dim = kv.size(4);
  TORCH_CHECK(head_dim == 64 || head_dim == 128 || head_dim == 256,
              "inject_kv: head_dim (kv.size(4)) must be 64, 128 or 256, got ", head_dim);
  check_token_index(positions, "positions", device, num_tokens);
  check_token_index(slots, "slots", device, num_tokens);
  check_cuda(k_norm_weight, "k_norm_weight", device);
  TORCH_CHECK(is_float_dtype(k_norm_weight.scalar_type()),
              "inject_kv: k_norm_weight must be float32, float16 or bfloat16, got ", k_norm_weight.scalar_type());
  TORCH_CHECK(k_norm_weight.dim() == 2 && k_norm_weight.size(0) == num_layers && k_norm_weight.size(1) == head_dim,
              "inject_kv: k_norm_weight must be [L=", num_layers, ", D=", head_dim, "], got shape ",
              k_norm_weight.sizes());
  check_cuda(cos_sin_cache, "cos_sin_cache", device);
  TORCH_CHECK(cos_sin_cache.scalar_type() == at::kFloat, "inject_kv: cos_sin_cache must be float32, got ",
              cos_sin_cache.scalar_type());
  TORCH_CHECK(cos_sin_cache.dim() == 2 && cos_sin_cache.size(1) == head_dim,
              "inject_kv: cos_sin_cache must be [max_position, D=", head_dim, "], got shape ", cos_sin_cache.sizes());
  check_cache(k_cache, "k_cache", device, num_layers, num_heads, head_dim);
  check_cache(v_cache, "v_cache", device, num_layers, num_heads, head_dim);
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "inject_kv: k_cache (", k_cache.scalar_type(),
              ") and v_cache (", v_cache.scalar_type(), ") must have one dtype");
  TORCH_CHECK(k_cache.size(1) == v_cache.size(1), "inject_kv: k_cache has ", k_cache.size(1),
              " slots but v_cache has ", v_cache.size(1));
  if (num_tokens == 0 || num_layers == 0 || num_heads == 0) return;

  const c10::cuda::CUDAGuard guard(device);
  // Inputs are read-only, so contiguous copies are safe (a no-op for the public wrapper's inputs).
  const at::Tensor kv_c = kv.contiguous();
  const at::Tensor positions_c = positions.contiguous();
  const at::Tensor slots_c = slots.contiguous();
  const at::Tensor weight_c = k_norm_weight.stride(1) == 1 ? k_norm_weight : k_norm_weight.contiguous();
  const at::Tensor cos_sin_c = cos_sin_cache.stride(1) == 1 ? cos_sin_cache : cos_sin_cache.contiguous();

  InjectKvParams params{};
  params.kv = kv_c.data_ptr();
  params.positions = positions_c.data_ptr<int64_t>();
  params.slots = slots_c.data_ptr<int64_t>();
  params.k_norm_weight = weight_c.data_ptr();
  params.cos_sin_cache = cos_sin_c.data_ptr<float>();
  params.k_cache = k_cache.data_ptr();
  params.v_cache = v_cache.data_ptr();
  params.num_tokens = num_tokens;
  params.num_layers = static_cast<int>(num_layers);
  params.num_heads = static_cast<int>(num_heads);
  params.num_slots = k_cache.size(1);
  params.max_position = cos_sin_c.size(0);
  params.weight_stride = weight_c.stride(0);
  params.cos_sin_stride = cos_sin_c.stride(0);
  for (int d = 0; d < 3; ++d) {
    params.k_stride[d] = k_cache.stride(d);
    params.v_stride[d] = v_cache.stride(d);
  }
  params.weight_dtype = k_norm_weight.scalar_type() == at::kFloat  ? WeightDtype::kFloat32
                        : k_norm_weight.scalar_type() == at::kHalf ? WeightDtype::kFloat16
                                                                   : WeightDtype::kBFloat16;
  params.eps = static_cast<float>(eps);

  // Vector accesses need every pack address aligned: the base pointers and the strides between packs.
  const int64_t cache_elem = k_cache.element_size();
  bool aligned = aligned16(params.kv) && aligned16(params.cos_sin_cache) && (params.cos_sin_stride * 4) % 16 == 0 &&
                 aligned16(params.k_cache) && aligned16(params.v_cache);
  for (int d = 0; d < 3; ++d) {
    aligned = aligned && (params.k_stride[d] * cache_elem) % 16 == 0 && (params.v_stride[d] * cache_elem) % 16 == 0;
  }
  params.aligned = aligned;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  switch (kv.scalar_type()) {
    case at::kFloat:
      return dispatch_cache<float>(params, k_cache.scalar_type(), static_cast<int>(head_dim), stream);
    case at::kHalf:
      return dispatch_cache<__half>(params, k_cache.scalar_type(), static_cast<int>(head_dim), stream);
    default:
      return dispatch_cache<__nv_bfloat16>(params, k_cache.scalar_type(), static_cast<int>(head_dim), stream);
  }
}

TORCH_LIBRARY_IMPL(dflash, CUDA, m) { m.impl("inject_kv", &inject_kv); }

}  // namespace dflash
