// CUDA kernel of moe::shuffle_mul_sum (the MoE combine step).
//
//   out[i, :] = sum_{j < topk, p = perm[i*topk+j] >= 0} factors[i, j] * input[p, :]
//
// and, for the internal op the fusion pass emits, the same with the options of CombineOptions
// (shuffle_mul_sum.h): negative entries wrapped or refused, factors rounded or read per input row,
// and out = scale * sum + addend, all in float32 before the one rounding.
//
// Grid: blockIdx.x = output row i (up to 2^31-1 tokens), blockIdx.y = column slice. With many
// tokens one block walks its whole row (gridDim.y = 1), so a row's permutation entries and
// factors are read exactly once; with few tokens (decode) the row is split over blockIdx.y, and
// blocks shrink to one warp, so that M = 1 still spreads over many SMs.
//
// Per block: warp 0 reads up to kChunk of the row's (index, factor) pairs, drops negative entries
// with a ballot and stages the live ones in shared memory; an entry out of range trips a device-side
// assert (and is never read). Every thread accumulates VEC columns in float32 registers over the
// staged slots, with 16-byte loads and stores when the rows allow (the scalar path, VEC = 1,
// handles K not a multiple of the vector, odd row strides and unaligned views); a topk above
// kChunk repeats that per chunk, so any topk runs. Offsets are int64 (R*K can exceed 2^31).
// Shared memory is static and padded, so no read, even a vectorised one past the last live slot,
// leaves the allocation. Launched on the current stream, no host sync, no launch for M = 0 or
// K = 0: safe inside CUDA graph capture.
//
// On torch's stable ABI, like the CPU kernel (shuffle_mul_sum.h): the current stream comes from
// aoti_torch_get_current_cuda_stream, device properties from cudaDeviceGetAttribute (cached).
#ifndef USE_CUDA
#define USE_CUDA  // declares the CUDA part of torch's C shim (aoti_torch_get_current_cuda_stream)
#endif
#include "shuffle_mul_sum.h"

#include <torch/csrc/stable/accelerator.h>

#include <cuda_runtime.h>

// Device-side asserts stay on in every build: an out-of-range entry must stop the kernel.
#undef NDEBUG
#include <cassert>

#include <algorithm>
#include <atomic>
#include <type_traits>
#include <cstdint>
#include <cstdio>
#include <limits>

namespace fused_moe_ops {
namespace {

constexpr int kMaxThreads = 128;
// Slots staged per step: every real router's topk in one step; more in several (3 KiB of shared memory).
constexpr int kChunk = 256;
constexpr int kPad = 4;  // slack after the staged slots for reads the compiler vectorises

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

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
    const unsigned ballot = __ballot_sync(0xffffffffu, valid);
    if (valid) {
      const int slot = live + __popc(ballot & ((1u << lane) - 1u));
      s_rows[slot] = p;
      s_w[slot] = w;
    }
    live += __popc(ballot);
  }
  const bool any_nan = __any_sync(0xffffffffu, nan_hit);
  if (lane == 0) {
    *s_live = live;
    *s_nan = (j0 == 0 ? 0 : *s_nan) | (any_nan ? 1 : 0);
  }
}

