// Shared by the CPU and CUDA kernels of moe::shuffle_mul_sum: argument checks and the resolved
// shape of a call. The schema itself is defined in Python (fused_moe_ops/ops.py); these checks
// carry the same messages as ops.check_args so that a caller gets the same error from the fake
// (torch.compile), the reference fallback and a native kernel.
//
// Written on torch's stable ABI only (torch/csrc/stable, torch/headeronly) and built with
// TORCH_TARGET_VERSION = 2.10 (fused_moe_ops/_kernel_spec.py): one library serves every torch
// from 2.10 on. Errors are thrown as std::runtime_error (Python RuntimeError) and
// std::out_of_range (IndexError) carrying exactly our message (STD_TORCH_CHECK would prefix
// file:line).
//
// The checks and kernels read their tensors through TensorRef (a borrowed handle and its metadata,
// read once), and the boxed kernels (namespace boxed, at the end) unbox the dispatcher's stack
// themselves. TORCH_BOX would wrap every tensor in a torch::stable::Tensor (a shared_ptr: a heap
// allocation and atomic counts each), and every size, stride or dtype read through one is a shim
// call: together a measurable share of a decode-sized call (about 2 us at M = 1).
#pragma once

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <array>
#include <cctype>
#include <cstdint>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace fused_moe_ops {

using Tensor = torch::stable::Tensor;
using ScalarType = torch::headeronly::ScalarType;
using Half = c10::Half;
using BFloat16 = c10::BFloat16;

template <typename... Args>
std::string cat(const Args&... args) {
  std::ostringstream s;
  (s << ... << args);
  return s.str();
}

// A failed check: RuntimeError in Python, with exactly this message.
template <typename... Args>
[[noreturn]] void fail(const Args&... args) {
  throw std::runtime_error(cat(args...));
}
// An index out of range: IndexError in Python.
template <typename... Args>
[[noreturn]] void fail_index(const Args&... args) {
  throw std::out_of_range(cat(args...));
}
#define FMO_CHECK(cond, ...) \
  do {                       \
    if (!(cond)) ::fused_moe_ops::fail(__VA_ARGS__); \
  } while (0)

inline void shim_check(AOTITorchError err, const char* what) {
  if (err != AOTI_TORCH_SUCCESS) fail("moe::shuffle_mul_sum: ", what, " failed");
}

// The dtype of a shim dtype code. The codes of the dtypes a call meets are read once; the rest go
// through the stable ABI's own mapping.
inline ScalarType dtype_of_code(int32_t code) {
  static const int32_t f32 = aoti_torch_dtype_float32(), f16 = aoti_torch_dtype_float16(),
                       bf16 = aoti_torch_dtype_bfloat16(), i32 = aoti_torch_dtype_int32(),
                       i64 = aoti_torch_dtype_int64(), b8 = aoti_torch_dtype_bool();
  if (code == f32) return ScalarType::Float;
  if (code == bf16) return ScalarType::BFloat16;
  if (code == f16) return ScalarType::Half;
  if (code == i64) return ScalarType::Long;
  if (code == i32) return ScalarType::Int;
  if (code == b8) return ScalarType::Bool;
  return torch::stable::detail::to<ScalarType>(torch::stable::detail::from(code));
}

// Where a tensor lives, as (device type, index): compared with ==, printed as Python does.
struct Place {
  int32_t type;
  int32_t index;
  bool operator==(const Place& o) const { return type == o.type && index == o.index; }
  bool operator!=(const Place& o) const { return !(*this == o); }
};

// A tensor as the checks and kernels read it: a borrowed handle (whoever passed it keeps the tensor
// alive) and its metadata, read once with one shim call each. Sizes and strides point into the
// tensor's own metadata, which nothing resizes during a call.
class TensorRef {
 public:
  explicit TensorRef(AtenTensorHandle h) : h_(h) {
    int32_t code = 0;
    shim_check(aoti_torch_get_dim(h, &dim_), "aoti_torch_get_dim");
    shim_check(aoti_torch_get_sizes(h, &sizes_), "aoti_torch_get_sizes");
    shim_check(aoti_torch_get_strides(h, &strides_), "aoti_torch_get_strides");
    shim_check(aoti_torch_get_dtype(h, &code), "aoti_torch_get_dtype");
    shim_check(aoti_torch_get_device_type(h, &place_.type), "aoti_torch_get_device_type");
    shim_check(aoti_torch_get_device_index(h, &place_.index), "aoti_torch_get_device_index");
    dtype_code_ = code;
    dtype_ = dtype_of_code(code);
  }
  AtenTensorHandle get() const { return h_; }
  int64_t dim() const { return dim_; }
  int64_t size(int64_t d) const { return sizes_[d < 0 ? d + dim_ : d]; }
  int64_t stride(int64_t d) const { return strides_[d < 0 ? d + dim_ : d]; }
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d = 0; d < dim_; ++d) n *= sizes_[d];
    return n;
  }
  ScalarType dtype() const { return dtype_; }
  const Place& place() const { return place_; }
  int64_t element_size() const { return static_cast<int64_t>(aoti_torch_dtype_element_size(dtype_code_)); }
  // Read when asked: only once the checks have passed.
  void* data_ptr() const {
    void* p = nullptr;
    shim_check(aoti_torch_get_data_ptr(h_, &p), "aoti_torch_get_data_ptr");
    return p;
  }

 private:
  AtenTensorHandle h_;
  int64_t dim_ = 0;
  int64_t* sizes_ = nullptr;
  int64_t* strides_ = nullptr;
  int32_t dtype_code_ = 0;
  ScalarType dtype_ = ScalarType::Undefined;
  Place place_{};
};

inline ScalarType dtype_of(const TensorRef& t) { return t.dtype(); }
inline const Place& place_of(const TensorRef& t) { return t.place(); }

