// The CPU kernel checked on a machine torch does not run on here: scripts/cross_arch/check.sh builds
// this file for aarch64 and runs it under qemu-user. It includes the kernel's translation unit
// itself, so it calls exactly the copy the library would select (on aarch64 the baseline copy, GCC
// vector extensions compiled to NEON), with no torch: the few torch shims the kernel calls are the
// stubs in shim_stubs.c (threads from FMO_PROBE_THREADS, parallel_for run piece by piece).
//
// It checks what tests/test_build.py and tests/test_op.py check through torch on x86:
//  * every float16 / bfloat16 bit pattern loaded, every rounding boundary stored, bit for bit
//    against c10's own conversions (what eager computes on that machine);
//  * random combines against a float64 reference, all nine input/output dtype pairs, float32 /
//    float16 / bfloat16 factors, int32 / int64 permutations with -1 entries and duplicates, NaN rows,
//    strided rows, K off the tile, the fused options (wrap, factor rounding, per-row factors, row
//    mask, scale, addend), one thread and the K-chunked parallel split; outputs poisoned first;
//    the tolerance is a float32 accumulator's.
// Exit status 0 when everything matches; the first mismatches are printed.
#include "shuffle_mul_sum_cpu.cpp"

#include <cinttypes>
#include <cstdio>
#include <random>

