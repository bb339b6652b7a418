// CPU kernel of moe::shuffle_mul_sum (the MoE combine step).
//
//   out[i, :] = sum_{j < topk, p = perm[i*topk+j] >= 0} factors[i, j] * input[p, :]
//
// and, for the internal op the fusion pass emits, the same with the options of CombineOptions
// (shuffle_mul_sum.h): negative entries wrapped or refused, factors rounded or read per row, and
// out = scale * sum + addend, all in float32 before the one rounding.
//
// Work is split over (output row, column chunk) so that one token (M = 1, decode) still uses
// every core. Inside a chunk, a tile of columns is held in float32 registers while the topk
// source rows stream through it: every source element is read exactly once, the output is
// written exactly once, and the accumulation is float32 with one rounding at the end.
// Vectorised with at::vec. The kernel lives in namespace CPU_CAPABILITY (at::vec's convention): the
// JIT build compiles it once with the host's AVX2 / AVX-512 flags; the wheel compiles this file once
// per ISA (DEFAULT, AVX2, AVX512; fused_moe_ops/_kernel_spec.py) into one library, whose DEFAULT
// copy (FMO_CPU_DISPATCH) registers the op and picks the copy torch's CPU capability names when the
// library loads (ATEN_CPU_CAPABILITY=avx2|default overrides it, as for ATen's own kernels).
#include "shuffle_mul_sum.h"

#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/irange.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY DEFAULT
#endif

