// Shared by the CPU and CUDA kernels of moe::shuffle_mul_sum: argument checks and the
// resolved shape of a call. The schema itself is defined in Python (fused_moe_ops/ops.py);
// these checks carry the same messages as ops.check_args so that a caller gets the same error
// from the fake (torch.compile), the reference fallback and a native kernel.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/util/Optional.h>

#include <cctype>
#include <sstream>
#include <string>

namespace fused_moe_ops {

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

inline std::string shape_str(const at::Tensor& t) {
  std::ostringstream s;
  s << "(";
  for (int64_t d = 0; d < t.dim(); ++d) s << (d ? ", " : "") << t.size(d);
  if (t.dim() == 1) s << ",";
  s << ")";
  return s.str();
}

inline std::string dtype_str(at::ScalarType t) {
  // Python spelling (torch.bfloat16, torch.complex64, torch.float8_e4m3fn), as ops.check_args prints it.
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kDouble: return "torch.float64";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    case at::kComplexHalf: return "torch.complex32";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    default: break;
  }
  // The rest (float8_*, float4_*, uint16/32/64, qint8, bits*, int1..7) print as their C++ name
  // lower-cased: Float8_e4m3fn -> float8_e4m3fn, UInt16 -> uint16, QInt8 -> qint8.
  std::string name = c10::toString(t);
  for (auto& ch : name) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  return "torch." + name;
}

#define FMO_PREFIX "moe::shuffle_mul_sum: "

struct CombineShape {
  int64_t m;     // output rows (tokens)
  int64_t topk;  // slots per token
  int64_t k;     // hidden size
  int64_t rows;  // rows of input (R)
};

inline CombineShape check_args(const at::Tensor& input, const std::optional<at::Tensor>& permutation,
                               const at::Tensor& factors, std::optional<at::ScalarType> out_dtype) {
  TORCH_CHECK(input.dim() == 2, FMO_PREFIX "input must be a 2-D tensor (R, K), got ", input.dim(),
              "-D with shape ", shape_str(input));
  TORCH_CHECK(is_supported_float(input.scalar_type()),
              FMO_PREFIX "input must have dtype float32, float16, bfloat16, got ", dtype_str(input.scalar_type()));
  TORCH_CHECK(factors.dim() == 2, FMO_PREFIX "factors must be a 2-D tensor (M, topk), got ", factors.dim(),
              "-D with shape ", shape_str(factors));
  TORCH_CHECK(is_supported_float(factors.scalar_type()),
              FMO_PREFIX "factors must have dtype float32, float16, bfloat16, got ", dtype_str(factors.scalar_type()));
  TORCH_CHECK(factors.device() == input.device(), FMO_PREFIX "factors must be on the same device as input (",
              input.device(), "), got ", factors.device());
  CombineShape s{factors.size(0), factors.size(1), input.size(1), input.size(0)};
  if (!permutation.has_value()) {
    TORCH_CHECK(s.rows == s.m * s.topk, FMO_PREFIX "permutation=None (identity) needs input.shape[0] == M*topk = ",
                s.m, "*", s.topk, " = ", s.m * s.topk, ", got input.shape[0] = ", s.rows);
  } else {
    const at::Tensor& p = *permutation;
    TORCH_CHECK(p.scalar_type() == at::kInt || p.scalar_type() == at::kLong,
                FMO_PREFIX "permutation must have dtype int32 or int64, got ", dtype_str(p.scalar_type()));
    TORCH_CHECK(p.dim() == 1, FMO_PREFIX "permutation must be a 1-D tensor (M*topk,), got ", p.dim(),
                "-D with shape ", shape_str(p));
    TORCH_CHECK(p.device() == input.device(), FMO_PREFIX "permutation must be on the same device as input (",
                input.device(), "), got ", p.device());
    TORCH_CHECK(p.size(0) == s.m * s.topk, FMO_PREFIX "permutation must have M*topk = ", s.m, "*", s.topk, " = ",
                s.m * s.topk, " entries (factors is ", s.m, "x", s.topk, "), got ", p.size(0));
  }
  if (out_dtype.has_value()) {
    TORCH_CHECK(is_supported_float(*out_dtype),
                FMO_PREFIX "out_dtype must be one of float32, float16, bfloat16 or None, got ", dtype_str(*out_dtype));
  }
  return s;
}

