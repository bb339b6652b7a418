// Device code of the CUDA kernel of moe::shuffle_mul_sum: staging, accumulate, store, the kernel, and
// the grid / block choice of a launch as a pure function. One source for two builds:
//   * nvcc, from shuffle_mul_sum_cuda.cu (the library);
//   * g++ as host C++17, from the CPU grid emulator of the tests (tests/cuda_emulator/), which defines
//     the CUDA builtins (threadIdx, __syncthreads, __ballot_sync, ...) before including this file, so
//     that CI executes this very code without a GPU.
// So: CUDA builtins only as the emulator maps them, shared memory only through FMO_SHARED, and
// nothing here that needs the CUDA runtime or torch's library (shuffle_mul_sum.h is included first:
// Half, BFloat16, the option enums, round_factor).
//
// The PLANT_* switches exist for the emulator's own tests (tests/test_cuda_emulated.py) and the
// machine-code tests (tests/test_gpu_codegen.py): each puts back one bug the emulator or the
// machine-code check must catch. Nothing defines them in a real build.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <type_traits>

// A block's shared array. Under the emulator a per-block heap array filled with 0xFF bytes (NaN,
// -1) and freed when the block ends, so reading a slot nobody wrote, or past the end, shows.
#if defined(__CUDACC__)
#define FMO_SHARED(T, name, n) __shared__ T name[n]
#elif !defined(FMO_SHARED)
#error "shuffle_mul_sum_cuda_device.cuh: host builds go through tests/cuda_emulator/cuda_emulator.h"
#endif