// An owning tensor handle (what the dispatcher's stack hands a boxed kernel, and what it takes back
// as a result), deleted at scope exit unless released.
class OwnedHandle {
 public:
  OwnedHandle() = default;
  explicit OwnedHandle(AtenTensorHandle h) : h_(h) {}
  OwnedHandle(OwnedHandle&& o) noexcept : h_(std::exchange(o.h_, nullptr)) {}
  OwnedHandle(const OwnedHandle&) = delete;
  OwnedHandle& operator=(const OwnedHandle&) = delete;
  OwnedHandle& operator=(OwnedHandle&&) = delete;
  ~OwnedHandle() {
    if (h_ != nullptr) aoti_torch_delete_tensor_object(h_);
  }
  AtenTensorHandle get() const { return h_; }
  AtenTensorHandle release() { return std::exchange(h_, nullptr); }

 private:
  AtenTensorHandle h_ = nullptr;
};

// A torch::stable::Tensor sharing t's tensor (a new handle), for the torch::stable ops of the rare
// paths (a strided input or out, a re-laid addend).
inline Tensor shared_tensor(const TensorRef& t) {
  AtenTensorHandle h = nullptr;
  shim_check(aoti_torch_new_tensor_handle(t.get(), &h), "aoti_torch_new_tensor_handle");
  return Tensor(h);
}

inline bool is_supported_float(ScalarType t) {
  return t == ScalarType::Float || t == ScalarType::Half || t == ScalarType::BFloat16;
}

inline std::string shape_str(const TensorRef& t) {
  std::ostringstream s;
  s << "(";
  for (int64_t d = 0; d < t.dim(); ++d) s << (d ? ", " : "") << t.size(d);
  if (t.dim() == 1) s << ",";
  s << ")";
  return s.str();
}

inline std::string dtype_str(ScalarType t) {
  // Python spelling (torch.bfloat16, torch.complex64, torch.float8_e4m3fn), as ops.check_args prints it.
  switch (t) {
    case ScalarType::Float: return "torch.float32";
    case ScalarType::Half: return "torch.float16";
    case ScalarType::BFloat16: return "torch.bfloat16";
    case ScalarType::Double: return "torch.float64";
    case ScalarType::Int: return "torch.int32";
    case ScalarType::Long: return "torch.int64";
    case ScalarType::Short: return "torch.int16";
    case ScalarType::Char: return "torch.int8";
    case ScalarType::Byte: return "torch.uint8";
    case ScalarType::Bool: return "torch.bool";
    case ScalarType::ComplexHalf: return "torch.complex32";
    case ScalarType::ComplexFloat: return "torch.complex64";
    case ScalarType::ComplexDouble: return "torch.complex128";
    default: break;
  }
  // The rest (float8_*, uint16/32/64, ...) print as their C++ name lower-cased.
  std::string name = torch::headeronly::toString(t);
  for (auto& ch : name) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  return "torch." + name;
}

inline std::string place_str(const Place& p) {
  std::string name;
  if (p.type == aoti_torch_device_type_cpu()) {
    name = "cpu";
  } else if (p.type == aoti_torch_device_type_cuda()) {
    name = "cuda";
  } else if (p.type == aoti_torch_device_type_meta()) {
    name = "meta";
  } else {
    name = cat("device_type_", p.type);
  }
  return p.index >= 0 && p.type != aoti_torch_device_type_cpu() ? cat(name, ":", p.index) : name;
}

// A new uninitialised (m, k) row-major tensor on `like`'s device.
inline OwnedHandle empty_rows_like(const TensorRef& like, int64_t m, int64_t k, ScalarType dtype) {
  const Place& p = place_of(like);
  const std::array<int64_t, 2> sizes{m, k}, strides{k, 1};
  const int32_t shim_dtype = torch::stable::detail::to<int32_t>(torch::stable::detail::from(dtype));
  AtenTensorHandle handle = nullptr;
  shim_check(aoti_torch_empty_strided(2, sizes.data(), strides.data(), shim_dtype, p.type, p.index, &handle),
             "aoti_torch_empty_strided");
  return OwnedHandle(handle);
}

#define FMO_PREFIX "moe::shuffle_mul_sum: "
#define FMO_SCATTER_PREFIX "moe::scatter_mul_sum: "

struct CombineShape {
  int64_t m;     // output rows (tokens)
  int64_t topk;  // slots per token
  int64_t k;     // hidden size
  int64_t rows;  // rows of input (R)
};

inline void check_input(const TensorRef& input) {
  FMO_CHECK(input.dim() == 2, FMO_PREFIX "input must be a 2-D tensor (R, K), got ", input.dim(), "-D with shape ",
            shape_str(input));
  FMO_CHECK(is_supported_float(dtype_of(input)),
            FMO_PREFIX "input must have dtype float32, float16, bfloat16, got ", dtype_str(dtype_of(input)));
}

inline void check_factors_type(const TensorRef& input, const TensorRef& factors) {
  FMO_CHECK(is_supported_float(dtype_of(factors)),
            FMO_PREFIX "factors must have dtype float32, float16, bfloat16, got ", dtype_str(dtype_of(factors)));
  const Place pi = place_of(input), pf = place_of(factors);
  FMO_CHECK(pf == pi, FMO_PREFIX "factors must be on the same device as input (", place_str(pi), "), got ",
            place_str(pf));
}