namespace fused_moe_ops {
namespace CPU_CAPABILITY {
namespace {

using VecF = at::vec::Vectorized<float>;
constexpr int64_t kLanes = VecF::size();       // floats per register
constexpr int64_t kTileRegs = 4;               // float registers per column tile
constexpr int64_t kTile = kLanes * kTileRegs;  // columns per tile (64 with AVX-512)

// Load 2*kLanes elements of T as two float registers.
template <typename T>
inline void load_pair(const T* p, VecF& a, VecF& b) {
  auto v = at::vec::Vectorized<T>::loadu(p);
  std::tie(a, b) = at::vec::convert_to_float<T>(v);
}
template <>
inline void load_pair<float>(const float* p, VecF& a, VecF& b) {
  a = VecF::loadu(p);
  b = VecF::loadu(p + kLanes);
}

template <typename T>
inline void store_pair(T* p, const VecF& a, const VecF& b) {
  at::vec::convert_from_float<T>(a, b).store(p);
}
template <>
inline void store_pair<float>(float* p, const VecF& a, const VecF& b) {
  a.store(p);
  b.store(p + kLanes);
}

// Load 2*kLanes elements of a runtime-typed float tensor (the addend) as two float registers.
inline void load_pair_any(const void* p, at::ScalarType t, int64_t offset, VecF& a, VecF& b) {
  switch (t) {
    case at::kFloat: return load_pair<float>(static_cast<const float*>(p) + offset, a, b);
    case at::kHalf: return load_pair<at::Half>(static_cast<const at::Half*>(p) + offset, a, b);
    default: return load_pair<at::BFloat16>(static_cast<const at::BFloat16*>(p) + offset, a, b);
  }
}

inline float float_at(const void* base, at::ScalarType t, int64_t offset) {
  switch (t) {
    case at::kFloat: return static_cast<const float*>(base)[offset];
    case at::kHalf: return static_cast<float>(static_cast<const at::Half*>(base)[offset]);
    default: return static_cast<float>(static_cast<const at::BFloat16*>(base)[offset]);
  }
}

struct Args {
  const void* input;
  int64_t input_row_stride;
  const void* perm;  // nullptr: identity
  bool perm_is_int32;
  int64_t perm_stride;
  const void* factors;
  at::ScalarType factor_type;
  int64_t factor_stride0, factor_stride1;
  void* out;
  int64_t out_row_stride;
  int64_t m, topk, k, rows;
  // CombineOptions, flattened
  int64_t negative_index;
  int64_t factor_round;
  bool factors_per_row;  // factors[p * factor_stride0]
  float scale;
  const void* addend;    // nullptr: none
  const bool* row_mask;  // nullptr: none; true: the row contributes nothing
  int64_t row_mask_stride;
  at::ScalarType addend_type;
  int64_t addend_row_stride;
};

inline int64_t perm_at(const Args& a, int64_t pos) {
  if (a.perm == nullptr) return pos;
  return a.perm_is_int32 ? static_cast<const int32_t*>(a.perm)[pos * a.perm_stride]
                         : static_cast<const int64_t*>(a.perm)[pos * a.perm_stride];
}

// The row slot `pos` reads, or -1 for a skipped slot (the range was checked before:
// check_permutation_range). A row_mask'ed row is returned: it reads as zeros (row_is_masked).
inline int64_t source_row(const Args& a, int64_t pos) {
  int64_t p = perm_at(a, pos);
  if (p < 0) p = a.negative_index == kWrapNegative ? p + a.rows : -1;
  return p;
}

inline bool row_is_masked(const Args& a, int64_t p) {
  return a.row_mask != nullptr && a.row_mask[p * a.row_mask_stride];
}

// Out = scale * acc + addend, still in float32.
inline void epilogue(const Args& a, int64_t i, int64_t c, VecF& lo, VecF& hi) {
  if (a.scale != 1.f) {
    const VecF sv(a.scale);
    lo = lo * sv;
    hi = hi * sv;
  }
  if (a.addend != nullptr) {
    VecF b0, b1;
    load_pair_any(a.addend, a.addend_type, i * a.addend_row_stride + c, b0, b1);
    lo = lo + b0;
    hi = hi + b1;
  }
}

inline float epilogue(const Args& a, int64_t i, int64_t c, float acc) {
  acc *= a.scale;
  if (a.addend != nullptr) acc += float_at(a.addend, a.addend_type, i * a.addend_row_stride + c);
  return acc;
}

template <typename in_t, typename out_t>
void combine_rows(const Args& a) {
  const in_t* input = static_cast<const in_t*>(a.input);
  out_t* out = static_cast<out_t*>(a.out);
  const int64_t k = a.k;
  const bool has_epilogue = a.scale != 1.f || a.addend != nullptr;

  // Split K into chunks so that M * chunks gives every thread work even when M is 1.
  const int64_t threads = at::get_num_threads();
  const int64_t want_tasks = threads * 4;
  int64_t chunks = 1;
  if (a.m < want_tasks) chunks = std::min<int64_t>((want_tasks + a.m - 1) / a.m, (k + 1023) / 1024);
  chunks = std::max<int64_t>(chunks, 1);
  int64_t chunk_cols = (k + chunks - 1) / chunks;
  chunk_cols = (chunk_cols + kTile - 1) / kTile * kTile;  // whole tiles, so only the last chunk has a tail
  chunks = (k + chunk_cols - 1) / chunk_cols;
  // Grain: enough tasks per parallel_for piece to amortise its cost (~32 KiB of input). A call that
  // reads less than kSerialBytes runs on the calling thread alone: one core streams it in ~10 us, and
  // waking a second OpenMP thread costs about that, or milliseconds when that core is busy elsewhere.
  constexpr int64_t kSerialBytes = 256 * 1024;
  const int64_t bytes_per_task = std::max<int64_t>(1, a.topk * chunk_cols * (int64_t)sizeof(in_t));
  const int64_t total_tasks = a.m * chunks;
  const int64_t grain = bytes_per_task * total_tasks < kSerialBytes
                            ? total_tasks
                            : std::max<int64_t>(1, (32 * 1024) / bytes_per_task);

  at::parallel_for(0, total_tasks, grain, [&](int64_t begin, int64_t end) {
    std::vector<const in_t*> src_store(a.topk);
    std::vector<float> w_store(a.topk);
    const in_t** src = src_store.data();
    float* w = w_store.data();
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task / chunks;
      const int64_t c_begin = (task % chunks) * chunk_cols;
      const int64_t c_end = std::min(k, c_begin + chunk_cols);
      // Gather this token's live slots once: skipped slots are dropped here (their factor unread).
      // A masked row reads as zeros: it adds 0 * factor, which is 0, or NaN for a NaN/inf factor
      // (what eager's masked_fill-then-multiply gives), so it only decides the accumulator's start.
      int64_t n = 0;
      float acc0 = 0.f;
      for (int64_t j = 0; j < a.topk; ++j) {
        const int64_t p = source_row(a, i * a.topk + j);
        if (p < 0) continue;
        const int64_t f = a.factors_per_row ? p * a.factor_stride0 : i * a.factor_stride0 + j * a.factor_stride1;
        const float wf = round_factor(float_at(a.factors, a.factor_type, f), a.factor_round);
        if (row_is_masked(a, p)) {
          if (!std::isfinite(wf)) acc0 = std::numeric_limits<float>::quiet_NaN();
          continue;
        }
        src[n] = input + p * a.input_row_stride;
        w[n] = wf;
        ++n;
      }
      out_t* dst = out + i * a.out_row_stride;
      int64_t c = c_begin;
      for (; c + kTile <= c_end; c += kTile) {
        VecF acc[kTileRegs];
        for (int r = 0; r < kTileRegs; ++r) acc[r] = VecF(acc0);
        for (int64_t s = 0; s < n; ++s) {
          const VecF ws(w[s]);
          const in_t* row = src[s] + c;
          for (int r = 0; r < kTileRegs; r += 2) {
            VecF x0, x1;
            load_pair<in_t>(row + r * kLanes, x0, x1);
            acc[r] = at::vec::fmadd(x0, ws, acc[r]);
            acc[r + 1] = at::vec::fmadd(x1, ws, acc[r + 1]);
          }
        }
        for (int r = 0; r < kTileRegs; r += 2) {
          if (has_epilogue) epilogue(a, i, c + r * kLanes, acc[r], acc[r + 1]);
          store_pair<out_t>(dst + c + r * kLanes, acc[r], acc[r + 1]);
        }
      }
      for (; c < c_end; ++c) {  // tail: K not a multiple of the tile
        float acc = acc0;
        for (int64_t s = 0; s < n; ++s) acc += w[s] * static_cast<float>(src[s][c]);
        dst[c] = static_cast<out_t>(has_epilogue ? epilogue(a, i, c, acc) : acc);
      }
    }
  });
}

// The first entry out of range, checked before anything is written so a bad call leaves `out`
// untouched: >= R always; below -R when negative entries wrap; any negative one when they are an error.
void check_permutation_range(const Args& a, int64_t rows) {
  if (a.perm == nullptr) return;
  const int64_t n = a.m * a.topk;
  const int64_t lowest = a.negative_index == kSkipNegative ? std::numeric_limits<int64_t>::min() : (a.negative_index == kWrapNegative ? -rows : 0);
  for (int64_t pos = 0; pos < n; ++pos) {
    const int64_t p = perm_at(a, pos);
    if (C10_UNLIKELY(p >= rows || p < lowest)) {
      if (a.negative_index == kSkipNegative) {
        TORCH_CHECK_INDEX(false, FMO_PREFIX "permutation[", pos, "] = ", p, " is out of range: input has ", rows,
                          " rows, so entries must be < ", rows, " (negative entries are skipped)");
      }
      TORCH_CHECK_INDEX(false, FMO_PREFIX "permutation[", pos, "] = ", p, " is out of range: input has ", rows,
                        " rows, so entries must be in [", lowest, ", ", rows, ")");
    }
  }
}

void combine_cpu(const at::Tensor& input, const std::optional<at::Tensor>& permutation, const at::Tensor& factors,
                 const CombineShape& s, const CombineOptions& o, at::Tensor& dst) {
  Args a{};
  a.input = input.data_ptr();
  a.input_row_stride = input.stride(0);
  if (permutation.has_value()) {
    a.perm = permutation->data_ptr();
    a.perm_is_int32 = permutation->scalar_type() == at::kInt;
    a.perm_stride = permutation->stride(0);
  }
  a.factors = factors.data_ptr();
  a.factor_type = factors.scalar_type();
  a.factor_stride0 = factors.stride(0);
  a.factor_stride1 = factors.dim() > 1 ? factors.stride(1) : 0;
  a.out = dst.data_ptr();
  a.out_row_stride = dst.stride(0);
  a.m = s.m;
  a.topk = s.topk;
  a.k = s.k;
  a.rows = s.rows;
  a.negative_index = o.negative_index;
  a.factor_round = o.factor_round;
  a.factors_per_row = o.factors_per_row;
  a.scale = o.scale;
  if (o.row_mask.has_value()) {
    a.row_mask = o.row_mask->data_ptr<bool>();
    a.row_mask_stride = o.row_mask->stride(0);
  }
  if (o.addend.has_value()) {
    a.addend = o.addend->data_ptr();
    a.addend_type = o.addend->scalar_type();
    a.addend_row_stride = o.addend->stride(0);
  }
  check_permutation_range(a, s.rows);  // before anything is written, even when K = 0
  if (s.m == 0 || s.k == 0) return;
  dispatch_float(input.scalar_type(), [&](auto in_tag) {
    dispatch_float(dst.scalar_type(), [&](auto out_tag) {
      combine_rows<typename decltype(in_tag)::type, typename decltype(out_tag)::type>(a);
    });
  });
}

}  // namespace

// This ISA's copy of the kernel, as the registration below calls it.
void combine_cpu_entry(const at::Tensor& input, const std::optional<at::Tensor>& permutation,
                       const at::Tensor& factors, const CombineShape& s, const CombineOptions& o, at::Tensor& dst) {
  combine_cpu(input, permutation, factors, s, o, dst);
}

}  // namespace CPU_CAPABILITY

