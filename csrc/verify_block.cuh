// SPDX-License-Identifier: Apache-2.0
// verify_block device code: tree-free verification of one drafted block per request, greedy or rejection
// sampling, plus the stop-token / budget cut and the KV slot bookkeeping, in one launch.
// Spec: dflash_sglang/ops/reference.py::verify_block_ref.
//
// Greedy: one warp per request; lane j owns block position j (block size <= 32): acceptance by ballot,
// stop-token match, outputs. Sampling: a cluster of 1..8 CTAs per request (more for small batches); warp 0
// of each CTA judges the drafts (u * q < p), then the cluster draws the bonus token by inverse CDF over the
// vocabulary (sample_inverse_cdf_cluster: a summing pass split over the cluster's warps with 16-byte loads,
// then a block-scan pass over the one segment holding the crossing), and rank 0's warp 0 writes the outputs.
//
// Precision: acceptance (u * q < p) is evaluated in fp64, which is exact for fp32 inputs, as the reference
// does with Python floats. Weight sums are accumulated in fp64; the reference's fp32 cumsum can land a
// different token when u * total falls within its rounding error of a CDF step (see the tests).
#pragma once

#include <cooperative_groups.h>

#include <cstdint>

namespace dflash {

constexpr int kMaxBlockSize = 32;
constexpr int kSampleThreads = 512;
constexpr int kMaxClusterSize = 8;  // the portable thread block cluster size

struct VerifyBlockParams {
  const int64_t* block_tokens;  // [bs, B]
  const int64_t* target_ids;    // [bs, B] (greedy)
  const float* target_probs;    // [bs, B, V] (sampling)
  const float* draft_probs;     // [bs, B-1, V] (sampling)
  const float* uniforms;        // [bs, B] (sampling)
  const int64_t* block_slots;   // [bs, B]
  const int64_t* prefix_lens;   // [bs]
  const int64_t* stop_ids;      // [bs, S], -1 padded
  const int64_t* budgets;       // [bs]
  int32_t* num_accepted;        // [bs]
  int32_t* num_emitted;         // [bs]
  int64_t* emitted;             // [bs, B]
  int64_t* keep_slots;          // [bs, B]
  int64_t* free_slots;          // [bs, B]
  int64_t* new_prefix_lens;     // [bs]
  bool* finished;               // [bs]
  int block_size;
  int num_stop_ids;
  int vocab_size;
  int cluster_size;    // sampling: CTAs per request, a power of 2 in [1, kMaxClusterSize]
  bool probs_aligned;  // every probs row starts 16-byte aligned (V % 4 == 0 and aligned bases)
};

__device__ __forceinline__ float4 load_probs4(const float* __restrict__ row, int idx, int vocab, bool aligned) {
  if (aligned && idx + 3 < vocab) return __ldg(reinterpret_cast<const float4*>(row + idx));
  float4 r;
  r.x = idx < vocab ? __ldg(row + idx) : 0.f;
  r.y = idx + 1 < vocab ? __ldg(row + idx + 1) : 0.f;
  r.z = idx + 2 < vocab ? __ldg(row + idx + 2) : 0.f;
  r.w = idx + 3 < vocab ? __ldg(row + idx + 3) : 0.f;
  return r;
}

// The sampling weights of 4 consecutive tokens: max(0, p - q) (residual) or p, in fp64.
__device__ __forceinline__ void weights4(float4 p, float4 q, bool residual, double (&w)[4]) {
  const float pv[4] = {p.x, p.y, p.z, p.w};
  const float qv[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    w[k] = residual ? fmax(0.0, static_cast<double>(pv[k]) - static_cast<double>(qv[k])) : static_cast<double>(pv[k]);
  }
}

template <typename T>
__device__ __forceinline__ T warp_sum(T x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

__device__ __forceinline__ int warp_max(int x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x = max(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

// Cluster helpers: a request's CTAs form one thread block cluster (sm_90). Built for an older arch (never
// run there: the extension requires sm_90), the cluster is always one CTA.
__device__ __forceinline__ void cluster_sync() {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
  cooperative_groups::this_cluster().sync();
#else
  __syncthreads();
#endif
}

template <typename T>
__device__ __forceinline__ T* cluster_smem(T* local, int rank) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
  return cooperative_groups::this_cluster().map_shared_rank(local, rank);
#else
  return local;
#endif
}

// Inverse-CDF sample over weights derived from rows p (and q): the first token whose running weight sum
// exceeds u * sum(weights), else the last token with nonzero weight (rounding). Weights are max(0, p - q)
// when q is given and they sum to > 0, else p (the reference's residual fallback); -1 if all are 0.
// Called by every thread of the `cluster_size` CTAs of one request (this one is `rank`); the token is
// stored into *result_rank0 (rank 0's shared memory) before the final cluster barrier.
//
// Pass 1: the vocab is cut into cluster_size * kWarps segments (multiples of kChunk); warp w of rank r sums
// segment r * kWarps + w. Rank-local shared memory -> cluster barrier -> every CTA gathers all segment sums
// and thread 0 derives totals and the crossing segment in one fixed order (identical in every CTA).
// Pass 2: the CTA owning that segment scans it tile by tile (block exclusive scan) to the crossing element,
// past the segment only when fp64 rounding differs between the passes.
__device__ void sample_inverse_cdf_cluster(const float* __restrict__ p, const float* __restrict__ q, double u,
                                           int vocab, bool aligned, int rank, int cluster_size,
                                           int64_t* result_rank0) {
  constexpr int kWarps = kSampleThreads / 32;
  constexpr int kChunk = 32 * 4;  // elements a warp covers per step
  constexpr int kUnroll = 4;      // steps whose loads are in flight together
  constexpr int kTile = kSampleThreads * 4;
  constexpr int kMaxSegments = kMaxClusterSize * kWarps;
  __shared__ double s_segment_residual[kWarps], s_segment_p[kWarps];
  __shared__ int s_last_residual[kWarps], s_last_p[kWarps];
  __shared__ double s_all_residual[kMaxSegments], s_all_p[kMaxSegments];
  __shared__ int s_all_last_residual[kMaxSegments], s_all_last_p[kMaxSegments];
  __shared__ double s_warp_sums[kWarps];
  __shared__ double s_offset, s_threshold;
  __shared__ int s_start_segment, s_last_nonzero, s_found;
  __shared__ bool s_residual;

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const bool has_q = q != nullptr;
  const int num_segments = cluster_size * kWarps;
  const int segment = ((vocab + num_segments - 1) / num_segments + kChunk - 1) / kChunk * kChunk;

  // Pass 1.
  const int seg_begin = min(vocab, (rank * kWarps + warp) * segment);
  const int seg_end = min(vocab, seg_begin + segment);
  double sum_residual = 0.0, sum_p = 0.0;
  int last_residual = -1, last_p = -1;
  for (int base = seg_begin + lane * 4; base < seg_end; base += kChunk * kUnroll) {
    float4 pv[kUnroll], qv[kUnroll];
#pragma unroll
    for (int s = 0; s < kUnroll; ++s) {
      const int idx = base + s * kChunk;
      pv[s] = idx < seg_end ? load_probs4(p, idx, vocab, aligned) : make_float4(0.f, 0.f, 0.f, 0.f);
      qv[s] = has_q && idx < seg_end ? load_probs4(q, idx, vocab, aligned) : make_float4(0.f, 0.f, 0.f, 0.f);
    }
#pragma unroll
    for (int s = 0; s < kUnroll; ++s) {
      const int idx = base + s * kChunk;
      double w_residual[4], w_p[4];
      weights4(pv[s], qv[s], has_q, w_residual);
      weights4(pv[s], qv[s], false, w_p);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        sum_residual += w_residual[k];
        sum_p += w_p[k];
        if (w_residual[k] > 0.0) last_residual = idx + k;
        if (w_p[k] > 0.0) last_p = idx + k;
      }
    }
  }
  sum_residual = warp_sum(sum_residual);
  sum_p = warp_sum(sum_p);
  last_residual = warp_max(last_residual);
  last_p = warp_max(last_p);
  if (lane == 0) {
    s_segment_residual[warp] = sum_residual;
    s_segment_p[warp] = sum_p;
    s_last_residual[warp] = last_residual;
    s_last_p[warp] = last_p;
  }
  cluster_sync();  // every rank's segment sums are written (also a CTA barrier)

  // Gather all segment sums (one distributed shared memory read per thread), then thread 0 decides.
  if (tid < num_segments) {
    const int r = tid / kWarps, w = tid % kWarps;
    s_all_residual[tid] = *cluster_smem(&s_segment_residual[w], r);
    s_all_p[tid] = *cluster_smem(&s_segment_p[w], r);
    s_all_last_residual[tid] = *cluster_smem(&s_last_residual[w], r);
    s_all_last_p[tid] = *cluster_smem(&s_last_p[w], r);
  }
  __syncthreads();
  if (tid == 0) {
    double total_residual = 0.0;
    for (int s = 0; s < num_segments; ++s) total_residual += s_all_residual[s];
    const bool residual = has_q && total_residual > 0.0;
    const double* sums = residual ? s_all_residual : s_all_p;
    const int* lasts = residual ? s_all_last_residual : s_all_last_p;
    double total = 0.0;
    int last_nonzero = -1;
    for (int s = 0; s < num_segments; ++s) {
      total += sums[s];
      last_nonzero = max(last_nonzero, lasts[s]);
    }
    const double threshold = u * total;
    int start = 0;
    double offset = 0.0;
    while (start < num_segments && !(offset + sums[start] > threshold)) offset += sums[start++];
    s_residual = residual;
    s_threshold = threshold;
    s_offset = offset;
    s_start_segment = start;
    s_last_nonzero = last_nonzero;
  }
  __syncthreads();
  const int start_segment = s_start_segment;
  const int owner = start_segment < num_segments ? start_segment / kWarps : 0;
  if (rank == owner) {
    int result = s_last_nonzero;  // when the running sum never exceeds the threshold
    if (start_segment < num_segments) {
      const bool residual = s_residual;
      const double threshold = s_threshold;
      double offset = s_offset;
      for (int tile = start_segment * segment; tile < vocab; tile += kTile) {
        if (tid == 0) s_found = INT32_MAX;
        const int idx = tile + tid * 4;
        const float4 pv = load_probs4(p, idx, vocab, aligned);
        const float4 qv = has_q ? load_probs4(q, idx, vocab, aligned) : make_float4(0.f, 0.f, 0.f, 0.f);
        double w[4], partial[4];
        weights4(pv, qv, residual, w);
        partial[0] = w[0];
#pragma unroll
        for (int k = 1; k < 4; ++k) partial[k] = partial[k - 1] + w[k];
        // Block exclusive scan of the per-thread sums partial[3].
        double inclusive = partial[3];
#pragma unroll
        for (int delta = 1; delta < 32; delta *= 2) {
          const double up = __shfl_up_sync(0xffffffffu, inclusive, delta);
          if (lane >= delta) inclusive += up;
        }
        double exclusive = __shfl_up_sync(0xffffffffu, inclusive, 1);
        if (lane == 0) exclusive = 0.0;
        if (lane == 31) s_warp_sums[warp] = inclusive;
        __syncthreads();
        double tile_total = 0.0;
        for (int w_i = 0; w_i < kWarps; ++w_i) {
          if (w_i == warp) exclusive += tile_total;
          tile_total += s_warp_sums[w_i];
        }
        int candidate = INT32_MAX;
#pragma unroll
        for (int k = 3; k >= 0; --k) {
          if (w[k] > 0.0 && offset + (exclusive + partial[k]) > threshold) candidate = idx + k;
        }
        if (candidate != INT32_MAX) atomicMin(&s_found, candidate);
        __syncthreads();
        const int found = s_found;
        __syncthreads();  // s_found and s_warp_sums are rewritten by the next tile
        if (found != INT32_MAX) {
          result = found;
          break;
        }
        offset += tile_total;
      }
    }
    if (tid == 0) *cluster_smem(result_rank0, 0) = result;
  }
  cluster_sync();  // the token is in rank 0's shared memory; no rank's shared memory is read after this
}

// One CTA per request. kGreedy: one warp; sampling: kSampleThreads threads.
template <bool kGreedy>
__global__ void __launch_bounds__(kGreedy ? 32 : kSampleThreads, kGreedy ? 1 : 2)
    verify_block_kernel(const VerifyBlockParams p) {
  // Sampling: the cluster_size CTAs of a cluster share one request (rank = position in the cluster).
  const int cluster_size = kGreedy ? 1 : p.cluster_size;
  const int i = blockIdx.x / cluster_size;
  const int rank = blockIdx.x % cluster_size;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int B = p.block_size;
  const int64_t row = static_cast<int64_t>(i) * B;
  const int64_t* tokens = p.block_tokens + row;
  __shared__ int s_accepted;
  __shared__ int64_t s_bonus;

  // Acceptance: lane j judges draft d_{j+1} against position j; accepted = the leading run of accepts.
  if (warp == 0) {
    bool accept = false;
    if (lane < B - 1) {
      const int64_t draft = tokens[lane + 1];
      if constexpr (kGreedy) {
        accept = draft == p.target_ids[row + lane];
      } else {
        double target = 0.0, proposal = 0.0;  // a draft outside the vocab has p = q = 0: rejected
        if (draft >= 0 && draft < p.vocab_size) {
          target = p.target_probs[(row + lane) * p.vocab_size + draft];
          proposal = p.draft_probs[(static_cast<int64_t>(i) * (B - 1) + lane) * p.vocab_size + draft];
        }
        accept = static_cast<double>(p.uniforms[row + lane]) * proposal < target;
      }
    }
    const unsigned accepts = __ballot_sync(0xffffffffu, accept);
    // Bit B-1 of `accepts` is clear (lane B-1 judges nothing), so this is in [0, B-1].
    const int accepted = __ffs(~accepts) - 1;
    if (lane == 0) {
      s_accepted = accepted;
      if constexpr (kGreedy) s_bonus = p.target_ids[row + accepted];
    }
  }
  __syncthreads();
  const int accepted = s_accepted;

  if constexpr (!kGreedy) {
    // Rejected at position a: residual max(0, p_a - q_a); all accepted: p_{B-1}.
    const bool rejected = accepted < B - 1;
    const float* target_row = p.target_probs + (row + accepted) * p.vocab_size;
    const float* draft_row =
        rejected ? p.draft_probs + (static_cast<int64_t>(i) * (B - 1) + accepted) * p.vocab_size : nullptr;
    const double u = static_cast<double>(p.uniforms[row + B - 1]);
    sample_inverse_cdf_cluster(target_row, draft_row, u, p.vocab_size, p.probs_aligned, rank, cluster_size, &s_bonus);
  }
  if (warp != 0 || rank != 0) return;

  // Emitted tokens [d1..da, bonus], cut after the first stop token and to the budget.
  const int num_tokens = accepted + 1;
  const int64_t token = lane < accepted ? tokens[lane + 1] : (lane == accepted ? s_bonus : -1);
  bool is_stop = false;
  if (lane < num_tokens) {
    const int64_t* stops = p.stop_ids + static_cast<int64_t>(i) * p.num_stop_ids;
    for (int s = 0; s < p.num_stop_ids; ++s) {
      const int64_t stop = stops[s];
      is_stop |= stop >= 0 && stop == token;
    }
  }
  const unsigned stop_mask = __ballot_sync(0xffffffffu, is_stop);
  const int stop_at = stop_mask ? __ffs(stop_mask) - 1 : -1;
  const int64_t budget = p.budgets[i];
  int64_t n = num_tokens;
  if (budget < n) n = budget;
  if (stop_at >= 0 && stop_at + 1 < n) n = stop_at + 1;
  if (n < 0) n = 0;
  // t0's KV and that of every emitted draft but the last stay (see the reference).
  const int64_t kept = n > 1 ? n : 1;
  if (lane < B) {
    const int64_t slot = p.block_slots[row + lane];
    p.emitted[row + lane] = lane < n ? token : -1;
    p.keep_slots[row + lane] = lane < kept ? slot : -1;
    p.free_slots[row + lane] = lane < kept ? -1 : slot;
  }
  if (lane == 0) {
    p.num_accepted[i] = accepted;
    p.num_emitted[i] = static_cast<int32_t>(n);
    p.new_prefix_lens[i] = p.prefix_lens[i] + kept;
    p.finished[i] = n >= budget || (stop_at >= 0 && stop_at < n);
  }
}

}  // namespace dflash