// The checks after input's and factors' own: permutation (or identity) against (M, topk), out_dtype.
// `perm_flat`: a 2-D (M, topk) permutation of the internal op, checked as its flattened (M*topk,) self.
inline void check_rest(const TensorRef& input, const std::optional<TensorRef>& permutation, const CombineShape& s,
                       std::optional<ScalarType> out_dtype, bool perm_flat) {
  if (!permutation.has_value()) {
    FMO_CHECK(s.rows == s.m * s.topk, FMO_PREFIX "permutation=None (identity) needs input.shape[0] == M*topk = ", s.m,
              "*", s.topk, " = ", s.m * s.topk, ", got input.shape[0] = ", s.rows);
  } else {
    const TensorRef& p = *permutation;
    FMO_CHECK(dtype_of(p) == ScalarType::Int || dtype_of(p) == ScalarType::Long,
              FMO_PREFIX "permutation must have dtype int32 or int64, got ", dtype_str(dtype_of(p)));
    const int64_t dim = perm_flat ? 1 : p.dim();
    FMO_CHECK(dim == 1, FMO_PREFIX "permutation must be a 1-D tensor (M*topk,), got ", dim, "-D with shape ",
              shape_str(p));
    const Place pi = place_of(input), pp = place_of(p);
    FMO_CHECK(pp == pi, FMO_PREFIX "permutation must be on the same device as input (", place_str(pi), "), got ",
              place_str(pp));
    const int64_t n = perm_flat ? p.numel() : p.size(0);
    FMO_CHECK(n == s.m * s.topk, FMO_PREFIX "permutation must have M*topk = ", s.m, "*", s.topk, " = ", s.m * s.topk,
              " entries (factors is ", s.m, "x", s.topk, "), got ", n);
  }
  if (out_dtype.has_value()) {
    FMO_CHECK(is_supported_float(*out_dtype),
              FMO_PREFIX "out_dtype must be one of float32, float16, bfloat16 or None, got ", dtype_str(*out_dtype));
  }
}

inline CombineShape check_args(const TensorRef& input, const std::optional<TensorRef>& permutation,
                               const TensorRef& factors, std::optional<ScalarType> out_dtype,
                               bool perm_flat = false) {
  check_input(input);
  FMO_CHECK(factors.dim() == 2, FMO_PREFIX "factors must be a 2-D tensor (M, topk), got ", factors.dim(),
            "-D with shape ", shape_str(factors));
  check_factors_type(input, factors);
  const CombineShape s{factors.size(0), factors.size(1), input.size(1), input.size(0)};
  check_rest(input, permutation, s, out_dtype, perm_flat);
  return s;
}

// What the internal op moe::_shuffle_mul_sum_fused adds to the public contract (ops.py documents the
// schema): the facts the fusion pass would otherwise compute in a kernel of their own before the
// op (the negative-index wrap, the factors' rounding, a per-row factor gather) and the consumer it
// would otherwise leave after it (a scale, an add). The public op is the all-default case.
enum NegativeIndex : int64_t {
  kSkipNegative = 0,     // the public op: a negative entry contributes nothing
  kWrapNegative = 1,     // x[idx]: -R <= p < 0 reads row p + R; p < -R is an error
  kNegativeIsError = 2,  // x.index_select(0, idx): every negative entry is an error
};
enum FactorRound : int64_t {
  kNoRound = 0,
  kRoundToHalf = 1,      // factors.to(float16) before the multiply
  kRoundToBFloat16 = 2,  // factors.to(bfloat16) before the multiply
};

struct CombineOptions {
  int64_t negative_index = kSkipNegative;
  int64_t factor_round = kNoRound;
  bool factors_per_row = false;        // factors is (R,): slot (i, j) uses factors[p], p its (wrapped) row
  float scale = 1.f;                   // out = scale * sum + addend, in float32, rounded once
  std::optional<TensorRef> addend;     // (M, K), last dimension dense, any row stride (0: broadcast)
  std::optional<TensorRef> row_mask;   // bool (R,): a row whose entry is true reads as zeros (0 * factor)
};

#if defined(__CUDACC__)
#define FMO_HOST_DEVICE __host__ __device__
#else
#define FMO_HOST_DEVICE
#endif

FMO_HOST_DEVICE inline float round_factor(float w, int64_t mode) {
  if (mode == kRoundToHalf) return static_cast<float>(Half(w));
  if (mode == kRoundToBFloat16) return static_cast<float>(BFloat16(w));
  return w;
}

// The addend of the internal op: broadcastable to (M, K) (a residual, a bias), or, with more than
// two dimensions, M*K elements in row-major (M, K) order (the residual of `out.view(b, s, h) + r`).
inline bool addend_fits(const TensorRef& a, int64_t m, int64_t k) {
  if (a.dim() > 2) return a.size(-1) == k && a.numel() == m * k;
  const int64_t want[2] = {m, k};
  for (int64_t d = 0; d < a.dim(); ++d) {
    const int64_t size = a.size(a.dim() - 1 - d);
    if (size != 1 && size != want[1 - d]) return false;
  }
  return true;
}

// aten::expand through the dispatcher (torch/csrc/stable has no wrapper for it).
inline Tensor expand(const TensorRef& t, std::array<int64_t, 2> sizes) {
  std::array<StableIValue, 3> stack{torch::stable::detail::from(shared_tensor(t)),
                                    torch::stable::detail::from(torch::headeronly::IntHeaderOnlyArrayRef(
                                        sizes.data(), sizes.size())),
                                    torch::stable::detail::from(false)};
  shim_check(torch_call_dispatcher("aten::expand", "", stack.data(), TORCH_ABI_VERSION), "aten::expand");
  return torch::stable::detail::to<Tensor>(stack[0]);
}

// The addend as (M, K) rows whose last dimension is dense (rows may repeat: row stride 0): nullopt
// when the addend is read in place (the kernel takes its row stride, 0 for a broadcast row), else
// the new tensor.
inline std::optional<Tensor> addend_as_rows(const TensorRef& a, int64_t m, int64_t k) {
  // An addend without elements (M = 0 or K = 0) is never read. It must not be re-laid either: torch
  // counts a tensor without elements as contiguous whatever its strides, so contiguous() would give
  // the expanded (0, K) tensor back with its stride-0 rows, and combine_into would re-lay it forever.
  if (a.numel() == 0) return std::nullopt;
  const bool dense_row = a.dim() >= 1 && a.size(-1) == k && (k <= 1 || a.stride(-1) == 1);
  if (a.dim() <= 2 && dense_row && (a.dim() == 1 || a.size(0) == m || a.size(0) == 1)) return std::nullopt;
  Tensor rows = a.dim() > 2 ? torch::stable::reshape(shared_tensor(a), {m, k}) : expand(a, {m, k});
  if (k > 1 && rows.stride(1) != 1) rows = torch::stable::contiguous(rows);
  return rows;
}