// What the internal op moe::_shuffle_mul_sum_fused adds to the public contract (ops.py documents the
// schema): the facts the fusion pass would otherwise compute in a kernel of their own before the
// op (the negative-index wrap, the factors' rounding, a per-row factor gather) and the consumer it
// would otherwise leave after it (a scale, an add). The public op is the all-default case.
enum NegativeIndex : int64_t {
  kSkipNegative = 0,      // the public op: a negative entry contributes nothing
  kWrapNegative = 1,      // x[idx]: -R <= p < 0 reads row p + R; p < -R is an error
  kNegativeIsError = 2,   // x.index_select(0, idx): every negative entry is an error
};
enum FactorRound : int64_t {
  kNoRound = 0,
  kRoundToHalf = 1,       // factors.to(float16) before the multiply
  kRoundToBFloat16 = 2,   // factors.to(bfloat16) before the multiply
};

struct CombineOptions {
  int64_t negative_index = kSkipNegative;
  int64_t factor_round = kNoRound;
  bool factors_per_row = false;     // factors is (R,): slot (i, j) uses factors[p], p its (wrapped) row
  float scale = 1.f;                // out = scale * sum + addend, in float32, rounded once
  std::optional<at::Tensor> addend;  // (M, K), last dimension dense, any row stride (0: broadcast)
  std::optional<at::Tensor> row_mask;  // bool (R,): a row whose entry is true reads as zeros (0 * factor)
};

C10_HOST_DEVICE inline float round_factor(float w, int64_t mode) {
  if (mode == kRoundToHalf) return static_cast<float>(at::Half(w));
  if (mode == kRoundToBFloat16) return static_cast<float>(at::BFloat16(w));
  return w;
}

// The addend of the internal op: broadcastable to (M, K) (a residual, a bias), or, with more than
// two dimensions, M*K elements in row-major (M, K) order (the residual of `out.view(b, s, h) + r`).
inline bool addend_fits(const at::Tensor& a, int64_t m, int64_t k) {
  if (a.dim() > 2) return a.size(-1) == k && a.numel() == m * k;
  const int64_t want[2] = {m, k};
  for (int64_t d = 0; d < a.dim(); ++d) {
    const int64_t size = a.size(a.dim() - 1 - d);
    if (size != 1 && size != want[1 - d]) return false;
  }
  return true;
}

inline at::Tensor addend_as_rows(const at::Tensor& a, int64_t m, int64_t k) {
  return a.dim() > 2 ? a.reshape({m, k}) : a.expand({m, k});
}