template <typename in_t, int VEC>
__device__ __forceinline__ void accumulate(const Params& P, const int64_t* s_rows, const float* s_w, int n,
                                           int64_t c, float (&acc)[VEC]) {
  const in_t* __restrict__ input = static_cast<const in_t*>(P.input);
  int s = 0;
  // Four slots per step: four independent loads in flight per thread.
  for (; s + 4 <= n; s += 4) {
    Pack<in_t, VEC> x[4];
#pragma unroll
    for (int u = 0; u < 4; ++u)
      x[u] = *reinterpret_cast<const Pack<in_t, VEC>*>(input + s_rows[s + u] * P.input_row_stride + c);
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const float w = s_w[s + u];
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[v] = fmaf(w, static_cast<float>(x[u].v[v]), acc[v]);
    }
  }
  for (; s < n; ++s) {
    const Pack<in_t, VEC> x = *reinterpret_cast<const Pack<in_t, VEC>*>(input + s_rows[s] * P.input_row_stride + c);
    const float w = s_w[s];
#pragma unroll
    for (int v = 0; v < VEC; ++v) acc[v] = fmaf(w, static_cast<float>(x.v[v]), acc[v]);
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
  // Static and padded: a vectorised read past the last staged slot stays inside the allocation
  // (compute-sanitizer found exactly that read past a 12-byte dynamic allocation at topk = 1).
  __shared__ int64_t s_rows[kChunk + kPad];
  __shared__ float s_w[kChunk + kPad];
  __shared__ int s_live;
  __shared__ int s_nan;

  const int64_t i = blockIdx.x;
  const bool one_chunk = P.topk <= kChunk;
  if (one_chunk) {  // the common case: stage once, then walk every column this block owns
    if (threadIdx.x < 32) stage_slots(P, i, 0, P.topk, s_rows, s_w, &s_live, &s_nan);
    __syncthreads();
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
      if (c < P.k) accumulate<in_t, VEC>(P, s_rows, s_w, s_live, c, acc);
    } else {
      for (int64_t j0 = 0; j0 < P.topk; j0 += kChunk) {
        __syncthreads();  // the previous chunk's slots are no longer read
        if (threadIdx.x < 32) stage_slots(P, i, j0, std::min<int64_t>(kChunk, P.topk - j0), s_rows, s_w, &s_live, &s_nan);
        __syncthreads();
        if (c < P.k) accumulate<in_t, VEC>(P, s_rows, s_w, s_live, c, acc);
      }
    }
    if (s_nan) {  // read after the __syncthreads that follows the last staging
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[v] = __int_as_float(0x7fc00000);
    }
    if (c < P.k) store<in_t, out_t, VEC>(P, i, c, acc);
  }
}

// Whether this library holds code for the current GPU (machine code for its arch, or PTX it can JIT):
// a GPU older than every target (e.g. sm_75 against the default 8.0;9.0+PTX) has none, and a launch
// would fail with CUDA's "no kernel image is available". Checked once per device.
[[noreturn]] void fail_cuda(const char* what, cudaError_t err) {
  (void)cudaGetLastError();  // not sticky: clear it
  fail(FMO_PREFIX, what, ": ", cudaGetErrorString(err));
}

int current_device() {
  int device = 0;
  const cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) fail_cuda("cudaGetDevice", err);
  return device;
}

constexpr int kMaxDevices = 64;

// The current GPU's SM count, read once per device (cudaDeviceGetAttribute: no full property query).
int64_t multiprocessor_count(int device) {
  static std::atomic<int> cached[kMaxDevices];
  if (device < kMaxDevices) {
    const int known = cached[device].load(std::memory_order_relaxed);
    if (known > 0) return known;
  }
  int sms = 0;
  const cudaError_t err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) fail_cuda("cudaDeviceGetAttribute", err);
  if (device < kMaxDevices) cached[device].store(sms, std::memory_order_relaxed);
  return sms;
}

void check_device_has_code(int device) {
  static std::atomic<int> state[kMaxDevices];  // 0 unknown, 1 has code, 2 has none
  if (device < kMaxDevices && state[device].load(std::memory_order_relaxed) == 1) return;
  cudaFuncAttributes attr;
  const cudaError_t err = cudaFuncGetAttributes(&attr, shuffle_mul_sum_kernel<float, float, 1>);
  if (err != cudaSuccess) (void)cudaGetLastError();  // not sticky: clear it
  if (device < kMaxDevices) state[device].store(err == cudaSuccess ? 1 : 2, std::memory_order_relaxed);
  if (err == cudaSuccess) return;
  cudaDeviceProp prop{};
  (void)cudaGetDeviceProperties(&prop, device);
  fail(FMO_PREFIX "the CUDA kernel has no code for this GPU (", prop.name, ", sm_", prop.major, prop.minor, "): ",
       cudaGetErrorString(err), ". Rebuild for it (TORCH_CUDA_ARCH_LIST=\"", prop.major, ".", prop.minor,
       "\" before importing fused_moe_ops) or use the Triton kernel (FUSED_MOE_OPS_CUDA_BACKEND=triton).");
}

inline bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

template <typename T>
constexpr int kind_of() {
  return std::is_same<T, float>::value ? kF32 : (std::is_same<T, Half>::value ? kF16 : kBF16);
}