// Row stride of an addend as addend_as_rows returns it (1-D or a broadcast row: 0).
inline int64_t addend_row_stride(const TensorRef& a) {
  if (a.dim() < 2 || a.size(0) == 1) return 0;
  return a.stride(0);
}

// Checks of the internal op (the public op's checks, plus the options). A 2-D (M, topk) permutation
// is what carries M and topk when the factors are per row.
inline CombineShape check_fused_args(const TensorRef& input, const std::optional<TensorRef>& permutation,
                                     const TensorRef& factors, std::optional<ScalarType> out_dtype,
                                     const CombineOptions& o) {
  FMO_CHECK(o.negative_index >= kSkipNegative && o.negative_index <= kNegativeIsError,
            FMO_PREFIX "negative_index must be 0 (skip), 1 (wrap) or 2 (error), got ", o.negative_index);
  FMO_CHECK(o.factor_round >= kNoRound && o.factor_round <= kRoundToBFloat16,
            FMO_PREFIX "factor_round must be 0 (none), 1 (float16) or 2 (bfloat16), got ", o.factor_round);
  CombineShape s{};
  const bool perm_2d = permutation.has_value() && permutation->dim() == 2;
  if (!o.factors_per_row) {
    FMO_CHECK(!perm_2d || (permutation->size(0) == factors.size(0) && permutation->size(1) == factors.size(1)),
              FMO_PREFIX "a 2-D permutation must have the factors' shape (M, topk) = ", shape_str(factors), ", got ",
              shape_str(*permutation));
    s = check_args(input, permutation, factors, out_dtype, /*perm_flat=*/perm_2d);
  } else {
    FMO_CHECK(perm_2d, FMO_PREFIX "per-row factors need the permutation as a 2-D (M, topk) tensor");
    FMO_CHECK(factors.dim() == 1 && factors.size(0) == input.size(0),
              FMO_PREFIX "per-row factors must be a 1-D tensor of input.shape[0] = ", input.size(0),
              " entries, got shape ", shape_str(factors));
    // The public checks as for an (M, topk) factors tensor: the same dtype and device rules.
    check_input(input);
    check_factors_type(input, factors);
    s = CombineShape{permutation->size(0), permutation->size(1), input.size(1), input.size(0)};
    check_rest(input, permutation, s, out_dtype, /*perm_flat=*/true);
  }
  if (o.addend.has_value()) {
    const TensorRef& a = *o.addend;
    FMO_CHECK(addend_fits(a, s.m, s.k), FMO_PREFIX "addend must broadcast to (M, K) = (", s.m, ", ", s.k,
              ") or, with more than 2 dimensions, hold M*K elements with last dimension K, got ", shape_str(a));
    FMO_CHECK(is_supported_float(dtype_of(a)),
              FMO_PREFIX "addend must have dtype float32, float16, bfloat16, got ", dtype_str(dtype_of(a)));
    const Place pi = place_of(input), pa = place_of(a);
    FMO_CHECK(pa == pi, FMO_PREFIX "addend must be on the same device as input (", place_str(pi), "), got ",
              place_str(pa));
  }
  if (o.row_mask.has_value()) {
    const TensorRef& r = *o.row_mask;
    FMO_CHECK(dtype_of(r) == ScalarType::Bool && r.dim() == 1 && r.size(0) == s.rows,
              FMO_PREFIX "row_mask must be a 1-D bool tensor of input.shape[0] = ", s.rows, " entries, got ",
              dtype_str(dtype_of(r)), " of shape ", shape_str(r));
    const Place pi = place_of(input), pr = place_of(r);
    FMO_CHECK(pr == pi, FMO_PREFIX "row_mask must be on the same device as input (", place_str(pi), "), got ",
              place_str(pr));
  }
  return s;
}

// [first byte, last byte + 1) of the memory a tensor's elements live in.
inline std::pair<uintptr_t, uintptr_t> byte_span(const TensorRef& t) {
  const auto start = reinterpret_cast<uintptr_t>(t.data_ptr());
  int64_t extent = 1;
  for (int64_t d = 0; d < t.dim(); ++d) extent += (t.size(d) - 1) * t.stride(d);
  return {start, start + static_cast<uintptr_t>(extent * static_cast<int64_t>(t.element_size()))};
}

inline bool spans_overlap(const TensorRef& a, const TensorRef& b) {
  if (a.numel() == 0 || b.numel() == 0) return false;
  const auto sa = byte_span(a), sb = byte_span(b);
  return sa.first < sb.second && sb.first < sa.second;
}

// at::has_internal_overlap(t) == MemOverlap::Yes: a dimension of size > 1 with stride 0.
inline bool has_internal_overlap(const TensorRef& t) {
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.size(d) > 1 && t.stride(d) == 0) return true;
  }
  return false;
}

inline void check_out(const TensorRef& out, const TensorRef& input, const std::optional<TensorRef>& permutation,
                      const TensorRef& factors, const CombineShape& s) {
  FMO_CHECK(out.dim() == 2 && out.size(0) == s.m && out.size(1) == s.k, FMO_PREFIX "out must have shape (M, K) = (",
            s.m, ", ", s.k, "), got ", shape_str(out));
  FMO_CHECK(is_supported_float(dtype_of(out)),
            FMO_PREFIX "out must have dtype float32, float16, bfloat16, got ", dtype_str(dtype_of(out)));
  const Place pi = place_of(input), po = place_of(out);
  FMO_CHECK(po == pi, FMO_PREFIX "out must be on the same device as input (", place_str(pi), "), got ",
            place_str(po));
  // Writing into memory we also read would be a silent wrong answer. Compare address spans:
  // conservative (two interleaved views of one buffer are refused too) but never wrong.
  FMO_CHECK(!has_internal_overlap(out),
            FMO_PREFIX "out must not have elements that share memory (e.g. an expand()ed tensor)");
  const bool overlaps = spans_overlap(out, input) || spans_overlap(out, factors) ||
                        (permutation.has_value() && spans_overlap(out, *permutation));
  FMO_CHECK(!overlaps, FMO_PREFIX "out must not share memory with input, permutation or factors");
}

