// SPDX-License-Identifier: Apache-2.0
// Host launcher of dflash::verify_block (schema in registration.cpp, device code in verify_block.cuh):
// argument checks, output allocation, one launch on the current stream (a cluster launch when sampling).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <tuple>

#include "verify_block.cuh"

namespace dflash {
namespace {

void check_input(const at::Tensor& t, const char* name, const at::Device& device, at::ScalarType dtype,
                 at::IntArrayRef shape) {
  TORCH_CHECK(t.is_cuda(), "verify_block: ", name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == device, "verify_block: ", name, " is on ", t.device(), " but block_tokens is on ",
              device);
  TORCH_CHECK(t.scalar_type() == dtype, "verify_block: ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, "verify_block: ", name, " must have shape ", shape, ", got ", t.sizes());
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// Multiprocessor count of a device, queried once per device.
int num_sms(int device) {
  static std::array<std::atomic<int>, 64> cache{};
  TORCH_INTERNAL_ASSERT(device >= 0 && device < static_cast<int>(cache.size()), "device index ", device);
  int count = cache[device].load(std::memory_order_relaxed);
  if (count == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    cache[device].store(count, std::memory_order_relaxed);
  }
  return count;
}

}  // namespace

using VerifyBlockOutputs =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// block_tokens [bs, B] int64; target_ids [bs, B] int64 (greedy) or empty; target_probs [bs, B, V],
// draft_probs [bs, B-1, V], uniforms [bs, B] fp32 (sampling) or empty; block_slots [bs, B] int64;
// prefix_lens [bs] int64; stop_ids [bs, S] int64; budgets [bs] int64. Returns the tuple of
// ops/reference.py::verify_block_ref.
VerifyBlockOutputs verify_block(const at::Tensor& block_tokens, const at::Tensor& target_ids,
                                const at::Tensor& target_probs, const at::Tensor& draft_probs,
                                const at::Tensor& uniforms, const at::Tensor& block_slots,
                                const at::Tensor& prefix_lens, const at::Tensor& stop_ids, const at::Tensor& budgets) {
  const at::Device device = block_tokens.device();
  TORCH_CHECK(block_tokens.is_cuda(), "verify_block: block_tokens must be a CUDA tensor, got one on ", device);
  TORCH_CHECK(block_tokens.scalar_type() == at::kLong, "verify_block: block_tokens must be int64, got ",
              block_tokens.scalar_type());
  TORCH_CHECK(block_tokens.dim() == 2, "verify_block: block_tokens must be [bs, B], got shape ",
              block_tokens.sizes());
  const int64_t bs = block_tokens.size(0);
  const int64_t block_size = block_tokens.size(1);
  TORCH_CHECK(block_size >= 1 && block_size <= kMaxBlockSize, "verify_block: block size B must be in [1, ",
              kMaxBlockSize, "], got ", block_size);
  TORCH_CHECK(bs <= INT32_MAX, "verify_block: batch size ", bs, " is too large");
  const c10::cuda::CUDAGuard guard(device);
  const auto long_opts = block_tokens.options();
  VerifyBlockOutputs out{at::empty({bs}, long_opts.dtype(at::kInt)),
                         at::empty({bs}, long_opts.dtype(at::kInt)),
                         at::empty({bs, block_size}, long_opts),
                         at::empty({bs, block_size}, long_opts),
                         at::empty({bs, block_size}, long_opts),
                         at::empty({bs}, long_opts),
                         at::empty({bs}, long_opts.dtype(at::kBool))};
  // With no requests there is nothing to check the mode against (an empty target_ids reads as sampling).
  if (bs == 0) return out;
  const bool greedy = target_ids.numel() > 0;
  int64_t vocab = 0;
  if (greedy) {
    check_input(target_ids, "target_ids", device, at::kLong, {bs, block_size});
    TORCH_CHECK(target_probs.numel() == 0 && draft_probs.numel() == 0 && uniforms.numel() == 0,
                "verify_block: give target_ids (greedy) or target_probs + draft_probs + uniforms (sampling), "
                "not both; pass empty tensors for the unused ones");
  } else {
    TORCH_CHECK(target_probs.dim() == 3, "verify_block: target_probs must be [bs, B, V] (or target_ids given), "
                "got shape ", target_probs.sizes());
    vocab = target_probs.size(2);
    TORCH_CHECK(vocab >= 1 && vocab <= INT32_MAX - 4096, "verify_block: vocab size must be in [1, 2^31 - 4097], got ",
                vocab);
    check_input(target_probs, "target_probs", device, at::kFloat, {bs, block_size, vocab});
    check_input(draft_probs, "draft_probs", device, at::kFloat, {bs, block_size - 1, vocab});
    check_input(uniforms, "uniforms", device, at::kFloat, {bs, block_size});
  }
  check_input(block_slots, "block_slots", device, at::kLong, {bs, block_size});
  check_input(prefix_lens, "prefix_lens", device, at::kLong, {bs});
  check_input(budgets, "budgets", device, at::kLong, {bs});
  TORCH_CHECK(stop_ids.dim() == 2 && stop_ids.size(0) == bs, "verify_block: stop_ids must be [bs=", bs,
              ", S], got shape ", stop_ids.sizes());
  check_input(stop_ids, "stop_ids", device, at::kLong, {bs, stop_ids.size(1)});
  TORCH_CHECK(stop_ids.size(1) <= INT32_MAX, "verify_block: too many stop ids (", stop_ids.size(1), ")");


  // Inputs are read-only: contiguous copies are safe (no-ops for the public wrapper's inputs).
  const at::Tensor block_tokens_c = block_tokens.contiguous();
  const at::Tensor target_ids_c = target_ids.contiguous();
  const at::Tensor target_probs_c = target_probs.contiguous();
  const at::Tensor draft_probs_c = draft_probs.contiguous();
  const at::Tensor uniforms_c = uniforms.contiguous();
  const at::Tensor block_slots_c = block_slots.contiguous();
  const at::Tensor prefix_lens_c = prefix_lens.contiguous();
  const at::Tensor stop_ids_c = stop_ids.contiguous();
  const at::Tensor budgets_c = budgets.contiguous();

  VerifyBlockParams params{};
  params.block_tokens = block_tokens_c.data_ptr<int64_t>();
  params.target_ids = greedy ? target_ids_c.data_ptr<int64_t>() : nullptr;
  params.target_probs = greedy ? nullptr : target_probs_c.data_ptr<float>();
  params.draft_probs = greedy ? nullptr : draft_probs_c.data_ptr<float>();
  params.uniforms = greedy ? nullptr : uniforms_c.data_ptr<float>();
  params.block_slots = block_slots_c.data_ptr<int64_t>();
  params.prefix_lens = prefix_lens_c.data_ptr<int64_t>();
  params.stop_ids = stop_ids_c.data_ptr<int64_t>();
  params.budgets = budgets_c.data_ptr<int64_t>();
  params.num_accepted = std::get<0>(out).data_ptr<int32_t>();
  params.num_emitted = std::get<1>(out).data_ptr<int32_t>();
  params.emitted = std::get<2>(out).data_ptr<int64_t>();
  params.keep_slots = std::get<3>(out).data_ptr<int64_t>();
  params.free_slots = std::get<4>(out).data_ptr<int64_t>();
  params.new_prefix_lens = std::get<5>(out).data_ptr<int64_t>();
  params.finished = std::get<6>(out).data_ptr<bool>();
  params.block_size = static_cast<int>(block_size);
  params.num_stop_ids = static_cast<int>(stop_ids.size(1));
  params.vocab_size = static_cast<int>(vocab);
  params.probs_aligned = !greedy && vocab % 4 == 0 && aligned16(params.target_probs) &&
                         (block_size == 1 || aligned16(params.draft_probs));

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (greedy) {
    verify_block_kernel<true><<<static_cast<unsigned>(bs), 32, 0, stream>>>(params);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
  }
  // Small batches split each request's vocab pass over a cluster of CTAs (distributed shared memory joins
  // the partial sums) so that the pass runs on up to 8 SMs instead of one; large batches fill the GPU with
  // one CTA per request (two fit on an SM).
  params.cluster_size = 1;
  const int64_t resident_ctas = 2 * num_sms(device.index());
  while (params.cluster_size < kMaxClusterSize && bs * params.cluster_size * 2 <= resident_ctas) {
    params.cluster_size *= 2;
  }
  TORCH_CHECK(bs * params.cluster_size <= INT32_MAX, "verify_block: batch size ", bs, " is too large");
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(static_cast<unsigned>(bs * params.cluster_size));
  config.blockDim = dim3(kSampleThreads);
  config.dynamicSmemBytes = 0;
  config.stream = stream;
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeClusterDimension;
  attribute.val.clusterDim.x = static_cast<unsigned>(params.cluster_size);
  attribute.val.clusterDim.y = 1;
  attribute.val.clusterDim.z = 1;
  config.attrs = &attribute;
  config.numAttrs = 1;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, verify_block_kernel<false>, params));
  return out;
}

TORCH_LIBRARY_IMPL(dflash, CUDA, m) { m.impl("verify_block", &verify_block); }

}  // namespace dflash
