// Device code of the CUDA kernel of moe::scatter_mul_sum (the scatter form of the combine):
//
//   out[t, :] = scale * sum_{r : index[r] = t} f(factors[r]) * input[r, :] + addend[t, :]
//
// in float32, each token's rows added in increasing r, rounded once. Three steps, none with an atomic
// whose order could change the result:
//   1. scatter_keys_kernel: key[r] = the destination token of row r (wrapped per negative_index), or
//      M (past the last token) for a skipped row; row_id[r] = r. An entry out of range trips a
//      device-side assert (and is given key M, so nothing is read for it).
//   2. a stable sort of (key, row_id) by key (host side: CUB's radix sort on the GPU, std::stable_sort
//      in the tests' emulator): each token's rows become one segment, in increasing r; skipped rows
//      gather at the end, past every segment.
//   3. scatter_segment_sum_kernel: block (t, slice) finds token t's segment [lower_bound(t),
//      lower_bound(t + 1)) in the sorted keys, stages the segment's row numbers and factors in shared
//      memory, kChunk at a time, and accumulates and stores as the gather kernel does (accumulate /
//      store of shuffle_mul_sum_cuda_device.cuh: VEC-wide 16-byte loads when the rows allow, the scalar
//      path otherwise), but with each product rounded to float32 before it is added (no FMA): the
//      result is bitwise the float32 reference's (`input * factors`, then index_add_ in r order), as
//      the CPU and Triton kernels' is. A segment of any length runs, in chunks.
//
// Like shuffle_mul_sum_cuda_device.cuh (included first), one source for nvcc and for the tests' CPU
// grid emulator: CUDA builtins only as the emulator maps them, shared memory only through FMO_SHARED.
#pragma once

#include "shuffle_mul_sum_cuda_device.cuh"

namespace fused_moe_ops {
namespace cuda_kernel {

// Step 1's arguments.
struct ScatterKeysParams {
  const void* index;      // (R,) int32 or int64, entry r at index[r * index_stride]
  int64_t index_stride;
  int64_t rows;           // R (< 2^31: row ids are int32)
  int64_t tokens;         // M (< 2^31: keys are uint32, M itself the sentinel)
  int negative_index;     // NegativeIndex
  uint32_t* keys;         // (R,) out
  int32_t* row_ids;       // (R,) out: r
};

template <typename index_t>
__global__ void __launch_bounds__(kMaxThreads) scatter_keys_kernel(const ScatterKeysParams P) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; r < P.rows; r += step) {
    int64_t t = static_cast<int64_t>(static_cast<const index_t*>(P.index)[r * P.index_stride]);
    const int64_t lowest = P.negative_index == kWrapNegative ? -P.tokens : 0;
    const bool bad = t >= P.tokens || (P.negative_index != kSkipNegative && t < lowest);
    if (bad) {
      printf("moe::scatter_mul_sum: index[%lld] = %lld is out of range: the result has %lld rows (num_tokens)\n",
             static_cast<long long>(r), static_cast<long long>(t), static_cast<long long>(P.tokens));
    }
    assert(!bad && "moe::scatter_mul_sum: index entry out of range");
    if (bad) {
      t = -1;  // skipped: never read, even where device asserts are compiled out
    } else if (t < 0 && P.negative_index == kWrapNegative) {
      t += P.tokens;
    }
#if defined(PLANT_SCATTER_SKIP_KEY_ZERO)  // a skipped row sent to token 0 instead of past the last token
    P.keys[r] = static_cast<uint32_t>(t < 0 ? 0 : t);
#else
    P.keys[r] = static_cast<uint32_t>(t < 0 ? P.tokens : t);
#endif
    P.row_ids[r] = static_cast<int32_t>(r);
  }
}

// Step 3's arguments: `combine` holds what accumulate / store read (input, its row stride, scale, the
// addend, out, K); the rest is the sorted (key, row) list and the factors.
struct SegmentSumParams {
  Params combine;
  const uint32_t* sorted_keys;  // (R,) ascending; skipped rows carry M
  const int32_t* sorted_rows;   // (R,) the row of each sorted key, increasing within a key
  int64_t rows;                 // R
  const void* factors;          // nullptr: every factor is 1
  int factor_kind;
  int64_t factor_stride;
  int factor_round;             // FactorRound
};

