// CPU kernel of moe::shuffle_mul_sum (the MoE combine step), on torch's stable ABI.
//
//   out[i, :] = sum_{j < topk, p = perm[i*topk+j] >= 0} factors[i, j] * input[p, :]
//
// and, for the internal op the fusion pass emits, the same with the options of CombineOptions
// (shuffle_mul_sum.h): negative entries wrapped or refused, factors rounded or read per row, and
// out = scale * sum + addend, all in float32 before the one rounding.
//
// The scatter form (moe::scatter_mul_sum, moe::_scatter_mul_sum_fused; shuffle_mul_sum.h documents it)
// is served here too: a stable counting sort of the destinations (sort_by_token), then a per-token
// segment sum in the same three ISA copies (scatter_mul_sum_cpu_kernel.h).
//
// One library holds three copies of the kernel (shuffle_mul_sum_cpu_kernel.h): DEFAULT (plain
// vector extensions), AVX2 and AVX-512 (intrinsics), each compiled in its own `#pragma GCC target`
// region, so the wheel and the JIT build compile this one file with the same flags. The copy
// runs that the CPU supports, capped as ATen caps its own kernels by ATEN_CPU_CAPABILITY
// (avx512 | avx2 | default), chosen once, when the library loads.
#include "shuffle_mul_sum.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FMO_X86 1
#include <immintrin.h>
#endif

namespace fused_moe_ops {

// A checked call, flattened for the kernel copies.
struct CpuArgs {
  const void* input;
  int64_t input_row_stride;
  PermLayout perm;
  const void* factors;
  ScalarType factor_type;
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
  ScalarType addend_type;
  int64_t addend_row_stride;
  bool row_prefetch = true;  // software prefetch along each row (select_kernel says where it is off)
};

// A checked scatter call, its rows sorted by token (sort_by_token), flattened for the kernel copies.
struct ScatterCpuArgs {
  const void* input;
  int64_t input_row_stride;
  const int64_t* segment_start;  // (M + 1,): token t's rows are sorted_rows[segment_start[t] .. segment_start[t + 1])
  const int64_t* sorted_rows;    // the live rows, by token, each token's in increasing r
  const float* sorted_factors;   // the (rounded) factor of each sorted row; 1 where factors is None
  int64_t live_rows;             // rows not skipped: segment_start[M]
  int64_t max_segment;           // the most rows one token receives
  void* out;
  int64_t out_row_stride;
  int64_t m, k;
  float scale;
  const void* addend;  // nullptr: none
  ScalarType addend_type;
  int64_t addend_row_stride;
  bool row_prefetch = true;
};

}  // namespace fused_moe_ops

// ---- the three copies: DEFAULT first (see the note in shuffle_mul_sum_cpu_kernel.h's includer) --
// A template the copies share (std::vector's members) is instantiated once per translation unit, at
// its first use: in the DEFAULT region, with the baseline ISA, so no AVX instruction leaks into it.
#define FMO_ISA DEFAULT
#include "shuffle_mul_sum_cpu_kernel.h"
#include "scatter_mul_sum_cpu_kernel.h"
#undef FMO_ISA

#if FMO_X86
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif
#define FMO_ISA AVX2
#define FMO_ISA_AVX2 1
#include "shuffle_mul_sum_cpu_kernel.h"
#include "scatter_mul_sum_cpu_kernel.h"
#undef FMO_ISA_AVX2
#undef FMO_ISA
#if defined(__clang__)
#pragma clang attribute pop
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"))), \
                             apply_to = function)
#else
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#endif
#define FMO_ISA AVX512
#define FMO_ISA_AVX512 1
#include "shuffle_mul_sum_cpu_kernel.h"
#include "scatter_mul_sum_cpu_kernel.h"
#undef FMO_ISA_AVX512
#undef FMO_ISA
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif  // FMO_X86