template <typename T>
struct TypeTag {
  using type = T;
};

// float32 / float16 / bfloat16 only (check_args has rejected the rest): 9 kernel instantiations
// for (input, output) dtype pairs.
template <typename F>
void dispatch_float(ScalarType t, F&& f) {
  switch (t) {
    case ScalarType::Float: return f(TypeTag<float>{});
    case ScalarType::Half: return f(TypeTag<Half>{});
    case ScalarType::BFloat16: return f(TypeTag<BFloat16>{});
    default: fail(FMO_PREFIX "unsupported dtype ", dtype_str(t));
  }
}

// The permutation as the kernels read it: entry (i, j) at perm[i * stride_row + j * stride_slot],
// for a 1-D (M*topk,) tensor and a 2-D (M, topk) one alike (no reshape, no copy).
struct PermLayout {
  const void* data = nullptr;  // nullptr: identity
  bool is_int32 = false;
  int64_t stride_row = 0, stride_slot = 0;
};

inline PermLayout perm_layout(const std::optional<TensorRef>& permutation, int64_t topk) {
  PermLayout l;
  if (!permutation.has_value()) return l;
  const TensorRef& p = *permutation;
  l.data = p.data_ptr();
  l.is_int32 = dtype_of(p) == ScalarType::Int;
  if (p.dim() == 2) {
    l.stride_row = p.stride(0);
    l.stride_slot = p.stride(1);
  } else {
    l.stride_slot = p.stride(0);
    l.stride_row = topk * p.stride(0);
  }
  return l;
}

// A device's kernel: writes `dst` (M, K), whose last dimension is dense, from `input`, whose last
// dimension is dense. Arguments are already checked. `factors` is (M, topk), or (R,) when
// o.factors_per_row; `o.addend`, when present, has a dense last dimension.
using CombineFn = void (*)(const TensorRef& input, const PermLayout& perm, const TensorRef& factors,
                           const CombineShape& s, const CombineOptions& o, const TensorRef& dst);

// The kernel on what it reads: a strided input or addend is first made dense, a strided `out` is
// written through a dense temporary (the rare paths, on torch::stable ops).
template <CombineFn combine>
void combine_into(const TensorRef& input, const std::optional<TensorRef>& permutation, const TensorRef& factors,
                  const CombineShape& s, const CombineOptions& o, const TensorRef& out) {
  // Rows may be strided; the last dimension must be dense. An input without elements is read in place
  // (see addend_as_rows: contiguous() would hand it back unchanged).
  if (input.numel() > 0 && input.size(1) > 1 && input.stride(1) != 1) {
    const Tensor dense = torch::stable::contiguous(shared_tensor(input));
    combine_into<combine>(TensorRef(dense.get()), permutation, factors, s, o, out);
    return;
  }
  const PermLayout perm = perm_layout(permutation, s.topk);
  if (o.addend.has_value()) {
    const std::optional<Tensor> rows = addend_as_rows(*o.addend, s.m, s.k);
    if (rows.has_value()) {  // reshaped, expanded or made dense: a new tensor
      CombineOptions dense = o;
      dense.addend = TensorRef(rows->get());
      combine_into<combine>(input, permutation, factors, s, dense, out);
      return;
    }
  }
  if (s.k <= 1 || out.stride(1) == 1) {
    combine(input, perm, factors, s, o, out);
    return;
  }
  Tensor dst(empty_rows_like(out, s.m, s.k, dtype_of(out)).release());  // an `out` with a strided last dimension
  combine(input, perm, factors, s, o, TensorRef(dst.get()));
  Tensor target = shared_tensor(out);
  torch::stable::copy_(target, dst);
}

// The two overloads of the schema, for one device's kernel. The result is a new owning handle.
template <CombineFn combine>
OwnedHandle shuffle_mul_sum_functional(const TensorRef& input, const std::optional<TensorRef>& permutation,
                                       const TensorRef& factors, std::optional<ScalarType> out_dtype) {
  const CombineShape s = check_args(input, permutation, factors, out_dtype);
  OwnedHandle out = empty_rows_like(input, s.m, s.k, out_dtype.value_or(dtype_of(input)));
  combine_into<combine>(input, permutation, factors, s, CombineOptions{}, TensorRef(out.get()));
  return out;
}

template <CombineFn combine>
void shuffle_mul_sum_out(const TensorRef& input, const std::optional<TensorRef>& permutation,
                         const TensorRef& factors, const TensorRef& out) {
  const CombineShape s = check_args(input, permutation, factors, std::nullopt);
  check_out(out, input, permutation, factors, s);
  combine_into<combine>(input, permutation, factors, s, CombineOptions{}, out);
}

// The internal op (ops.py: FUSED_SCHEMA), for one device's kernel.
template <CombineFn combine>
OwnedHandle shuffle_mul_sum_fused(const TensorRef& input, const std::optional<TensorRef>& permutation,
                                  const TensorRef& factors, std::optional<ScalarType> out_dtype,
                                  const CombineOptions& o) {
  const CombineShape s = check_fused_args(input, permutation, factors, out_dtype, o);
  OwnedHandle out = empty_rows_like(input, s.m, s.k, out_dtype.value_or(dtype_of(input)));
  combine_into<combine>(input, permutation, factors, s, o, TensorRef(out.get()));
  return out;
}