// Registration: once per library, in its DEFAULT copy (dispatching form) or its only copy (JIT).
#if !defined(FMO_CPU_DISPATCH) || defined(CPU_CAPABILITY_DEFAULT)
#if defined(FMO_CPU_DISPATCH)
// The other copies: this same file compiled with their flags and linked into this library.
namespace AVX2 {
void combine_cpu_entry(const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const CombineShape&,
                       const CombineOptions&, at::Tensor&);
}
namespace AVX512 {
void combine_cpu_entry(const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const CombineShape&,
                       const CombineOptions&, at::Tensor&);
}
#endif

namespace {

struct SelectedKernel {
  CombineFn fn;
  const char* isa;
};

#if defined(FMO_CPU_DISPATCH)
SelectedKernel select_kernel() {
  const std::string capability = at::get_cpu_capability();  // "AVX512", "AVX2" or "DEFAULT"
  if (capability == "AVX512") return {&AVX512::combine_cpu_entry, "AVX512"};
  if (capability == "AVX2") return {&AVX2::combine_cpu_entry, "AVX2"};
  return {&DEFAULT::combine_cpu_entry, "DEFAULT"};
}
#else
#define FMO_STR_(x) #x
#define FMO_STR(x) FMO_STR_(x)
SelectedKernel select_kernel() { return {&CPU_CAPABILITY::combine_cpu_entry, FMO_STR(CPU_CAPABILITY)}; }
#endif

const SelectedKernel& selected() {
  static const SelectedKernel kernel = select_kernel();
  return kernel;
}

void combine_cpu(const at::Tensor& input, const std::optional<at::Tensor>& permutation, const at::Tensor& factors,
                 const CombineShape& s, const CombineOptions& o, at::Tensor& dst) {
  selected().fn(input, permutation, factors, s, o, dst);
}

}  // namespace