namespace fused_moe_ops {
namespace cuda_kernel {

constexpr int kMaxThreads = 128;
// Slots staged per step: every real router's topk in one step; more in several (3 KiB of shared memory).
constexpr int kChunk = 256;
constexpr int kPad = 4;  // slack after the staged slots for reads the compiler vectorises

// alignas: what lets nvcc read and write a Pack with one 16-byte access (ld.global.v4).
#if defined(PLANT_PACK_UNALIGNED)  // the alignment dropped: nvcc splits every row load
template <typename T, int N>
struct Pack {
  T v[N];
};
#else
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};
#endif

enum FloatKind : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

__device__ __forceinline__ float load_float(const void* f, int kind, int64_t off) {
  if (kind == kF32) return static_cast<const float*>(f)[off];
  if (kind == kF16) return static_cast<float>(static_cast<const Half*>(f)[off]);
  return static_cast<float>(static_cast<const BFloat16*>(f)[off]);
}

struct Params {
  const void* input;
  int64_t input_row_stride;  // elements
  int64_t rows;              // R
  const void* perm;          // nullptr: identity
  bool perm_is_int32;
  int64_t perm_stride_row, perm_stride_slot;  // entry (i, j) at perm[i * row + j * slot]
  const void* factors;
  int factor_kind;
  int64_t factor_stride0, factor_stride1;
  bool factors_per_row;      // factors[p * factor_stride0]
  int negative_index;        // NegativeIndex
  int factor_round;          // FactorRound
  float scale;
  const void* addend;        // nullptr: none; (M, K), last dim dense
  const bool* row_mask;      // nullptr: none; true: the row reads as zeros (adds 0 * factor)
  int64_t row_mask_stride;
  int addend_kind;
  int64_t addend_row_stride;
  bool addend_vec;           // addend has the input's dtype and allows the VEC-wide load
  void* out;
  int64_t out_row_stride;
  int64_t topk;
  int64_t k;
};

// Warp 0 stages slots [j0, j0 + chunk) of row i: the live (row, factor) pairs, compacted, into
// s_rows / s_w; returns their count to lane 0 through *s_live. Out-of-range entries assert.
// A row_mask'ed row reads as zeros: it adds 0 * factor, i.e. nothing, or NaN for a NaN/inf factor
// (eager's masked_fill-then-multiply); *s_nan records that (sticky over the chunks of one row).
__device__ __forceinline__ void stage_slots(const Params& P, int64_t i, int64_t j0, int64_t chunk, int64_t* s_rows,
                                            float* s_w, int* s_live, int* s_nan) {
  const unsigned lane = threadIdx.x;
  int live = 0;
  bool nan_hit = false;
  for (int64_t base = 0; base < chunk; base += 32) {
    const int64_t j = j0 + base + lane;
    int64_t p = -1;
    float w = 0.f;
    if (base + lane < chunk) {
      const int64_t pos = i * P.topk + j;
      const int64_t perm_off = i * P.perm_stride_row + j * P.perm_stride_slot;
      if (!P.factors_per_row) {  // issued before the permutation load resolves: one round trip
        w = load_float(P.factors, P.factor_kind, i * P.factor_stride0 + j * P.factor_stride1);
      }
      if (P.perm == nullptr) {
        p = pos;
      } else {
        p = P.perm_is_int32 ? static_cast<int64_t>(static_cast<const int32_t*>(P.perm)[perm_off])
                            : static_cast<const int64_t*>(P.perm)[perm_off];
      }
      const int64_t lowest = P.negative_index == kWrapNegative ? -P.rows : 0;
      const bool bad = p >= P.rows || (P.negative_index != kSkipNegative && p < lowest);
      if (bad) {
        printf("moe::shuffle_mul_sum: permutation[%lld] = %lld is out of range: input has %lld rows\n",
               static_cast<long long>(pos), static_cast<long long>(p), static_cast<long long>(P.rows));
      }
      assert(!bad && "moe::shuffle_mul_sum: permutation entry out of range");
      if (bad) {
        p = -1;  // never read out of range, even where device asserts are compiled out
      } else if (p < 0 && P.negative_index == kWrapNegative) {
        p += P.rows;
      }
      if (p >= 0) {
        if (P.factors_per_row) w = load_float(P.factors, P.factor_kind, p * P.factor_stride0);
        w = round_factor(w, P.factor_round);
        if (P.row_mask != nullptr && P.row_mask[p * P.row_mask_stride]) {
          nan_hit = nan_hit || !isfinite(w);
          p = -1;
        }
      }
    }
    const bool valid = p >= 0;
#if defined(PLANT_BALLOT_MASK_DROPS_LANES)
    const unsigned ballot = __ballot_sync(0x0000ffffu, valid);
#else
    const unsigned ballot = __ballot_sync(0xffffffffu, valid);
#endif
    if (valid) {
      const int slot = live + __popc(ballot & ((1u << lane) - 1u));
      s_rows[slot] = p;
      s_w[slot] = w;
    }
    live += __popc(ballot);
  }
  const bool any_nan = __any_sync(0xffffffffu, nan_hit);
  if (lane == 0) {
#if defined(PLANT_SLOT_COUNT_OFF_BY_ONE)
    *s_live = live + 1;
#else
    *s_live = live;
#endif
    *s_nan = (j0 == 0 ? 0 : *s_nan) | (any_nan ? 1 : 0);
  }
}

// The element offset of input row `row`: int64 (R*K can exceed 2^31).
__device__ __forceinline__ int64_t row_offset(int64_t row, int64_t row_stride) {
#if defined(PLANT_ROW_OFFSET_32_BIT)
  return static_cast<int32_t>(static_cast<uint32_t>(row) * static_cast<uint32_t>(row_stride));
#else
  return row * row_stride;
#endif
}

// acc += w * x for one staged slot: one fused multiply-add (the gather kernel), or, with kRoundProducts,
// the product rounded to float32 before the add (the scatter form's contract: bitwise the float32
// reference's `input * factors` then index_add_; __fmul_rn / __fadd_rn are never contracted into an FMA).
template <bool kRoundProducts>
__device__ __forceinline__ float multiply_add(float w, float x, float acc) {
  if (kRoundProducts) return __fadd_rn(acc, __fmul_rn(w, x));
  return fmaf(w, x, acc);
}

template <typename in_t, int VEC, bool kRoundProducts = false>
__device__ __forceinline__ void accumulate(const Params& P, const int64_t* s_rows, const float* s_w, int n,
                                           int64_t c, float (&acc)[VEC]) {
  const in_t* __restrict__ input = static_cast<const in_t*>(P.input);
  int s = 0;
  // Four slots per step: four independent loads in flight per thread.
  for (; s + 4 <= n; s += 4) {
    Pack<in_t, VEC> x[4];
#pragma unroll
    for (int u = 0; u < 4; ++u)
      x[u] = *reinterpret_cast<const Pack<in_t, VEC>*>(input + row_offset(s_rows[s + u], P.input_row_stride) + c);
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const float w = s_w[s + u];
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[v] = multiply_add<kRoundProducts>(w, static_cast<float>(x[u].v[v]), acc[v]);
    }
  }
  for (; s < n; ++s) {
    const Pack<in_t, VEC> x =
        *reinterpret_cast<const Pack<in_t, VEC>*>(input + row_offset(s_rows[s], P.input_row_stride) + c);
#if defined(PLANT_STAGING_UNPADDED)  // the tail's weight read four wide, as a vectorising compiler may
    float w4[4];
    memcpy(w4, s_w + s, sizeof w4);
    const float w = w4[0];
#else
    const float w = s_w[s];
#endif
#pragma unroll
    for (int v = 0; v < VEC; ++v) acc[v] = multiply_add<kRoundProducts>(w, static_cast<float>(x.v[v]), acc[v]);
  }
}