// ---- the boxed kernels the library registers -----------------------------------------------------
// The dispatcher's stack holds owning handles for tensors (an optional one behind a heap-allocated
// StableIValue) and takes an owning handle back for the result.
namespace boxed {

inline void check_arity(const char* op, uint64_t num_args, uint64_t want_args, uint64_t num_outputs) {
  FMO_CHECK(num_args == want_args && num_outputs == 1, "moe::", op, ": the registered schema has ", num_args,
            " arguments and ", num_outputs, " outputs, the kernel takes ", want_args, " and returns 1");
}

inline OwnedHandle take_tensor(StableIValue v) {
  return OwnedHandle(torch::stable::detail::to<AtenTensorHandle>(v));
}

// As torch::stable's own unboxing of a `Tensor?` does it (stableivalue_conversions.h), without the
// torch::stable::Tensor.
inline OwnedHandle take_optional_tensor(StableIValue v) {
  StableIValue* inner = torch::stable::detail::to<StableIValue*>(v);
  if (inner == nullptr) return OwnedHandle();
  OwnedHandle h(torch::stable::detail::to<AtenTensorHandle>(*inner));
#if TORCH_FEATURE_VERSION >= TORCH_VERSION_2_13_0
  shim_check(torch_delete_stable_ivalue(inner), "torch_delete_stable_ivalue");
#else
  delete inner;
#endif
  return h;
}

// A `Tensor` (not `Tensor?`) argument given as None reaches a kernel as an undefined tensor, whose
// metadata cannot be read: named here, with what was expected (ops.check_defined's message).
// `prefix`: the op whose message it is (FMO_PREFIX, or FMO_SCATTER_PREFIX for the scatter form).
inline TensorRef required(const OwnedHandle& h, const char* name, const char* expected,
                          const char* prefix = FMO_PREFIX) {
  bool defined = false;
  shim_check(aoti_torch_is_defined(h.get(), &defined), "aoti_torch_is_defined");
  FMO_CHECK(defined, prefix, name, " must be a tensor ", expected, ", got None");
  return TensorRef(h.get());
}

inline std::optional<TensorRef> ref_if(const OwnedHandle& h) {
  if (h.get() == nullptr) return std::nullopt;
  return TensorRef(h.get());
}

template <typename T>
T take(StableIValue v) {
  return torch::stable::detail::to<T>(v);
}

// shuffle_mul_sum(Tensor input, Tensor? permutation, Tensor factors, ScalarType? out_dtype) -> Tensor
template <CombineFn combine>
void functional(StableIValue* stack, uint64_t num_args, uint64_t num_outputs) {
  check_arity("shuffle_mul_sum", num_args, 4, num_outputs);
  const OwnedHandle input = take_tensor(stack[0]), permutation = take_optional_tensor(stack[1]),
                    factors = take_tensor(stack[2]);
  const auto out_dtype = take<std::optional<ScalarType>>(stack[3]);
  const TensorRef input_ref = required(input, "input", "(R, K)"), factors_ref = required(factors, "factors", "(M, topk)");
  OwnedHandle out = shuffle_mul_sum_functional<combine>(input_ref, ref_if(permutation), factors_ref, out_dtype);
  stack[0] = torch::stable::detail::from(out.release());
}

// shuffle_mul_sum.out(Tensor input, Tensor? permutation, Tensor factors, *, Tensor(a!) out) -> Tensor(a!)
template <CombineFn combine>
void out_variant(StableIValue* stack, uint64_t num_args, uint64_t num_outputs) {
  check_arity("shuffle_mul_sum.out", num_args, 4, num_outputs);
  const OwnedHandle input = take_tensor(stack[0]), permutation = take_optional_tensor(stack[1]),
                    factors = take_tensor(stack[2]);
  OwnedHandle out = take_tensor(stack[3]);
  const TensorRef input_ref = required(input, "input", "(R, K)"), factors_ref = required(factors, "factors", "(M, topk)");
  shuffle_mul_sum_out<combine>(input_ref, ref_if(permutation), factors_ref, required(out, "out", "(M, K)"));
  stack[0] = torch::stable::detail::from(out.release());  // the same tensor back
}

// _shuffle_mul_sum_fused(input, permutation?, factors, out_dtype?, negative_index, factor_round, scale,
//                        addend?, row_mask?) -> Tensor
template <CombineFn combine>
void fused(StableIValue* stack, uint64_t num_args, uint64_t num_outputs) {
  check_arity("_shuffle_mul_sum_fused", num_args, 9, num_outputs);
  const OwnedHandle input = take_tensor(stack[0]), permutation = take_optional_tensor(stack[1]),
                    factors = take_tensor(stack[2]);
  const auto out_dtype = take<std::optional<ScalarType>>(stack[3]);
  const OwnedHandle addend = take_optional_tensor(stack[7]), row_mask = take_optional_tensor(stack[8]);
  const TensorRef input_ref = required(input, "input", "(R, K)");
  const TensorRef factors_ref = required(factors, "factors", "(M, topk) or (R,)");
  CombineOptions o;
  o.negative_index = take<int64_t>(stack[4]);
  o.factor_round = take<int64_t>(stack[5]);
  o.scale = static_cast<float>(take<double>(stack[6]));
  o.factors_per_row = factors_ref.dim() == 1;
  o.addend = ref_if(addend);
  o.row_mask = ref_if(row_mask);
  OwnedHandle out = shuffle_mul_sum_fused<combine>(input_ref, ref_if(permutation), factors_ref, out_dtype, o);
  stack[0] = torch::stable::detail::from(out.release());
}

}  // namespace boxed

// ==== the scatter form: moe::scatter_mul_sum and moe::_scatter_mul_sum_fused ========================
//
//   out[t, :] = scale * sum_{r < R, index[r] = t} f(factors[r]) * input[r, :] + addend[t, :]
//
// in float32, each token's rows added in increasing r (deterministic: no atomics whose order changes
// the result), rounded once (ops.py documents the schemas; fused_moe_ops/reference.py is the spec).
// The checks below carry exactly the messages of ops.check_scatter_args / check_scatter_fused_args.
//
// What a device's file provides: one ScatterFn, registered as
//     m.impl("scatter_mul_sum", &boxed::scatter<scatter_xxx>);
//     m.impl("_scatter_mul_sum_fused", &boxed::scatter_fused<scatter_xxx>);
// It is called with the arguments checked (shapes, dtypes, devices, options), `input`'s last dimension
// dense (rows any stride), the addend (if any) as (M, K) rows with a dense last dimension and row stride
// addend_row_stride(addend) (0: one row for every token), and `dst` a fresh row-major (M, K) tensor
// of the output dtype. It must
//   - check the index's range (scatter_index_lowest .. M): on the host with fail_scatter_index's
//     IndexError before anything is written (CPU), or in its own way on the device (CUDA); also when
//     M, K or R is 0 (an index entry >= 0 with M = 0 is out of range);
//   - write every element of dst, R = 0 included: a token no row reaches gets scale * 0 + addend (zeros
//     without an addend; NaN for an inf / NaN scale, as the reference gives);
//   - launch nothing when dst has no elements (M = 0 or K = 0), after the range check.