TORCH_LIBRARY_IMPL(moe, CPU, m) {
  m.impl("shuffle_mul_sum", &shuffle_mul_sum_functional<combine_cpu>);
  m.impl("shuffle_mul_sum.out", &shuffle_mul_sum_out<combine_cpu>);
  m.impl("_shuffle_mul_sum_fused", &shuffle_mul_sum_fused<combine_cpu>);
}

// No derivative (an inference op): forward runs under autograd, backward raises
// "derivative for moe::shuffle_mul_sum is not implemented". Registered here, in C++, for every
// device, so a call pays no Python autograd overhead. _registry.py registers a Python
// equivalent when this library is not loaded.
TORCH_LIBRARY_IMPL(moe, Autograd, m) {
  m.impl("shuffle_mul_sum", torch::autograd::autogradNotImplementedFallback());
  m.impl("shuffle_mul_sum.out", torch::autograd::autogradNotImplementedFallback());
  m.impl("_shuffle_mul_sum_fused", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace fused_moe_ops

// Which copy runs ("AVX512", "AVX2" or "DEFAULT"): _build.py reads it with ctypes for the report.
extern "C" C10_EXPORT const char* fused_moe_ops_cpu_isa() {
  return fused_moe_ops::selected().isa;
}
#else
}  // namespace fused_moe_ops
#endif