// out = scale * acc + addend, rounded once.
template <typename in_t, typename out_t, int VEC>
__device__ __forceinline__ void store(const Params& P, int64_t i, int64_t c, float (&acc)[VEC]) {
  if (P.scale != 1.f) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) acc[v] *= P.scale;
  }
  if (P.addend != nullptr) {
    const int64_t off = i * P.addend_row_stride + c;
    if (P.addend_vec) {
      const Pack<in_t, VEC> b = *reinterpret_cast<const Pack<in_t, VEC>*>(static_cast<const in_t*>(P.addend) + off);
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[v] += static_cast<float>(b.v[v]);
    } else {
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[v] += load_float(P.addend, P.addend_kind, off + v);
    }
  }
  Pack<out_t, VEC> y;
#pragma unroll
  for (int v = 0; v < VEC; ++v) y.v[v] = static_cast<out_t>(acc[v]);
  *reinterpret_cast<Pack<out_t, VEC>*>(static_cast<out_t*>(P.out) + i * P.out_row_stride + c) = y;
}

template <typename in_t, typename out_t, int VEC>
__global__ void __launch_bounds__(kMaxThreads) shuffle_mul_sum_kernel(const Params P) {
#if defined(PLANT_STAGING_UNPADDED)  // one exact allocation, as the dynamic shared memory once was
  const int64_t slots = P.topk < kChunk ? P.topk : kChunk;
  FMO_SHARED(unsigned char, s_stage, slots * (sizeof(int64_t) + sizeof(float)));
  int64_t* const s_rows = reinterpret_cast<int64_t*>(s_stage);
  float* const s_w = reinterpret_cast<float*>(s_stage + slots * sizeof(int64_t));
#else
  // Static and padded: a vectorised read past the last staged slot stays inside the allocation
  // (compute-sanitizer found exactly that read past a 12-byte dynamic allocation at topk = 1).
  FMO_SHARED(int64_t, s_rows, kChunk + kPad);
  FMO_SHARED(float, s_w, kChunk + kPad);
#endif
  FMO_SHARED(int, s_live, 1);
  FMO_SHARED(int, s_nan, 1);

  const int64_t i = blockIdx.x;
  const bool one_chunk = P.topk <= kChunk;
#if defined(PLANT_S_NAN_BEFORE_BARRIER)
  int nan_early = 0;
#endif
  if (one_chunk) {  // the common case: stage once, then walk every column this block owns
    if (threadIdx.x < 32) stage_slots(P, i, 0, P.topk, s_rows, s_w, s_live, s_nan);
#if defined(PLANT_S_NAN_BEFORE_BARRIER)
    nan_early = s_nan[0];
#endif
#if !defined(PLANT_NO_SYNCTHREADS_AFTER_STAGING)
    __syncthreads();
#endif
  }
  const int64_t block_cols = static_cast<int64_t>(blockDim.x) * VEC;
  const int64_t col_step = gridDim.y * block_cols;
  // Uniform over the block (every thread runs every step), so the chunked path may synchronise.
  for (int64_t c_block = blockIdx.y * block_cols; c_block < P.k; c_block += col_step) {
    const int64_t c = c_block + static_cast<int64_t>(threadIdx.x) * VEC;
    float acc[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) acc[v] = 0.f;
    if (one_chunk) {
      if (c < P.k) accumulate<in_t, VEC>(P, s_rows, s_w, s_live[0], c, acc);
    } else {
      for (int64_t j0 = 0; j0 < P.topk; j0 += kChunk) {
        __syncthreads();  // the previous chunk's slots are no longer read
        if (threadIdx.x < 32) stage_slots(P, i, j0, std::min<int64_t>(kChunk, P.topk - j0), s_rows, s_w, s_live, s_nan);
        __syncthreads();
        if (c < P.k) accumulate<in_t, VEC>(P, s_rows, s_w, s_live[0], c, acc);
      }
    }
#if defined(PLANT_S_NAN_BEFORE_BARRIER)
    if (one_chunk ? nan_early : s_nan[0]) {
#else
    if (s_nan[0]) {  // read after the __syncthreads that follows the last staging
#endif
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[v] = __int_as_float(0x7fc00000);
    }
    if (c < P.k) store<in_t, out_t, VEC>(P, i, c, acc);
  }
}

// ---- the launch shape: host code, a pure function of the call, shared by both builds ---------------

inline bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

template <typename T>
constexpr int kind_of() {
  return std::is_same<T, float>::value ? kF32 : (std::is_same<T, Half>::value ? kF16 : kBF16);
}

struct LaunchShape {
  bool vec;            // the VEC-wide (16-byte) instantiation, else VEC = 1
  bool addend_vec;     // Params::addend_vec
  int threads;         // blockDim.x
  int64_t slices;      // gridDim.y (gridDim.x = M)
};

// Decode (few tokens) is latency-bound: spread a row over many small blocks, down to one warp each,
// until the grid has ~2 blocks per SM. Many tokens: full blocks, one per row.
template <typename in_t, typename out_t>
LaunchShape choose_launch(const Params& P, int64_t m, int64_t sms) {
  constexpr int kVec = 16 / sizeof(in_t);  // 16-byte loads: 8 x bf16/fp16, 4 x fp32
  LaunchShape L{};
  L.vec = P.k % kVec == 0 && P.input_row_stride % kVec == 0 && P.out_row_stride % kVec == 0 &&
          aligned(P.input, 16) && aligned(P.out, sizeof(out_t) * kVec);
  const int vec = L.vec ? kVec : 1;
  L.addend_vec = P.addend != nullptr && P.addend_kind == kind_of<in_t>() &&
                 (!L.vec || (aligned(P.addend, 16) && P.addend_row_stride % kVec == 0));
  const int64_t vectors = (P.k + vec - 1) / vec;
  int threads = kMaxThreads;
  auto div_up = [](int64_t a, int64_t b) { return (a + b - 1) / b; };
  while (threads > 32 && m * div_up(vectors, threads) < 2 * sms) threads /= 2;
  while (threads > 32 && threads / 2 >= vectors) threads /= 2;  // no idle warps on a short row
  const int64_t slices_needed = div_up(vectors, threads);
  const int64_t want_slices = div_up(4 * sms, m);  // ~4 blocks per SM in all
  L.threads = threads;
  L.slices = std::max<int64_t>(1, std::min<int64_t>({slices_needed, want_slices, 65535}));
  return L;
}

}  // namespace cuda_kernel
}  // namespace fused_moe_ops