struct ScatterShape {
  int64_t rows;  // R: rows of input, entries of index (and of factors)
  int64_t m;     // num_tokens: rows of the result
  int64_t k;     // hidden size
};

struct ScatterOptions {
  int64_t negative_index = kSkipNegative;  // kWrapNegative: -M <= t < 0 is token t + M (index_put)
  int64_t factor_round = kNoRound;         // round each factor to float16 / bfloat16 first
  float scale = 1.f;                       // out = scale * sum + addend, in float32, rounded once
  std::optional<TensorRef> addend;         // broadcastable to (M, K), or M*K elements (addend_fits)
};

// The index as kernels read it: entry r at data[r * stride], int32 or int64.
struct IndexLayout {
  const void* data = nullptr;
  bool is_int32 = false;
  int64_t stride = 1;
};

inline IndexLayout index_layout(const TensorRef& index) {
  IndexLayout l;
  l.data = index.data_ptr();
  l.is_int32 = dtype_of(index) == ScalarType::Int;
  l.stride = index.dim() == 1 ? index.stride(0) : 1;
  return l;
}

inline void check_scatter_options(int64_t negative_index, int64_t factor_round) {
  FMO_CHECK(negative_index >= kSkipNegative && negative_index <= kNegativeIsError,
            FMO_SCATTER_PREFIX "negative_index must be 0 (skip), 1 (wrap) or 2 (error), got ", negative_index);
  FMO_CHECK(factor_round >= kNoRound && factor_round <= kRoundToBFloat16,
            FMO_SCATTER_PREFIX "factor_round must be 0 (none), 1 (float16) or 2 (bfloat16), got ", factor_round);
}

inline ScatterShape check_scatter_args(const TensorRef& input, const TensorRef& index,
                                       const std::optional<TensorRef>& factors, int64_t num_tokens,
                                       std::optional<ScalarType> out_dtype) {
  FMO_CHECK(input.dim() == 2, FMO_SCATTER_PREFIX "input must be a 2-D tensor (R, K), got ", input.dim(),
            "-D with shape ", shape_str(input));
  FMO_CHECK(is_supported_float(dtype_of(input)),
            FMO_SCATTER_PREFIX "input must have dtype float32, float16, bfloat16, got ", dtype_str(dtype_of(input)));
  const int64_t rows = input.size(0);
  FMO_CHECK(dtype_of(index) == ScalarType::Int || dtype_of(index) == ScalarType::Long,
            FMO_SCATTER_PREFIX "index must have dtype int32 or int64, got ", dtype_str(dtype_of(index)));
  FMO_CHECK(index.dim() == 1 && index.size(0) == rows,
            FMO_SCATTER_PREFIX "index must be a 1-D tensor of input.shape[0] = ", rows, " entries (R,), got shape ",
            shape_str(index));
  const Place pi = place_of(input);
  FMO_CHECK(place_of(index) == pi, FMO_SCATTER_PREFIX "index must be on the same device as input (", place_str(pi),
            "), got ", place_str(place_of(index)));
  if (factors.has_value()) {
    const TensorRef& f = *factors;
    FMO_CHECK(f.dim() == 1 && f.size(0) == rows, FMO_SCATTER_PREFIX "factors must be a 1-D tensor of input.shape[0] = ",
              rows, " entries (R,) or None, got shape ", shape_str(f));
    FMO_CHECK(is_supported_float(dtype_of(f)),
              FMO_SCATTER_PREFIX "factors must have dtype float32, float16, bfloat16, got ", dtype_str(dtype_of(f)));
    FMO_CHECK(place_of(f) == pi, FMO_SCATTER_PREFIX "factors must be on the same device as input (", place_str(pi),
              "), got ", place_str(place_of(f)));
  }
  FMO_CHECK(num_tokens >= 0, FMO_SCATTER_PREFIX "num_tokens must be >= 0, got ", num_tokens);
  if (out_dtype.has_value()) {
    FMO_CHECK(is_supported_float(*out_dtype),
              FMO_SCATTER_PREFIX "out_dtype must be one of float32, float16, bfloat16 or None, got ",
              dtype_str(*out_dtype));
  }
  return ScatterShape{rows, num_tokens, input.size(1)};
}

// The internal op's checks after the options' own (check_scatter_options, which come first, as in
// ops.check_scatter_fused_args): the public op's, then the addend's.
inline ScatterShape check_scatter_fused_args(const TensorRef& input, const TensorRef& index,
                                             const std::optional<TensorRef>& factors, int64_t num_tokens,
                                             std::optional<ScalarType> out_dtype, const ScatterOptions& o) {
  const ScatterShape s = check_scatter_args(input, index, factors, num_tokens, out_dtype);
  if (o.addend.has_value()) {
    const TensorRef& a = *o.addend;
    FMO_CHECK(addend_fits(a, s.m, s.k), FMO_SCATTER_PREFIX "addend must broadcast to (M, K) = (", s.m, ", ", s.k,
              ") or, with more than 2 dimensions, hold M*K elements with last dimension K, got ", shape_str(a));
    FMO_CHECK(is_supported_float(dtype_of(a)),
              FMO_SCATTER_PREFIX "addend must have dtype float32, float16, bfloat16, got ", dtype_str(dtype_of(a)));
    const Place pi = place_of(input);
    FMO_CHECK(place_of(a) == pi, FMO_SCATTER_PREFIX "addend must be on the same device as input (", place_str(pi),
              "), got ", place_str(place_of(a)));
  }
  return s;
}