namespace fused_moe_ops {
namespace {

using CopyFn = void (*)(const CpuArgs&, ScalarType, ScalarType);
using ScatterCopyFn = void (*)(const ScatterCpuArgs&, ScalarType, ScalarType);

struct SelectedKernel {
  CopyFn fn;
  ScatterCopyFn scatter_fn;
  const char* isa;
  bool row_prefetch;
};

// The widest copy this CPU runs (the OS saving its registers too: __builtin_cpu_supports checks
// XCR0), capped by ATEN_CPU_CAPABILITY as ATen caps its own kernels.
SelectedKernel select_copy() {
#if FMO_X86
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  std::string cap;
  if (const char* env = std::getenv("ATEN_CPU_CAPABILITY")) cap = env;
  for (auto& ch : cap) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  if (cap == "default") return {&DEFAULT::combine_cpu, &DEFAULT::scatter_cpu, "DEFAULT", true};
  if (avx512 && cap != "avx2") return {&AVX512::combine_cpu, &AVX512::scatter_cpu, "AVX512", true};
  // The software prefetch along each row (shuffle_mul_sum_cpu_kernel.h says why) is kept where it
  // was measured to help or not to hurt (an Intel Xeon: AVX-512 and AVX2 copies; an AVX-512 EPYC: AVX-512)
  // and left out of the AVX2 copy on AMD CPUs: on a Zen 3 EPYC that copy ran 0.73-0.94x of the
  // unprefetched ac2f0a7 kernel at M >= 64 with it, 0.97-1.47x without (docs/BENCHMARKS.md).
  if (avx2) return {&AVX2::combine_cpu, &AVX2::scatter_cpu, "AVX2", !__builtin_cpu_is("amd")};
#endif
  return {&DEFAULT::combine_cpu, &DEFAULT::scatter_cpu, "DEFAULT", true};
}

// The copy, with FUSED_MOE_OPS_CPU_PREFETCH=0 / 1 overriding where the row prefetch is on.
SelectedKernel select_kernel() {
  SelectedKernel kernel = select_copy();
  if (const char* env = std::getenv("FUSED_MOE_OPS_CPU_PREFETCH")) {
    const std::string v = env;
    if (v == "0") kernel.row_prefetch = false;
    if (v == "1") kernel.row_prefetch = true;
  }
  return kernel;
}

const SelectedKernel& selected() {
  static const SelectedKernel kernel = select_kernel();
  return kernel;
}

// The first entry out of range, checked before anything is written so a bad call leaves `out`
// untouched: >= R always; below -R when negative entries wrap; any negative one when they are an error.
void check_permutation_range(const CpuArgs& a) {
  if (a.perm.data == nullptr) return;
  const int64_t rows = a.rows;
  const int64_t lowest = a.negative_index == kSkipNegative ? std::numeric_limits<int64_t>::min()
                                                          : (a.negative_index == kWrapNegative ? -rows : 0);
  for (int64_t i = 0; i < a.m; ++i) {
    for (int64_t j = 0; j < a.topk; ++j) {
      const int64_t off = i * a.perm.stride_row + j * a.perm.stride_slot;
      const int64_t p = a.perm.is_int32 ? static_cast<const int32_t*>(a.perm.data)[off]
                                        : static_cast<const int64_t*>(a.perm.data)[off];
      if (__builtin_expect(p >= rows || p < lowest, 0)) {
        const int64_t pos = i * a.topk + j;
        if (a.negative_index == kSkipNegative) {
          fail_index(FMO_PREFIX "permutation[", pos, "] = ", p, " is out of range: input has ", rows,
                     " rows, so entries must be < ", rows, " (negative entries are skipped)");
        }
        fail_index(FMO_PREFIX "permutation[", pos, "] = ", p, " is out of range: input has ", rows,
                   " rows, so entries must be in [", lowest, ", ", rows, ")");
      }
    }
  }
}

void combine_cpu(const TensorRef& input, const PermLayout& perm, const TensorRef& factors, const CombineShape& s,
                 const CombineOptions& o, const TensorRef& dst) {
  CpuArgs a{};
  a.input = input.data_ptr();
  a.input_row_stride = input.stride(0);
  a.perm = perm;
  a.factors = factors.data_ptr();
  a.factor_type = dtype_of(factors);
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
    a.row_mask = static_cast<const bool*>(o.row_mask->data_ptr());
    a.row_mask_stride = o.row_mask->stride(0);
  }
  if (o.addend.has_value()) {
    a.addend = o.addend->data_ptr();
    a.addend_type = dtype_of(*o.addend);
    a.addend_row_stride = addend_row_stride(*o.addend);
  }
  a.row_prefetch = selected().row_prefetch;
  check_permutation_range(a);  // before anything is written, even when K = 0
  if (s.m == 0 || s.k == 0) return;
  selected().fn(a, dtype_of(input), dtype_of(dst));
}

// ---- the scatter form ------------------------------------------------------------------------------

inline int64_t index_at(const IndexLayout& index, int64_t r) {
  const int64_t off = r * index.stride;
  return index.is_int32 ? static_cast<const int32_t*>(index.data)[off] : static_cast<const int64_t*>(index.data)[off];
}

// The sort's scratch, (M + 2) + R int64 and R floats: on the stack for a decode-sized call, one heap
// block beyond (the only allocation of a call besides its result).
class SortScratch {
 public:
  SortScratch(int64_t m, int64_t rows) {
    const size_t ints = static_cast<size_t>(m + 2 + rows), floats = static_cast<size_t>(rows);
    const size_t bytes = ints * sizeof(int64_t) + floats * sizeof(float);
    if (bytes <= sizeof(stack_)) {
      base_ = stack_;
    } else {
      heap_.reset(new int64_t[(bytes + sizeof(int64_t) - 1) / sizeof(int64_t)]);
      base_ = heap_.get();
    }
    segment_start = base_;
    sorted_rows = base_ + m + 2;
    sorted_factors = reinterpret_cast<float*>(sorted_rows + rows);
  }
  int64_t* segment_start;
  int64_t* sorted_rows;
  float* sorted_factors;