template <typename in_t, typename out_t>
void launch(const Params& base, int64_t m, int device) {
  constexpr int kVec = 16 / sizeof(in_t);  // 16-byte loads: 8 x bf16/fp16, 4 x fp32
  Params P = base;
  const bool vec_ok = P.k % kVec == 0 && P.input_row_stride % kVec == 0 && P.out_row_stride % kVec == 0 &&
                      aligned(P.input, 16) && aligned(P.out, sizeof(out_t) * kVec);
  const int vec = vec_ok ? kVec : 1;
  P.addend_vec = P.addend != nullptr && P.addend_kind == kind_of<in_t>() &&
                 (!vec_ok || (aligned(P.addend, 16) && P.addend_row_stride % kVec == 0));
  const int64_t vectors = (P.k + vec - 1) / vec;
  const int64_t sms = multiprocessor_count(device);
  // Decode (few tokens) is latency-bound: spread a row over many small blocks, down to one warp
  // each, until the grid has ~2 blocks per SM. Many tokens: full blocks, one per row.
  int threads = kMaxThreads;
  auto div_up = [](int64_t a, int64_t b) { return (a + b - 1) / b; };
  while (threads > 32 && m * div_up(vectors, threads) < 2 * sms) threads /= 2;
  while (threads > 32 && threads / 2 >= vectors) threads /= 2;  // no idle warps on a short row
  const int64_t slices_needed = div_up(vectors, threads);
  const int64_t want_slices = div_up(4 * sms, m);  // ~4 blocks per SM in all
  const int64_t slices = std::max<int64_t>(1, std::min<int64_t>({slices_needed, want_slices, 65535}));
  const dim3 grid(static_cast<unsigned>(m), static_cast<unsigned>(slices));
  void* stream_ptr = nullptr;
  shim_check(aoti_torch_get_current_cuda_stream(device, &stream_ptr), "aoti_torch_get_current_cuda_stream");
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  if (vec_ok) {
    shuffle_mul_sum_kernel<in_t, out_t, kVec><<<grid, threads, 0, stream>>>(P);
  } else {
    shuffle_mul_sum_kernel<in_t, out_t, 1><<<grid, threads, 0, stream>>>(P);
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) fail(FMO_PREFIX "CUDA kernel launch failed: ", cudaGetErrorString(err));
}

int float_kind(ScalarType t) { return t == ScalarType::Float ? kF32 : (t == ScalarType::Half ? kF16 : kBF16); }

void combine_cuda(const TensorRef& input, const PermLayout& perm, const TensorRef& factors, const CombineShape& s,
                  const CombineOptions& o, const TensorRef& dst) {
  const Place where = place_of(input);
  FMO_CHECK(where.type == aoti_torch_device_type_cuda(), FMO_PREFIX "the CUDA kernel got input on ", place_str(where));
  FMO_CHECK(s.m <= std::numeric_limits<int32_t>::max(), FMO_PREFIX "M must be < 2^31, got ", s.m);
  if (s.m == 0 || s.k == 0) return;
  const torch::stable::accelerator::DeviceGuard guard(where.index);
  const int device = where.index;
  check_device_has_code(device);
  Params P{};
  P.input = input.data_ptr();
  P.input_row_stride = input.stride(0);
  P.rows = s.rows;
  P.perm = perm.data;
  P.perm_is_int32 = perm.is_int32;
  P.perm_stride_row = perm.stride_row;
  P.perm_stride_slot = perm.stride_slot;
  P.factors = factors.data_ptr();
  P.factor_kind = float_kind(dtype_of(factors));
  P.factor_stride0 = factors.stride(0);
  P.factor_stride1 = factors.dim() > 1 ? factors.stride(1) : 0;
  P.factors_per_row = o.factors_per_row;
  P.negative_index = static_cast<int>(o.negative_index);
  P.factor_round = static_cast<int>(o.factor_round);
  P.scale = o.scale;
  if (o.row_mask.has_value()) {
    P.row_mask = static_cast<const bool*>(o.row_mask->data_ptr());
    P.row_mask_stride = o.row_mask->stride(0);
  }
  if (o.addend.has_value()) {
    P.addend = o.addend->data_ptr();
    P.addend_kind = float_kind(dtype_of(*o.addend));
    P.addend_row_stride = addend_row_stride(*o.addend);
  }
  P.out = dst.data_ptr();
  P.out_row_stride = dst.stride(0);
  P.topk = s.topk;
  P.k = s.k;
  dispatch_float(dtype_of(input), [&](auto in_tag) {
    dispatch_float(dtype_of(dst), [&](auto out_tag) {
      launch<typename decltype(in_tag)::type, typename decltype(out_tag)::type>(P, s.m, device);
    });
  });
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(moe, CUDA, m) {
  m.impl("shuffle_mul_sum", &boxed::functional<combine_cuda>);
  m.impl("shuffle_mul_sum.out", &boxed::out_variant<combine_cuda>);
  m.impl("_shuffle_mul_sum_fused", &boxed::fused<combine_cuda>);
}

}  // namespace fused_moe_ops
