// CUDA kernel of moe::shuffle_mul_sum (the MoE combine step).
//
//   out[i, :] = sum_{j < topk, p = perm[i*topk+j] >= 0} factors[i, j] * input[p, :]
//
// Grid: blockIdx.x = output row i (up to 2^31-1 tokens), blockIdx.y = column slice. With many
// tokens one block walks its whole row (gridDim.y = 1), so a row's permutation entries and
// factors are read exactly once; with few tokens (decode) the row is split over blockIdx.y so
// that M = 1 still spreads over many SMs.
//
// Per block: warp 0 reads the row's topk (index, factor) pairs once, drops negative entries
// with a ballot and stages the live ones in shared memory; an entry >= R trips a device-side
// assert. Then every thread accumulates VEC columns in float32 registers over the live slots,
// with 16-byte loads and stores when the rows allow (the scalar path, VEC = 1, handles K not a
// multiple of the vector, odd row strides and unaligned views), and rounds once on the store.
// Offsets are int64 (R*K can exceed 2^31). Launched on the current stream, no host sync, no
// launch for M = 0 or K = 0: safe inside CUDA graph capture.
#include "shuffle_mul_sum.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>
#include <cstdio>

namespace fused_moe_ops {
namespace {

constexpr int kMaxThreads = 128;
constexpr int64_t kMaxTopk = 2048;  // shared memory: 12 bytes per slot

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

enum FactorKind : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

__device__ __forceinline__ float load_factor(const void* f, int kind, int64_t off) {
  if (kind == kF32) return static_cast<const float*>(f)[off];
  if (kind == kF16) return static_cast<float>(static_cast<const at::Half*>(f)[off]);
  return static_cast<float>(static_cast<const at::BFloat16*>(f)[off]);
}

struct Params {
  const void* input;
  int64_t input_row_stride;  // elements
  int64_t rows;              // R
  const void* perm;          // nullptr: identity
  bool perm_is_int32;
  int64_t perm_stride;
  const void* factors;
  int factor_kind;
  int64_t factor_stride0, factor_stride1;
  void* out;
  int64_t out_row_stride;
  int64_t topk;
  int64_t k;
};

template <typename in_t, typename out_t, int VEC>
__global__ void __launch_bounds__(kMaxThreads) shuffle_mul_sum_kernel(const Params P) {
  extern __shared__ int64_t s_rows[];  // [topk] live source rows, then [topk] float factors
  float* s_w = reinterpret_cast<float*>(s_rows + P.topk);
  __shared__ int s_live;

  const int64_t i = blockIdx.x;
  const in_t* __restrict__ input = static_cast<const in_t*>(P.input);
  out_t* __restrict__ out = static_cast<out_t*>(P.out);

  // Stage this row's live (row, factor) pairs once; warp 0 compacts them with a ballot.
  if (threadIdx.x < 32) {
    const unsigned lane = threadIdx.x;
    int live = 0;
    for (int64_t base = 0; base < P.topk; base += 32) {
      const int64_t j = base + lane;
      int64_t p = -1;
      float w = 0.f;
      if (j < P.topk) {
        const int64_t pos = i * P.topk + j;
        // Issued before the permutation load resolves: two independent loads, one round trip.
        w = load_factor(P.factors, P.factor_kind, i * P.factor_stride0 + j * P.factor_stride1);
        if (P.perm == nullptr) {
          p = pos;
        } else {
          p = P.perm_is_int32 ? static_cast<int64_t>(static_cast<const int32_t*>(P.perm)[pos * P.perm_stride])
                              : static_cast<const int64_t*>(P.perm)[pos * P.perm_stride];
        }
        if (p >= P.rows) {
          printf("moe::shuffle_mul_sum: permutation[%lld] = %lld is out of range: input has %lld rows\n",
                 static_cast<long long>(pos), static_cast<long long>(p), static_cast<long long>(P.rows));
        }
        CUDA_KERNEL_ASSERT(p < P.rows && "moe::shuffle_mul_sum: permutation entry >= input.shape[0]");
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
    if (lane == 0) s_live = live;
  }
  __syncthreads();
  const int n = s_live;

  const int64_t col_step = static_cast<int64_t>(gridDim.y) * blockDim.x * VEC;
  out_t* __restrict__ dst = out + i * P.out_row_stride;
  for (int64_t c = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * VEC; c < P.k; c += col_step) {
    float acc[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) acc[v] = 0.f;
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
    Pack<out_t, VEC> y;
#pragma unroll
    for (int v = 0; v < VEC; ++v) y.v[v] = static_cast<out_t>(acc[v]);
    *reinterpret_cast<Pack<out_t, VEC>*>(dst + c) = y;
  }
}

// Whether this library holds code for the current GPU (machine code for its arch, or PTX it can JIT):
// a GPU older than every target (e.g. sm_75 against the default 8.0;9.0+PTX) has none, and a launch
// would fail with CUDA's "no kernel image is available". Checked once per device.
void check_device_has_code() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> state[kMaxDevices];  // 0 unknown, 1 has code, 2 has none
  const int device = c10::cuda::current_device();
  if (device < kMaxDevices && state[device].load(std::memory_order_relaxed) == 1) return;
  cudaFuncAttributes attr;
  const cudaError_t err = cudaFuncGetAttributes(&attr, shuffle_mul_sum_kernel<float, float, 1>);
  if (err != cudaSuccess) (void)cudaGetLastError();  // not sticky: clear it
  if (device < kMaxDevices) state[device].store(err == cudaSuccess ? 1 : 2, std::memory_order_relaxed);
  if (err == cudaSuccess) return;
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(false, FMO_PREFIX "the CUDA kernel has no code for this GPU (", prop->name, ", sm_", prop->major,
              prop->minor, "): ", cudaGetErrorString(err), ". Rebuild for it (TORCH_CUDA_ARCH_LIST=\"", prop->major, ".",
              prop->minor, "\" before importing fused_moe_ops) or use the Triton kernel "
              "(FUSED_MOE_OPS_CUDA_BACKEND=triton).");
}

inline bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

template <typename in_t, typename out_t>
void launch(const Params& P, int64_t m) {
  constexpr int kVec = 16 / sizeof(in_t);  // 16-byte loads: 8 x bf16/fp16, 4 x fp32
  const bool vec_ok = P.k % kVec == 0 && P.input_row_stride % kVec == 0 && P.out_row_stride % kVec == 0 &&
                      aligned(P.input, 16) && aligned(P.out, sizeof(out_t) * kVec);
  const int vec = vec_ok ? kVec : 1;
  const int64_t vectors = (P.k + vec - 1) / vec;
  int threads = 32;
  while (threads < kMaxThreads && threads < vectors) threads *= 2;
  const int64_t slices_needed = (vectors + threads - 1) / threads;
  // Enough blocks for ~4 per SM; with many tokens, one block per row walks the whole row.
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t want_slices = (4 * sms + m - 1) / m;
  const int64_t slices = std::max<int64_t>(1, std::min<int64_t>({slices_needed, want_slices, 65535}));
  const dim3 grid(static_cast<unsigned>(m), static_cast<unsigned>(slices));
  const size_t smem = static_cast<size_t>(P.topk) * (sizeof(int64_t) + sizeof(float));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (vec_ok) {
    shuffle_mul_sum_kernel<in_t, out_t, kVec><<<grid, threads, smem, stream>>>(P);
  } else {
    shuffle_mul_sum_kernel<in_t, out_t, 1><<<grid, threads, smem, stream>>>(P);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void combine_cuda(const at::Tensor& input, const std::optional<at::Tensor>& permutation, const at::Tensor& factors,
                  const CombineShape& s, at::Tensor& dst) {
  TORCH_CHECK(input.is_cuda(), FMO_PREFIX "the CUDA kernel got input on ", input.device());
  TORCH_CHECK(s.topk <= kMaxTopk, FMO_PREFIX "the CUDA kernel supports topk <= ", kMaxTopk, ", got topk = ", s.topk);
  TORCH_CHECK(s.m <= std::numeric_limits<int32_t>::max(), FMO_PREFIX "M must be < 2^31, got ", s.m);
  if (s.m == 0 || s.k == 0) return;
  const at::cuda::OptionalCUDAGuard guard(input.device());
  check_device_has_code();
  Params P{};
  P.input = input.data_ptr();
  P.input_row_stride = input.stride(0);
  P.rows = s.rows;
  if (permutation.has_value()) {
    P.perm = permutation->data_ptr();
    P.perm_is_int32 = permutation->scalar_type() == at::kInt;
    P.perm_stride = permutation->stride(0);
  }
  P.factors = factors.data_ptr();
  P.factor_kind = factors.scalar_type() == at::kFloat ? kF32 : (factors.scalar_type() == at::kHalf ? kF16 : kBF16);
  P.factor_stride0 = factors.stride(0);
  P.factor_stride1 = factors.stride(1);
  P.out = dst.data_ptr();
  P.out_row_stride = dst.stride(0);
  P.topk = s.topk;
  P.k = s.k;
  dispatch_float(input.scalar_type(), [&](auto in_tag) {
    dispatch_float(dst.scalar_type(), [&](auto out_tag) {
      launch<typename decltype(in_tag)::type, typename decltype(out_tag)::type>(P, s.m);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(moe, CUDA, m) {
  m.impl("shuffle_mul_sum", &shuffle_mul_sum_functional<combine_cuda>);
  m.impl("shuffle_mul_sum.out", &shuffle_mul_sum_out<combine_cuda>);
}

}  // namespace fused_moe_ops