// Checks of the internal op (the public op's checks, plus the options). A 2-D (M, topk) permutation
// is what carries M and topk when the factors are per row.
inline CombineShape check_fused_args(const at::Tensor& input, const std::optional<at::Tensor>& permutation,
                                     const at::Tensor& factors, std::optional<at::ScalarType> out_dtype,
                                     const CombineOptions& o) {
  TORCH_CHECK(o.negative_index >= kSkipNegative && o.negative_index <= kNegativeIsError,
              FMO_PREFIX "negative_index must be 0 (skip), 1 (wrap) or 2 (error), got ", o.negative_index);
  TORCH_CHECK(o.factor_round >= kNoRound && o.factor_round <= kRoundToBFloat16,
              FMO_PREFIX "factor_round must be 0 (none), 1 (float16) or 2 (bfloat16), got ", o.factor_round);
  CombineShape s{};
  if (!o.factors_per_row) {
    TORCH_CHECK(!permutation.has_value() || permutation->dim() != 2 ||
                    (permutation->size(0) == factors.size(0) && permutation->size(1) == factors.size(1)),
                FMO_PREFIX "a 2-D permutation must have the factors' shape (M, topk) = ", shape_str(factors),
                ", got ", shape_str(*permutation));
    const std::optional<at::Tensor> flat =
        permutation.has_value() ? std::optional<at::Tensor>(permutation->reshape({-1})) : std::nullopt;
    s = check_args(input, flat, factors, out_dtype);
  } else {
    TORCH_CHECK(permutation.has_value() && permutation->dim() == 2,
                FMO_PREFIX "per-row factors need the permutation as a 2-D (M, topk) tensor");
    TORCH_CHECK(factors.dim() == 1 && factors.size(0) == input.size(0),
                FMO_PREFIX "per-row factors must be a 1-D tensor of input.shape[0] = ", input.size(0),
                " entries, got shape ", shape_str(factors));
    // The public checks on a stand-in (M, topk) factors tensor of one element (zero strides):
    // the same dtype and device rules.
    const at::Tensor like = at::empty_strided({permutation->size(0), permutation->size(1)}, {0, 0}, factors.options());
    s = check_args(input, permutation->reshape({-1}), like, out_dtype);
  }
  if (o.addend.has_value()) {
    const at::Tensor& a = *o.addend;
    TORCH_CHECK(addend_fits(a, s.m, s.k), FMO_PREFIX "addend must broadcast to (M, K) = (", s.m, ", ", s.k,
                ") or, with more than 2 dimensions, hold M*K elements with last dimension K, got ", shape_str(a));
    TORCH_CHECK(is_supported_float(a.scalar_type()),
                FMO_PREFIX "addend must have dtype float32, float16, bfloat16, got ", dtype_str(a.scalar_type()));
    TORCH_CHECK(a.device() == input.device(), FMO_PREFIX "addend must be on the same device as input (",
                input.device(), "), got ", a.device());
  }
  if (o.row_mask.has_value()) {
    const at::Tensor& r = *o.row_mask;
    TORCH_CHECK(r.scalar_type() == at::kBool && r.dim() == 1 && r.size(0) == s.rows,
                FMO_PREFIX "row_mask must be a 1-D bool tensor of input.shape[0] = ", s.rows, " entries, got ",
                dtype_str(r.scalar_type()), " of shape ", shape_str(r));
    TORCH_CHECK(r.device() == input.device(), FMO_PREFIX "row_mask must be on the same device as input (",
                input.device(), "), got ", r.device());
  }
  return s;
}

// [first byte, last byte + 1) of the memory a tensor's elements live in.
inline std::pair<uintptr_t, uintptr_t> byte_span(const at::Tensor& t) {
  const auto start = reinterpret_cast<uintptr_t>(t.data_ptr());
  int64_t extent = 1;
  for (int64_t d = 0; d < t.dim(); ++d) extent += (t.size(d) - 1) * t.stride(d);
  return {start, start + static_cast<uintptr_t>(extent * t.element_size())};
}

inline bool spans_overlap(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0) return false;
  const auto sa = byte_span(a), sb = byte_span(b);
  return sa.first < sb.second && sb.first < sa.second;
}

inline void check_out(const at::Tensor& out, const at::Tensor& input, const std::optional<at::Tensor>& permutation,
                      const at::Tensor& factors, const CombineShape& s) {
  TORCH_CHECK(out.dim() == 2 && out.size(0) == s.m && out.size(1) == s.k, FMO_PREFIX "out must have shape (M, K) = (",
              s.m, ", ", s.k, "), got ", shape_str(out));
  TORCH_CHECK(is_supported_float(out.scalar_type()),
              FMO_PREFIX "out must have dtype float32, float16, bfloat16, got ", dtype_str(out.scalar_type()));
  TORCH_CHECK(out.device() == input.device(), FMO_PREFIX "out must be on the same device as input (", input.device(),
              "), got ", out.device());
  // Writing into memory we also read would be a silent wrong answer. ATen's own overlap checks
  // give up ("too hard") on non-dense views, so compare address spans instead: conservative
  // (two interleaved views of one buffer are refused too) but never wrong.
  TORCH_CHECK(at::has_internal_overlap(out) != at::MemOverlap::Yes,
              FMO_PREFIX "out must not have elements that share memory (e.g. an expand()ed tensor)");
  const bool overlaps = spans_overlap(out, input) || spans_overlap(out, factors) ||
                        (permutation.has_value() && spans_overlap(out, *permutation));
  TORCH_CHECK(!overlaps, FMO_PREFIX "out must not share memory with input, permutation or factors");
}

// input rows may be a strided view of a bigger buffer; only the last dimension must be dense.
inline at::Tensor rows_with_dense_last_dim(const at::Tensor& t) {
  return (t.size(1) <= 1 || t.stride(1) == 1) ? t : t.contiguous();
}