// The first sorted position whose key is >= t (R when none).
__device__ __forceinline__ int64_t segment_start(const uint32_t* keys, int64_t n, int64_t t) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
#if defined(PLANT_SEGMENT_UPPER_BOUND)  // upper_bound: each segment starts one token late
    if (static_cast<int64_t>(keys[mid]) <= t) {
#else
    if (static_cast<int64_t>(keys[mid]) < t) {
#endif
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// Every thread of the block stages sorted positions [first, first + n) (n <= kChunk): row numbers into
// s_rows, factors (rounded) into s_w.
__device__ __forceinline__ void stage_segment(const SegmentSumParams& S, int64_t first, int64_t n, int64_t* s_rows,
                                              float* s_w) {
  for (int64_t s = threadIdx.x; s < n; s += blockDim.x) {
    const int64_t row = S.sorted_rows[first + s];
    s_rows[s] = row;
    s_w[s] = S.factors == nullptr ? 1.f
                                  : round_factor(load_float(S.factors, S.factor_kind, row * S.factor_stride),
                                                 S.factor_round);
  }
}

template <typename in_t, typename out_t, int VEC>
__global__ void __launch_bounds__(kMaxThreads) scatter_segment_sum_kernel(const SegmentSumParams S) {
  // Static and padded, as the gather kernel's staging (a vectorised read past the last slot stays inside).
  FMO_SHARED(int64_t, s_rows, kChunk + kPad);
  FMO_SHARED(float, s_w, kChunk + kPad);
  FMO_SHARED(int64_t, s_segment, 2);

  const int64_t t = blockIdx.x;
  if (threadIdx.x < 2) s_segment[threadIdx.x] = segment_start(S.sorted_keys, S.rows, t + threadIdx.x);
  __syncthreads();
  const int64_t first = s_segment[0];
  const int64_t n = s_segment[1] - first;  // uniform over the block: every branch on it is too
  const bool one_chunk = n <= kChunk;
  if (one_chunk) {  // the common case: stage once, then walk every column this block owns
    stage_segment(S, first, n, s_rows, s_w);
#if !defined(PLANT_SCATTER_NO_SYNCTHREADS_AFTER_STAGING)
    __syncthreads();
#endif
  }
  const Params& P = S.combine;
  const int64_t block_cols = static_cast<int64_t>(blockDim.x) * VEC;
  const int64_t col_step = gridDim.y * block_cols;
  for (int64_t c_block = blockIdx.y * block_cols; c_block < P.k; c_block += col_step) {
    const int64_t c = c_block + static_cast<int64_t>(threadIdx.x) * VEC;
    float acc[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) acc[v] = 0.f;
    // Chunks in order: rows still added in increasing r. One chunk was staged above, once for every
    // column step; longer segments restage per chunk (uniform over the block: the barriers are safe).
    for (int64_t s0 = 0; s0 < n; s0 += kChunk) {
      const int64_t chunk = std::min<int64_t>(kChunk, n - s0);
      if (!one_chunk) {
        __syncthreads();  // the previous chunk's slots are no longer read
        stage_segment(S, first + s0, chunk, s_rows, s_w);
        __syncthreads();
      }
      if (c < P.k) accumulate<in_t, VEC, true>(P, s_rows, s_w, static_cast<int>(chunk), c, acc);
    }
    if (c < P.k) store<in_t, out_t, VEC>(P, t, c, acc);
  }
}

// ---- launch shapes: host code, pure functions of the call, shared by both builds ----------------------

// Step 1: 128-thread blocks over the rows, at most ~4 per SM (grid-stride beyond that).
inline int64_t scatter_keys_blocks(int64_t rows, int64_t sms) {
  const int64_t blocks = (rows + kMaxThreads - 1) / kMaxThreads;
  return std::max<int64_t>(1, std::min<int64_t>(blocks, 4 * std::max<int64_t>(sms, 1)));
}

// The sort's key width: keys run from 0 to M (the skip sentinel), so bit_width(M) bits order them.
inline int scatter_key_bits(int64_t tokens) {
  int bits = 1;
  while (bits < 32 && (int64_t{1} << bits) <= tokens) ++bits;
  return bits;
}

// Step 3: the gather kernel's shape for M output rows (its choose_launch reads only P's row layout).

}  // namespace cuda_kernel
}  // namespace fused_moe_ops