namespace probe {

using fused_moe_ops::BFloat16;
using fused_moe_ops::CpuArgs;
using fused_moe_ops::Half;
using fused_moe_ops::ScalarType;

int failures = 0;

void report(const char* what, int64_t bad, const std::string& first) {
  std::printf("%-44s %s", what, bad == 0 ? "ok\n" : "MISMATCH ");
  if (bad != 0) {
    std::printf("(%" PRId64 ": %s)\n", bad, first.c_str());
    ++failures;
  }
}

uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

bool same_value(float got, float want) {  // bit for bit, any NaN matching any NaN
  return (std::isnan(got) && std::isnan(want)) || bits_of(got) == bits_of(want);
}

template <typename T>
float to_float(T v) {
  return static_cast<float>(v);
}

template <typename T>
uint16_t bits16(T v) {
  uint16_t u;
  std::memcpy(&u, &v, 2);
  return u;
}

template <typename T>
T from_bits16(uint16_t u) {
  T v;
  std::memcpy(&v, &u, 2);
  return v;
}

// A plain call: out (m, k) = sum_j factors[i, j] * input[perm[i, j]], factors float32 (m, topk).
CpuArgs plain_args(const void* input, int64_t rows, int64_t k, const int64_t* perm, const float* factors,
                   int64_t m, int64_t topk, void* out) {
  CpuArgs a{};
  a.input = input;
  a.input_row_stride = k;
  a.perm.data = perm;
  a.perm.is_int32 = false;
  a.perm.stride_row = topk;
  a.perm.stride_slot = 1;
  a.factors = factors;
  a.factor_type = ScalarType::Float;
  a.factor_stride0 = topk;
  a.factor_stride1 = 1;
  a.out = out;
  a.out_row_stride = k;
  a.m = m;
  a.topk = topk;
  a.k = k;
  a.rows = rows;
  a.scale = 1.f;
  return a;
}

void run(const CpuArgs& a, ScalarType in, ScalarType out) {
  fused_moe_ops::check_permutation_range(a);
  fused_moe_ops::selected().fn(a, in, out);
}

// Loads: every 16-bit pattern, read with factor 1 into float32 (the accumulator starts at +0, so -0
// reads as +0, as eager's sum gives).
template <typename T>
void check_loads(const char* name, ScalarType type) {
  const int64_t k = 4096, m = 65536 / k;
  std::vector<T> x(65536);
  for (int64_t i = 0; i < 65536; ++i) x[i] = from_bits16<T>(static_cast<uint16_t>(i));
  std::vector<int64_t> perm(m);
  for (int64_t i = 0; i < m; ++i) perm[i] = i;
  std::vector<float> w(m, 1.f), out(65536, -12345.f);
  run(plain_args(x.data(), m, k, perm.data(), w.data(), m, 1, out.data()), type, ScalarType::Float);
  int64_t bad = 0;
  std::string first;
  for (int64_t i = 0; i < 65536; ++i) {
    const float want = to_float(x[i]) + 0.f;
    if (!same_value(out[i], want)) {
      if (bad++ == 0) first = "pattern " + std::to_string(i) + " -> " + std::to_string(out[i]) + ", want " + std::to_string(want);
    }
  }
  report((std::string("load ") + name + ", all 65536 patterns").c_str(), bad, first);
}

// Stores: float32 values at every rounding boundary of both 16-bit types (ties to even, both sides
// of each), subnormals, overflow to inf, inf, NaN, signed zeros, written as T.
std::vector<float> boundary_values() {
  std::vector<float> v;
  auto add_edges = [&](float f) {
    const float next = std::nextafter(f, std::numeric_limits<float>::infinity());
    const double mid = (static_cast<double>(f) + static_cast<double>(next)) / 2;
    v.push_back(static_cast<float>(mid));
    v.push_back(std::nextafter(static_cast<float>(mid), 0.f));
    v.push_back(static_cast<float>(mid + std::fabs(mid) * 0x1.0p-30));
    v.push_back(f);
  };
  for (int i = 0; i < 65536; ++i) add_edges(to_float(from_bits16<Half>(static_cast<uint16_t>(i))));
  for (int i = 0; i < 65536; ++i) add_edges(to_float(from_bits16<BFloat16>(static_cast<uint16_t>(i))));
  const float inf = std::numeric_limits<float>::infinity();
  for (float f : {0.f, -0.f, 65504.f, 65519.99f, 65520.f, 1e30f, -1e30f, 3.4e38f, inf, -inf,
                  std::numeric_limits<float>::quiet_NaN(), 0x1.0p-24f, 0x1.0p-25f, 1.5f * 0x1.0p-25f, 0x1.0p-149f, 1e-40f}) {
    v.push_back(f);
  }
  while (v.size() % 1024 != 0) v.push_back(0.f);
  return v;
}

template <typename T>
void check_stores(const char* name, ScalarType type) {
  const std::vector<float> y = boundary_values();
  const int64_t k = 1024, m = static_cast<int64_t>(y.size()) / k;
  std::vector<int64_t> perm(m);
  for (int64_t i = 0; i < m; ++i) perm[i] = i;
  std::vector<float> w(m, 1.f);
  std::vector<T> out(y.size(), from_bits16<T>(0x7bcd));
  run(plain_args(y.data(), m, k, perm.data(), w.data(), m, 1, out.data()), ScalarType::Float, type);
  int64_t bad = 0;
  std::string first;
  for (size_t i = 0; i < y.size(); ++i) {
    const T want = T(y[i] + 0.f);
    const bool ok = (std::isnan(to_float(out[i])) && std::isnan(to_float(want))) || bits16(out[i]) == bits16(want);
    if (!ok && bad++ == 0) {
      char buf[96];
      std::snprintf(buf, sizeof buf, "%a -> 0x%04x, want 0x%04x", y[i], bits16(out[i]), bits16(want));
      first = buf;
    }
  }
  report((std::string("store ") + name + ", " + std::to_string(y.size()) + " boundary values").c_str(), bad, first);
}

// ---- random combines against a float64 reference ---------------------------------------------
struct Buffer {  // a tensor of any of the three float types, stored as its bytes
  ScalarType type;
  std::vector<uint8_t> bytes;
  Buffer(ScalarType t, int64_t n) : type(t), bytes(static_cast<size_t>(n) * (t == ScalarType::Float ? 4 : 2)) {}
  void* data() { return bytes.data(); }
  double get(int64_t i) const {
    if (type == ScalarType::Float) return reinterpret_cast<const float*>(bytes.data())[i];
    if (type == ScalarType::Half) return to_float(reinterpret_cast<const Half*>(bytes.data())[i]);
    return to_float(reinterpret_cast<const BFloat16*>(bytes.data())[i]);
  }
  void set(int64_t i, float v) {  // rounds v to the buffer's type
    if (type == ScalarType::Float) reinterpret_cast<float*>(bytes.data())[i] = v;
    else if (type == ScalarType::Half) reinterpret_cast<Half*>(bytes.data())[i] = Half(v);
    else reinterpret_cast<BFloat16*>(bytes.data())[i] = BFloat16(v);
  }
  void poison() {
    for (int64_t i = 0; i < static_cast<int64_t>(bytes.size()) / (type == ScalarType::Float ? 4 : 2); ++i) set(i, 7777.f);
  }
};

const ScalarType kTypes[] = {ScalarType::Float, ScalarType::Half, ScalarType::BFloat16};

double unit_roundoff(ScalarType t) {
  return t == ScalarType::Float ? 0x1.0p-24 : (t == ScalarType::Half ? 0x1.0p-11 : 0x1.0p-8);
}

double round_factor_ref(double w, int64_t mode) {
  if (mode == fused_moe_ops::kRoundToHalf) return to_float(Half(static_cast<float>(w)));
  if (mode == fused_moe_ops::kRoundToBFloat16) return to_float(BFloat16(static_cast<float>(w)));
  return w;
}

int64_t random_combines(std::mt19937_64& rng, int64_t cases, bool fused) {
  int64_t bad_cases = 0;
  std::uniform_real_distribution<float> uni(-2.f, 2.f);
  const int64_t ms[] = {1, 3, 17, 64};
  const int64_t ks[] = {1, 5, 16, 100, 4096 + 7};
  const int64_t topks[] = {1, 2, 8};
  for (int64_t c = 0; c < cases; ++c) {
    const int64_t m = ms[rng() % 4], k = ks[rng() % 5], topk = topks[rng() % 3];
    const ScalarType in_t = kTypes[rng() % 3], out_t = kTypes[rng() % 3], w_t = kTypes[rng() % 3];
    const int64_t rows = std::max<int64_t>(1, m * topk / 2 + static_cast<int64_t>(rng() % 5));  // duplicates
    const int64_t row_stride = k + static_cast<int64_t>(rng() % 3) * 8;                      // strided rows
    const bool int32_perm = rng() % 2;
    Buffer input(in_t, rows * row_stride), out(out_t, m * k);
    for (int64_t i = 0; i < rows * row_stride; ++i) input.set(i, uni(rng));
    if (rng() % 3 == 0) input.set(static_cast<int64_t>(rng() % rows) * row_stride + static_cast<int64_t>(rng() % k),
                                  std::numeric_limits<float>::quiet_NaN());
    std::vector<int64_t> perm64(m * topk);
    std::vector<int32_t> perm32(m * topk);
    CpuArgs a{};
    a.negative_index = fused && rng() % 2 ? fused_moe_ops::kWrapNegative : fused_moe_ops::kSkipNegative;
    for (int64_t i = 0; i < m * topk; ++i) {
      int64_t p = static_cast<int64_t>(rng() % rows);
      if (rng() % 6 == 0) p = a.negative_index == fused_moe_ops::kWrapNegative ? -1 - static_cast<int64_t>(rng() % rows) : -1;
      perm64[i] = p;
      perm32[i] = static_cast<int32_t>(p);
    }
    a.factors_per_row = fused && rng() % 4 == 0;
    const int64_t n_factors = a.factors_per_row ? rows : m * topk;
    Buffer factors(w_t, n_factors);
    for (int64_t i = 0; i < n_factors; ++i) factors.set(i, uni(rng));
    a.factor_round = fused ? static_cast<int64_t>(rng() % 3) : fused_moe_ops::kNoRound;
    std::vector<uint8_t> mask(rows, 0);  // bool
    const bool use_mask = fused && rng() % 3 == 0;
    if (use_mask) {
      for (auto& b : mask) b = rng() % 4 == 0;
    }
    a.scale = fused && rng() % 2 ? 0.5f : 1.f;
    Buffer addend(kTypes[rng() % 3], m * k);
    const bool use_addend = fused && rng() % 2;
    for (int64_t i = 0; i < m * k; ++i) addend.set(i, uni(rng));

    a.input = input.data();
    a.input_row_stride = row_stride;
    a.perm.data = int32_perm ? static_cast<const void*>(perm32.data()) : static_cast<const void*>(perm64.data());
    a.perm.is_int32 = int32_perm;
    a.perm.stride_row = topk;
    a.perm.stride_slot = 1;
    a.factors = factors.data();
    a.factor_type = w_t;
    a.factor_stride0 = a.factors_per_row ? 1 : topk;
    a.factor_stride1 = a.factors_per_row ? 0 : 1;
    a.out = out.data();
    a.out_row_stride = k;
    a.m = m;
    a.topk = topk;
    a.k = k;
    a.rows = rows;
    if (use_mask) {
      a.row_mask = reinterpret_cast<const bool*>(mask.data());
      a.row_mask_stride = 1;
    }
    if (use_addend) {
      a.addend = addend.data();
      a.addend_type = addend.type;
      a.addend_row_stride = k;
    }
    out.poison();
    run(a, in_t, out_t);

    int64_t bad = 0;
    std::string first;
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t col = 0; col < k; ++col) {
        double ref = 0, magnitude = 0;
        for (int64_t j = 0; j < topk; ++j) {
          int64_t p = perm64[i * topk + j];
          if (p < 0) {
            if (a.negative_index != fused_moe_ops::kWrapNegative) continue;
            p += rows;
          }
          const double w = round_factor_ref(factors.get(a.factors_per_row ? p : i * topk + j), a.factor_round);
          const double x = use_mask && mask[p] ? 0.0 : input.get(p * row_stride + col);
          ref += w * x;
          magnitude += std::fabs(w * x);
        }
        ref *= a.scale;
        magnitude *= a.scale;
        if (use_addend) {
          ref += addend.get(i * k + col);
          magnitude += std::fabs(addend.get(i * k + col));
        }
        const double got = out.get(i * k + col);
        // A float32 accumulator's error, then one rounding to the output type (subnormals included).
        const double acc_err = (topk + 3) * 0x1.0p-24 * magnitude;
        const double tol = acc_err + unit_roundoff(out_t) * (std::fabs(ref) + acc_err) + 0x1.0p-24;
        const bool ok = std::isnan(ref) ? std::isnan(got) : (!std::isnan(got) && std::fabs(got - ref) <= tol);
        if (!ok && bad++ == 0) {
          char buf[160];
          std::snprintf(buf, sizeof buf, "M %" PRId64 " K %" PRId64 " topk %" PRId64 " at (%" PRId64 ", %" PRId64
                        "): %.9g, want %.9g +- %.3g", m, k, topk, i, col, got, ref, tol);
          first = buf;
        }
      }
    }
    if (bad != 0) {
      if (bad_cases++ < 3) std::printf("  %s\n", first.c_str());
    }
  }
  return bad_cases;
}

}  // namespace probe

int main() {
  using namespace probe;
  std::printf("kernel copy: %s\n", fused_moe_ops::selected().isa);
  check_loads<Half>("float16", ScalarType::Half);
  check_loads<BFloat16>("bfloat16", ScalarType::BFloat16);
  check_stores<Half>("float16", ScalarType::Half);
  check_stores<BFloat16>("bfloat16", ScalarType::BFloat16);
  std::mt19937_64 rng(20261204);
  const int64_t cases = 300;
  report("random combines, public op (300 cases)", random_combines(rng, cases, false), "see above");
  report("random combines, fused options (300 cases)", random_combines(rng, cases, true), "see above");
  std::printf("%s\n", failures == 0 ? "all checks passed" : "FAILED");
  return failures == 0 ? 0 : 1;
}