 private:
  int64_t stack_[512];
  std::unique_ptr<int64_t[]> heap_;
  int64_t* base_;
};

// The first entry out of range (IndexError naming it), checked before anything is written, also
// when the result has no elements: >= M always; below -M when negative entries wrap; any negative one
// when they are an error.
void check_index_range(const IndexLayout& index, const ScatterShape& s, int64_t negative_index) {
  const int64_t m = s.m, lowest = scatter_index_lowest(m, negative_index);
  for (int64_t r = 0; r < s.rows; ++r) {
    const int64_t t = index_at(index, r);
    if (__builtin_expect(t >= m || t < lowest, 0)) fail_scatter_index(r, t, m, negative_index);
  }
}

// A stable counting sort of the live rows by token (entries in range: check_index_range), each
// token's in increasing r, with their rounded factors: segment_start[t] .. segment_start[t + 1] is
// token t's run of sorted_rows / sorted_factors. A skipped entry (negative, kSkipNegative) is left out
// and its factor never read. Returns the most rows one token receives. O(R + M), serial: next to the
// rows' K elements each, it is noise.
int64_t sort_by_token(const IndexLayout& index, const std::optional<TensorRef>& factors, const ScatterShape& s,
                      const ScatterOptions& o, SortScratch& scratch) {
  const int64_t m = s.m, rows = s.rows;
  // Counts at start[t + 2], so that after the prefix sum start[t + 1] is token t's first slot and the
  // placement's post-increment leaves start[t] .. start[t + 1] as token t's run (start[0] = 0).
  int64_t* start = scratch.segment_start;
  std::fill(start, start + m + 2, int64_t{0});
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t d = scatter_destination(index_at(index, r), m, o.negative_index);
    if (d >= 0) ++start[d + 2];
  }
  int64_t max_segment = 0;
  for (int64_t t = 0; t < m; ++t) {
    max_segment = std::max(max_segment, start[t + 2]);
    start[t + 2] += start[t + 1];
  }
  const void* f_data = factors.has_value() ? factors->data_ptr() : nullptr;
  const ScalarType f_type = factors.has_value() ? dtype_of(*factors) : ScalarType::Float;
  const int64_t f_stride = factors.has_value() ? factors->stride(0) : 0;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t d = scatter_destination(index_at(index, r), m, o.negative_index);
    if (d < 0) continue;
    const int64_t slot = start[d + 1]++;
    scratch.sorted_rows[slot] = r;
    scratch.sorted_factors[slot] =
        f_data == nullptr ? 1.f : round_factor(DEFAULT::float_at(f_data, f_type, r * f_stride), o.factor_round);
  }
  return max_segment;
}

void scatter_cpu(const TensorRef& input, const IndexLayout& index, const std::optional<TensorRef>& factors,
                 const ScatterShape& s, const ScatterOptions& o, const TensorRef& dst) {
  check_index_range(index, s, o.negative_index);  // before anything is written
  if (s.m == 0 || s.k == 0) return;  // nothing to write: no scratch either (M may be large when K is 0)
  SortScratch scratch(s.m, s.rows);
  const int64_t max_segment = sort_by_token(index, factors, s, o, scratch);
  ScatterCpuArgs a{};
  a.input = input.data_ptr();
  a.input_row_stride = input.stride(0);
  a.segment_start = scratch.segment_start;
  a.sorted_rows = scratch.sorted_rows;
  a.sorted_factors = scratch.sorted_factors;
  a.live_rows = scratch.segment_start[s.m];
  a.max_segment = max_segment;
  a.out = dst.data_ptr();
  a.out_row_stride = dst.stride(0);
  a.m = s.m;
  a.k = s.k;
  a.scale = o.scale;
  if (o.addend.has_value()) {
    a.addend = o.addend->data_ptr();
    a.addend_type = dtype_of(*o.addend);
    a.addend_row_stride = addend_row_stride(*o.addend);
  }
  a.row_prefetch = selected().row_prefetch;
  selected().scatter_fn(a, dtype_of(input), dtype_of(dst));
}

}  // namespace

// The schema is defined in Python (ops.py); so is the Autograd kernel (_registry.py: the stable
// ABI has no autogradNotImplementedFallback). The boxed kernels: shuffle_mul_sum.h.
STABLE_TORCH_LIBRARY_IMPL(moe, CPU, m) {
  m.impl("shuffle_mul_sum", &boxed::functional<combine_cpu>);
  m.impl("shuffle_mul_sum.out", &boxed::out_variant<combine_cpu>);
  m.impl("_shuffle_mul_sum_fused", &boxed::fused<combine_cpu>);
  m.impl("scatter_mul_sum", &boxed::scatter<scatter_cpu>);
  m.impl("_scatter_mul_sum_fused", &boxed::scatter_fused<scatter_cpu>);
}

}  // namespace fused_moe_ops

// Which copy runs ("AVX512", "AVX2" or "DEFAULT"): build.py reads it with ctypes for the report.
extern "C" __attribute__((visibility("default"))) const char* fused_moe_ops_cpu_isa() {
  return fused_moe_ops::selected().isa;
}

// Whether that copy prefetches along each row (1) or not (0): the report shows it too.
extern "C" __attribute__((visibility("default"))) int fused_moe_ops_cpu_row_prefetch() {
  return fused_moe_ops::selected().row_prefetch ? 1 : 0;
}