// The smallest entry allowed (every entry must also be < M): any when negative entries are skipped,
// -M when they wrap, 0 when they are an error.
FMO_HOST_DEVICE inline int64_t scatter_index_lowest(int64_t m, int64_t negative_index) {
  if (negative_index == kSkipNegative) return INT64_MIN;
  return negative_index == kWrapNegative ? -m : 0;
}

// The token entry `t` adds to, or -1 when it is skipped (a negative entry under kSkipNegative). The
// range is checked before.
FMO_HOST_DEVICE inline int64_t scatter_destination(int64_t t, int64_t m, int64_t negative_index) {
  if (t >= 0) return t;
  return negative_index == kWrapNegative ? t + m : -1;
}

// The first out-of-range entry, as reference.check_index_range reports it: IndexError.
[[noreturn]] inline void fail_scatter_index(int64_t pos, int64_t value, int64_t m, int64_t negative_index) {
  if (negative_index == kSkipNegative) {
    fail_index(FMO_SCATTER_PREFIX "index[", pos, "] = ", value, " is out of range: the result has ", m,
               " rows (num_tokens), so entries must be < ", m, " (negative entries are skipped)");
  }
  fail_index(FMO_SCATTER_PREFIX "index[", pos, "] = ", value, " is out of range: the result has ", m,
             " rows (num_tokens), so entries must be in [", scatter_index_lowest(m, negative_index), ", ", m, ")");
}

// A device's scatter kernel (the contract: the comment at the top of this section).
using ScatterFn = void (*)(const TensorRef& input, const IndexLayout& index, const std::optional<TensorRef>& factors,
                           const ScatterShape& s, const ScatterOptions& o, const TensorRef& dst);

// The kernel on what it reads: a strided input (last dimension) or a broadcast / reshaped addend is
// first made into (M, K) rows with a dense last dimension (the rare paths, on torch::stable ops).
template <ScatterFn kernel>
void scatter_into(const TensorRef& input, const TensorRef& index, const std::optional<TensorRef>& factors,
                  const ScatterShape& s, const ScatterOptions& o, const TensorRef& dst) {
  if (input.numel() > 0 && input.size(1) > 1 && input.stride(1) != 1) {
    const Tensor dense = torch::stable::contiguous(shared_tensor(input));
    scatter_into<kernel>(TensorRef(dense.get()), index, factors, s, o, dst);
    return;
  }
  if (o.addend.has_value()) {
    const std::optional<Tensor> rows = addend_as_rows(*o.addend, s.m, s.k);
    if (rows.has_value()) {
      ScatterOptions dense = o;
      dense.addend = TensorRef(rows->get());
      scatter_into<kernel>(input, index, factors, s, dense, dst);
      return;
    }
  }
  kernel(input, index_layout(index), factors, s, o, dst);
}

template <ScatterFn kernel>
OwnedHandle scatter_mul_sum_fused(const TensorRef& input, const TensorRef& index,
                                  const std::optional<TensorRef>& factors, int64_t num_tokens,
                                  std::optional<ScalarType> out_dtype, const ScatterOptions& o) {
  const ScatterShape s = check_scatter_fused_args(input, index, factors, num_tokens, out_dtype, o);
  OwnedHandle out = empty_rows_like(input, s.m, s.k, out_dtype.value_or(dtype_of(input)));
  scatter_into<kernel>(input, index, factors, s, o, TensorRef(out.get()));
  return out;
}

namespace boxed {

// scatter_mul_sum(Tensor input, Tensor index, Tensor? factors, SymInt num_tokens, ScalarType? out_dtype)
template <ScatterFn kernel>
void scatter(StableIValue* stack, uint64_t num_args, uint64_t num_outputs) {
  check_arity("scatter_mul_sum", num_args, 5, num_outputs);
  const OwnedHandle input = take_tensor(stack[0]), index = take_tensor(stack[1]),
                    factors = take_optional_tensor(stack[2]);
  const auto num_tokens = take<int64_t>(stack[3]);
  const auto out_dtype = take<std::optional<ScalarType>>(stack[4]);
  const TensorRef input_ref = required(input, "input", "(R, K)", FMO_SCATTER_PREFIX);
  const TensorRef index_ref = required(index, "index", "(R,)", FMO_SCATTER_PREFIX);
  // The all-default options: the fused checks are then exactly the public op's.
  OwnedHandle out = scatter_mul_sum_fused<kernel>(input_ref, index_ref, ref_if(factors), num_tokens, out_dtype,
                                                  ScatterOptions{});
  stack[0] = torch::stable::detail::from(out.release());
}

// _scatter_mul_sum_fused(input, index, factors?, num_tokens, out_dtype?, negative_index, factor_round, scale,
//                        addend?) -> Tensor
template <ScatterFn kernel>
void scatter_fused(StableIValue* stack, uint64_t num_args, uint64_t num_outputs) {
  check_arity("_scatter_mul_sum_fused", num_args, 9, num_outputs);
  const OwnedHandle input = take_tensor(stack[0]), index = take_tensor(stack[1]),
                    factors = take_optional_tensor(stack[2]);
  const auto num_tokens = take<int64_t>(stack[3]);
  const auto out_dtype = take<std::optional<ScalarType>>(stack[4]);
  const OwnedHandle addend = take_optional_tensor(stack[8]);
  ScatterOptions o;
  o.negative_index = take<int64_t>(stack[5]);
  o.factor_round = take<int64_t>(stack[6]);
  o.scale = static_cast<float>(take<double>(stack[7]));
  check_scatter_options(o.negative_index, o.factor_round);  // first, as in ops.check_scatter_fused_args
  const TensorRef input_ref = required(input, "input", "(R, K)", FMO_SCATTER_PREFIX);
  const TensorRef index_ref = required(index, "index", "(R,)", FMO_SCATTER_PREFIX);
  o.addend = ref_if(addend);
  OwnedHandle out = scatter_mul_sum_fused<kernel>(input_ref, index_ref, ref_if(factors), num_tokens, out_dtype, o);
  stack[0] = torch::stable::detail::from(out.release());
}

}  // namespace boxed

}  // namespace fused_moe_ops
