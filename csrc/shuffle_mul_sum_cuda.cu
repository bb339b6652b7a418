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
// The scatter form (moe::scatter_mul_sum, _scatter_mul_sum_fused; scatter_cuda below): keys, a stable
// sort (CUB, scatter_sort_cuda.cu), a segment sum per token: deterministic, each token's rows added in
// increasing r, no atomics, no host sync; scratch from torch's allocator on the current stream.
//
// The device code and the choice of launch shape live in shuffle_mul_sum_cuda_device.cuh and
// scatter_mul_sum_cuda_device.cuh, which the tests' CPU grid emulator (tests/cuda_emulator/) also
// compiles and runs; this file holds the host side.
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

#include "scatter_mul_sum_cuda_device.cuh"  // and shuffle_mul_sum_cuda_device.cuh
#include "scatter_sort_cuda.h"

#include <algorithm>
#include <atomic>
#include <type_traits>
#include <cstdint>
#include <cstdio>
#include <limits>

namespace fused_moe_ops {
namespace {

using namespace cuda_kernel;  // the device code (shuffle_mul_sum_cuda_device.cuh)

// Whether this library holds code for the current GPU (machine code for its arch, or PTX it can JIT):
// a GPU older than every target (e.g. sm_75 against the default 8.0;9.0+PTX) has none, and a launch
// would fail with CUDA's "no kernel image is available". Checked once per device.
[[noreturn]] void fail_cuda(const char* what, cudaError_t err, const char* prefix = FMO_PREFIX) {
  (void)cudaGetLastError();  // not sticky: clear it
  fail(prefix, what, ": ", cudaGetErrorString(err));
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

cudaStream_t current_stream(int device) {
  void* stream_ptr = nullptr;
  shim_check(aoti_torch_get_current_cuda_stream(device, &stream_ptr), "aoti_torch_get_current_cuda_stream");
  return static_cast<cudaStream_t>(stream_ptr);
}

void check_launch(const char* prefix) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) fail(prefix, "CUDA kernel launch failed: ", cudaGetErrorString(err));
}

template <typename in_t, typename out_t>
void launch(const Params& base, int64_t m, int device) {
  constexpr int kVec = 16 / sizeof(in_t);
  Params P = base;
  const LaunchShape L = choose_launch<in_t, out_t>(P, m, multiprocessor_count(device));
  P.addend_vec = L.addend_vec;
  const dim3 grid(static_cast<unsigned>(m), static_cast<unsigned>(L.slices));
  const int threads = L.threads;
  const cudaStream_t stream = current_stream(device);
  if (L.vec) {
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

// ---- the scatter form ---------------------------------------------------------------------------

template <typename in_t, typename out_t>
void launch_segment_sum(const SegmentSumParams& base, int64_t m, int device, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(in_t);
  SegmentSumParams S = base;
  const LaunchShape L = choose_launch<in_t, out_t>(S.combine, m, multiprocessor_count(device));
  S.combine.addend_vec = L.addend_vec;
  const dim3 grid(static_cast<unsigned>(m), static_cast<unsigned>(L.slices));
  if (L.vec) {
    scatter_segment_sum_kernel<in_t, out_t, kVec><<<grid, L.threads, 0, stream>>>(S);
  } else {
    scatter_segment_sum_kernel<in_t, out_t, 1><<<grid, L.threads, 0, stream>>>(S);
  }
  check_launch(FMO_SCATTER_PREFIX);
}

// CUDA's allocations (and torch's caching allocator) are aligned far beyond this; each scratch array
// starts on its own 256-byte boundary, as CUB wants its temp storage.
constexpr int64_t kScratchAlign = 256;

int64_t align_up(int64_t bytes) { return (bytes + kScratchAlign - 1) / kScratchAlign * kScratchAlign; }

// The ScatterFn of shuffle_mul_sum.h: step 1 (keys, the range check) whenever the index has entries,
// steps 2 and 3 when the result has elements. Scratch (keys, row ids, their sorted copies, CUB's temp
// storage) is one byte tensor from torch's allocator: stream-ordered, freed when this call returns (the
// caching allocator reuses it only for work queued after these kernels), captured into a CUDA graph's
// pool under capture.
void scatter_cuda(const TensorRef& input, const IndexLayout& index, const std::optional<TensorRef>& factors,
                  const ScatterShape& s, const ScatterOptions& o, const TensorRef& dst) {
  const Place where = place_of(input);
  FMO_CHECK(where.type == aoti_torch_device_type_cuda(), FMO_SCATTER_PREFIX "the CUDA kernel got input on ",
            place_str(where));
  const bool sum = s.m > 0 && s.k > 0;
  // Where there is a result to write, M is the grid's x (and, as the skip sentinel, a uint32 key of the
  // sort); an empty result of any M (K = 0) only has its index checked, in int64.
  FMO_CHECK(!sum || s.m <= std::numeric_limits<int32_t>::max(),
            FMO_SCATTER_PREFIX "num_tokens must be < 2^31 on CUDA, got ", s.m);
  FMO_CHECK(s.rows <= std::numeric_limits<int32_t>::max(),  // row ids are int32
            FMO_SCATTER_PREFIX "the CUDA kernel takes input.shape[0] < 2^31 rows, got ", s.rows);
  if (s.rows == 0 && !sum) return;
  const torch::stable::accelerator::DeviceGuard guard(where.index);
  const int device = where.index;
  check_device_has_code(device);
  const cudaStream_t stream = current_stream(device);
  const int rows = static_cast<int>(s.rows);

  SegmentSumParams S{};
  S.rows = s.rows;
  std::optional<OwnedHandle> scratch;  // alive until every kernel reading it is queued
  if (rows > 0) {
    const int end_bit = scatter_key_bits(s.m);
    size_t sort_bytes = 0;
    if (sum) {
      const cudaError_t err = cuda_sort::sort_pairs_scratch_bytes(rows, end_bit, &sort_bytes);
      if (err != cudaSuccess) fail_cuda("cub::DeviceRadixSort::SortPairs (scratch size)", err, FMO_SCATTER_PREFIX);
    }
    const int64_t array = align_up(s.rows * 4);  // keys, row ids, sorted keys, sorted rows: 4 bytes each
    const int64_t bytes = (sum ? 4 : 2) * array + static_cast<int64_t>(sort_bytes);
    scratch.emplace(empty_rows_like(input, 1, bytes, ScalarType::Byte));
    char* const base = static_cast<char*>(TensorRef(scratch->get()).data_ptr());
    ScatterKeysParams K{};
    K.index = index.data;
    K.index_stride = index.stride;
    K.rows = s.rows;
    K.tokens = s.m;
    K.negative_index = static_cast<int>(o.negative_index);
    K.keys = reinterpret_cast<uint32_t*>(base);
    K.row_ids = reinterpret_cast<int32_t*>(base + array);
    const unsigned blocks = static_cast<unsigned>(scatter_keys_blocks(s.rows, multiprocessor_count(device)));
    if (index.is_int32) {
      scatter_keys_kernel<int32_t><<<blocks, kMaxThreads, 0, stream>>>(K);
    } else {
      scatter_keys_kernel<int64_t><<<blocks, kMaxThreads, 0, stream>>>(K);
    }
    check_launch(FMO_SCATTER_PREFIX);
    if (!sum) return;  // the range checked; nothing to write
    uint32_t* const sorted_keys = reinterpret_cast<uint32_t*>(base + 2 * array);
    int32_t* const sorted_rows = reinterpret_cast<int32_t*>(base + 3 * array);
    const cudaError_t err = cuda_sort::sort_pairs(base + 4 * array, sort_bytes, K.keys, sorted_keys, K.row_ids,
                                                  sorted_rows, rows, end_bit, stream);
    if (err != cudaSuccess) fail_cuda("cub::DeviceRadixSort::SortPairs", err, FMO_SCATTER_PREFIX);
    S.sorted_keys = sorted_keys;
    S.sorted_rows = sorted_rows;
  }
  // R = 0: every segment is empty (segment_start reads nothing): zeros, scaled, plus the addend.
  Params& P = S.combine;
  P.input = input.data_ptr();
  P.input_row_stride = input.stride(0);
  P.rows = s.rows;
  P.scale = o.scale;
  if (o.addend.has_value()) {
    P.addend = o.addend->data_ptr();
    P.addend_kind = float_kind(dtype_of(*o.addend));
    P.addend_row_stride = addend_row_stride(*o.addend);
  }
  P.out = dst.data_ptr();
  P.out_row_stride = dst.stride(0);
  P.k = s.k;
  if (factors.has_value()) {
    S.factors = factors->data_ptr();
    S.factor_kind = float_kind(dtype_of(*factors));
    S.factor_stride = factors->stride(0);
  }
  S.factor_round = static_cast<int>(o.factor_round);
  dispatch_float(dtype_of(input), [&](auto in_tag) {
    dispatch_float(dtype_of(dst), [&](auto out_tag) {
      launch_segment_sum<typename decltype(in_tag)::type, typename decltype(out_tag)::type>(S, s.m, device, stream);
    });
  });
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(moe, CUDA, m) {
  m.impl("shuffle_mul_sum", &boxed::functional<combine_cuda>);
  m.impl("shuffle_mul_sum.out", &boxed::out_variant<combine_cuda>);
  m.impl("_shuffle_mul_sum_fused", &boxed::fused<combine_cuda>);
  m.impl("scatter_mul_sum", &boxed::scatter<scatter_cuda>);
  m.impl("_scatter_mul_sum_fused", &boxed::scatter_fused<scatter_cuda>);
}

}  // namespace fused_moe_ops