template <typename T>
struct TypeTag {
  using type = T;
};

// float32 / float16 / bfloat16 only (check_args has rejected the rest): 9 kernel instantiations
// for (input, output) dtype pairs, not AT_DISPATCH's 16.
template <typename F>
void dispatch_float(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: return f(TypeTag<float>{});
    case at::kHalf: return f(TypeTag<at::Half>{});
    case at::kBFloat16: return f(TypeTag<at::BFloat16>{});
    default: TORCH_CHECK(false, FMO_PREFIX "unsupported dtype ", dtype_str(t));
  }
}

// A device's kernel: writes `dst` (M, K), whose last dimension is dense, from `input`, whose last
// dimension is dense. Arguments are already checked.
// `permutation` is 1-D (M*topk,) here; `factors` is (M, topk), or (R,) when o.factors_per_row.
using CombineFn = void (*)(const at::Tensor& input, const std::optional<at::Tensor>& permutation,
                           const at::Tensor& factors, const CombineShape& s, const CombineOptions& o,
                           at::Tensor& dst);

template <CombineFn combine>
void combine_into(const at::Tensor& input, const std::optional<at::Tensor>& permutation, const at::Tensor& factors,
                  const CombineShape& s, const CombineOptions& o, at::Tensor& out) {
  const at::Tensor rows = rows_with_dense_last_dim(input);
  const std::optional<at::Tensor> flat =
      permutation.has_value() ? std::optional<at::Tensor>(permutation->reshape({-1})) : std::nullopt;
  CombineOptions dense = o;
  if (o.addend.has_value()) {
    at::Tensor a = addend_as_rows(*o.addend, s.m, s.k);
    dense.addend = (s.k > 1 && a.stride(1) != 1) ? a.contiguous() : a;
  }
  if (s.k <= 1 || out.stride(1) == 1) {
    combine(rows, flat, factors, s, dense, out);
    return;
  }
  at::Tensor dst = at::empty({s.m, s.k}, out.options());  // an `out` with a strided last dimension
  combine(rows, flat, factors, s, dense, dst);
  out.copy_(dst);
}

// The two overloads of the schema, for one device's kernel.
template <CombineFn combine>
at::Tensor shuffle_mul_sum_functional(const at::Tensor& input, const std::optional<at::Tensor>& permutation,
                                      const at::Tensor& factors, std::optional<at::ScalarType> out_dtype) {
  const CombineShape s = check_args(input, permutation, factors, out_dtype);
  at::Tensor out = at::empty({s.m, s.k}, input.options().dtype(out_dtype.value_or(input.scalar_type())));
  combine_into<combine>(input, permutation, factors, s, CombineOptions{}, out);
  return out;
}

template <CombineFn combine>
at::Tensor& shuffle_mul_sum_out(const at::Tensor& input, const std::optional<at::Tensor>& permutation,
                                const at::Tensor& factors, at::Tensor& out) {
  const CombineShape s = check_args(input, permutation, factors, std::nullopt);
  check_out(out, input, permutation, factors, s);
  combine_into<combine>(input, permutation, factors, s, CombineOptions{}, out);
  return out;
}

// The internal op (ops.py: FUSED_SCHEMA), for one device's kernel.
template <CombineFn combine>
at::Tensor shuffle_mul_sum_fused(const at::Tensor& input, const std::optional<at::Tensor>& permutation,
                                 const at::Tensor& factors, std::optional<at::ScalarType> out_dtype,
                                 int64_t negative_index, int64_t factor_round, double scale,
                                 const std::optional<at::Tensor>& addend, const std::optional<at::Tensor>& row_mask) {
  CombineOptions o;
  o.negative_index = negative_index;
  o.factor_round = factor_round;
  o.factors_per_row = factors.dim() == 1;
  o.scale = static_cast<float>(scale);
  o.addend = addend;
  o.row_mask = row_mask;
  const CombineShape s = check_fused_args(input, permutation, factors, out_dtype, o);
  at::Tensor out = at::empty({s.m, s.k}, input.options().dtype(out_dtype.value_or(input.scalar_type())));
  combine_into<combine>(input, permutation, factors, s, o, out);
  return out;
}

}  // namespace fused_moe_ops
