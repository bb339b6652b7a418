// CPU kernel of moe::shuffle_mul_sum (the MoE combine step), on torch's stable ABI.
//
//   out[i, :] = sum_{j < topk, p = perm[i*topk+j] >= 0} factors[i, j] * input[p, :]
//
// and, for the internal op the fusion pass emits, the same with the options of CombineOptions
// (shuffle_mul_sum.h): negative entries wrapped or refused, factors rounded or read per row, and
// out = scale * sum + addend, all in float32 before the one rounding.
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

}  // namespace fused_moe_ops

// ---- the three copies: DEFAULT first (see the note in shuffle_mul_sum_cpu_kernel.h's includer) --
// A template the copies share (std::vector's members) is instantiated once per translation unit, at
// its first use: in the DEFAULT region, with the baseline ISA, so no AVX instruction leaks into it.
#define FMO_ISA DEFAULT
#include "shuffle_mul_sum_cpu_kernel.h"
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

struct SelectedKernel {
  CopyFn fn;
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
  if (cap == "default") return {&DEFAULT::combine_cpu, "DEFAULT", true};
  if (avx512 && cap != "avx2") return {&AVX512::combine_cpu, "AVX512", true};
  // The software prefetch along each row (shuffle_mul_sum_cpu_kernel.h says why) is kept where it
  // was measured to help or not to hurt (an Intel Xeon: AVX-512 and AVX2 copies; an AVX-512 EPYC: AVX-512)
  // and left out of the AVX2 copy on AMD CPUs: on a Zen 3 EPYC that copy ran 0.73-0.94x of the
  // unprefetched ac2f0a7 kernel at M >= 64 with it, 0.97-1.47x without (docs/BENCHMARKS.md).
  if (avx2) return {&AVX2::combine_cpu, "AVX2", !__builtin_cpu_is("amd")};
#endif
  return {&DEFAULT::combine_cpu, "DEFAULT", true};
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

}  // namespace

// The schema is defined in Python (ops.py); so is the Autograd kernel (_registry.py: the stable
// ABI has no autogradNotImplementedFallback). The boxed kernels: shuffle_mul_sum.h.
STABLE_TORCH_LIBRARY_IMPL(moe, CPU, m) {
  m.impl("shuffle_mul_sum", &boxed::functional<combine_cpu>);
  m.impl("shuffle_mul_sum.out", &boxed::out_variant<combine_cpu>);
  m.impl("_shuffle_mul_sum_fused", &boxed::fused<combine_cpu>);
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
