// The CPU kernel of moe::shuffle_mul_sum, one ISA's copy. No include guard on purpose:
// shuffle_mul_sum_cpu.cpp includes this file once per ISA, each time inside its own
// `#pragma GCC target` region with FMO_ISA naming the namespace (DEFAULT, AVX2, AVX512) and
// FMO_ISA_AVX2 / FMO_ISA_AVX512 selecting the vector code below.
//
// Work is split over (output row, column chunk) so that one token (M = 1, decode) still uses
// every core. Inside a chunk, a tile of columns is held in float32 registers while the topk
// source rows stream through it: every source element is read exactly once, the output is
// written exactly once, and the accumulation is float32 with one rounding at the end.

namespace fused_moe_ops {
namespace FMO_ISA {
namespace {

// ---- one register of floats, and the conversions from / to the three storage types ----------
#if defined(FMO_ISA_AVX512)
using VecF = __m512;
constexpr int64_t kLanes = 16;
inline VecF splat(float x) { return _mm512_set1_ps(x); }
inline VecF vadd(VecF a, VecF b) { return _mm512_add_ps(a, b); }
inline VecF vmul(VecF a, VecF b) { return _mm512_mul_ps(a, b); }
inline VecF vfmadd(VecF x, VecF w, VecF acc) { return _mm512_fmadd_ps(x, w, acc); }
inline VecF vload(const float* p) { return _mm512_loadu_ps(p); }
inline VecF vload(const Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline VecF vload(const BFloat16* p) {
  const __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
}
inline void vstore(float* p, VecF v) { _mm512_storeu_ps(p, v); }
inline void vstore(Half* p, VecF v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
inline void vstore(BFloat16* p, VecF v) {  // round to nearest even, NaN -> 0x7fc0 (c10::BFloat16's rounding)
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  r = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), r, _mm512_set1_epi32(0x7fc0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
}
#elif defined(FMO_ISA_AVX2)
using VecF = __m256;
constexpr int64_t kLanes = 8;
inline VecF splat(float x) { return _mm256_set1_ps(x); }
inline VecF vadd(VecF a, VecF b) { return _mm256_add_ps(a, b); }
inline VecF vmul(VecF a, VecF b) { return _mm256_mul_ps(a, b); }
inline VecF vfmadd(VecF x, VecF w, VecF acc) { return _mm256_fmadd_ps(x, w, acc); }
inline VecF vload(const float* p) { return _mm256_loadu_ps(p); }
inline VecF vload(const Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline VecF vload(const BFloat16* p) {
  const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
}
inline void vstore(float* p, VecF v) { _mm256_storeu_ps(p, v); }
inline void vstore(Half* p, VecF v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
inline void vstore(BFloat16* p, VecF v) {  // round to nearest even, NaN -> 0x7fc0 (c10::BFloat16's rounding)
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  // 8 x u32 (each < 2^16) -> 8 x u16: pack within 128-bit lanes, then gather the two low quarters.
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xd8);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}
#else
// Baseline: GCC / Clang vector extensions of the baseline ISA's register width (16 bytes: SSE2 on
// x86-64, NEON on aarch64); a wider vector type would be split by the compiler with every
// accumulator spilled to the stack between operations (measured: 1.2-1.6x slower than ATen's
// DEFAULT code). The 16-bit conversions are branch-free bit arithmetic on whole vectors, the
// algorithms of c10::detail::fp16_ieee_to_fp32_value / fp16_ieee_from_fp32_value and
// c10::BFloat16's round-to-nearest-even, so they give the scalar conversions' bits.
typedef float VecF __attribute__((vector_size(16)));
typedef uint32_t VecU __attribute__((vector_size(16)));
typedef int32_t VecI __attribute__((vector_size(16)));
typedef uint16_t VecU16 __attribute__((vector_size(8)));
constexpr int64_t kLanes = 4;
inline VecF splat(float x) { return VecF{x, x, x, x}; }
inline VecU splat_u(uint32_t x) { return VecU{x, x, x, x}; }
inline VecF vadd(VecF a, VecF b) { return a + b; }
inline VecF vmul(VecF a, VecF b) { return a * b; }
inline VecF vfmadd(VecF x, VecF w, VecF acc) { return x * w + acc; }
inline VecF as_float(VecU u) {
  VecF f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
inline VecU as_bits(VecF f) {
  VecU u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}
// Lanewise a where mask (all ones), else b; mask is the result of a vector comparison.
inline VecU select(VecI mask, VecU a, VecU b) { return (a & (VecU)mask) | (b & ~(VecU)mask); }
inline VecU load_u16(const void* p) {
  VecU16 h;
  std::memcpy(&h, p, sizeof(h));
  return __builtin_convertvector(h, VecU);
}
inline void store_u16(void* p, VecU u) {
  const VecU16 h = __builtin_convertvector(u, VecU16);  // each lane < 2^16
  std::memcpy(p, &h, sizeof(h));
}
inline VecF vload(const float* p) {
  VecF v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline VecF vload(const BFloat16* p) { return as_float(load_u16(p) << 16); }
inline VecF vload(const Half* p) {
  const VecU w = load_u16(p) << 16;
  const VecU sign = w & splat_u(0x80000000u);
  const VecU two_w = w + w;
  // Normal numbers (and inf / NaN): move the exponent and mantissa into place, rescale the bias.
  const VecF normalized = as_float((two_w >> 4) + splat_u(0xE0u << 23)) * splat(0x1.0p-112f);
  // Subnormals: the mantissa under a magic exponent, minus the magic bias.
  const VecF denormalized = as_float((two_w >> 17) | splat_u(126u << 23)) - splat(0.5f);
  const VecI is_subnormal = (VecI)(two_w < splat_u(1u << 27));
  return as_float(sign | select(is_subnormal, as_bits(denormalized), as_bits(normalized)));
}
inline void vstore(float* p, VecF v) { std::memcpy(p, &v, sizeof(v)); }
inline void vstore(BFloat16* p, VecF v) {  // round to nearest even, NaN -> 0x7fc0 (c10::BFloat16's rounding)
  const VecU u = as_bits(v);
  const VecU rounded = (u + splat_u(0x7fffu) + ((u >> 16) & splat_u(1u))) >> 16;
  store_u16(p, select((VecI)(v != v), splat_u(0x7fc0u), rounded));
}
inline void vstore(Half* p, VecF v) {
  const VecU w = as_bits(v);
  const VecU shl1_w = w + w;
  const VecU sign = w & splat_u(0x80000000u);
  // Rounds the mantissa to 10 bits (nearest even) by adding a power of two that pushes the bits
  // below it out, overflow to inf and underflow to subnormals / zero included.
  VecF base = (as_float(w & splat_u(0x7fffffffu)) * splat(0x1.0p+112f)) * splat(0x1.0p-110f);
  VecU bias = shl1_w & splat_u(0xFF000000u);
  bias = select((VecI)(bias < splat_u(0x71000000u)), splat_u(0x71000000u), bias);
  base = as_float((bias >> 1) + splat_u(0x07800000u)) + base;
  const VecU bits = as_bits(base);
  const VecU nonsign = ((bits >> 13) & splat_u(0x00007C00u)) + (bits & splat_u(0x00000FFFu));
  const VecU is_nan = (VecU)(VecI)(shl1_w > splat_u(0xFF000000u));
  store_u16(p, (sign >> 16) | select((VecI)is_nan, splat_u(0x7E00u), nonsign));
}
#endif

// Float registers per column tile: more spill accumulators to the stack in the baseline copy.
constexpr int64_t kTileRegs = 4;
constexpr int64_t kTile = kLanes * kTileRegs;  // columns per tile (64 with AVX-512, 16 in the baseline copy)
constexpr int64_t kPrefetchBytes = 1024;       // software prefetch distance along a row

inline VecF vload_any(const void* p, ScalarType t, int64_t offset) {
  switch (t) {
    case ScalarType::Float: return vload(static_cast<const float*>(p) + offset);
    case ScalarType::Half: return vload(static_cast<const Half*>(p) + offset);
    default: return vload(static_cast<const BFloat16*>(p) + offset);
  }
}

inline float float_at(const void* base, ScalarType t, int64_t offset) {
  switch (t) {
    case ScalarType::Float: return static_cast<const float*>(base)[offset];
    case ScalarType::Half: return static_cast<float>(static_cast<const Half*>(base)[offset]);
    default: return static_cast<float>(static_cast<const BFloat16*>(base)[offset]);
  }
}

inline int64_t perm_at(const CpuArgs& a, int64_t i, int64_t j) {
  if (a.perm.data == nullptr) return i * a.topk + j;
  const int64_t off = i * a.perm.stride_row + j * a.perm.stride_slot;
  return a.perm.is_int32 ? static_cast<const int32_t*>(a.perm.data)[off]
                         : static_cast<const int64_t*>(a.perm.data)[off];
}

// The row slot (i, j) reads, or -1 for a skipped slot (the range was checked before:
// check_permutation_range). A row_mask'ed row is returned: it reads as zeros (row_is_masked).
inline int64_t source_row(const CpuArgs& a, int64_t i, int64_t j) {
  int64_t p = perm_at(a, i, j);
  if (p < 0) p = a.negative_index == kWrapNegative ? p + a.rows : -1;
  return p;
}

inline bool row_is_masked(const CpuArgs& a, int64_t p) {
  return a.row_mask != nullptr && a.row_mask[p * a.row_mask_stride];
}

// Out = scale * acc + addend, still in float32.
inline VecF epilogue(const CpuArgs& a, int64_t i, int64_t c, VecF acc) {
  if (a.scale != 1.f) acc = vmul(acc, splat(a.scale));
  if (a.addend != nullptr) acc = vadd(acc, vload_any(a.addend, a.addend_type, i * a.addend_row_stride + c));
  return acc;
}

inline float epilogue(const CpuArgs& a, int64_t i, int64_t c, float acc) {
  acc *= a.scale;
  if (a.addend != nullptr) acc += float_at(a.addend, a.addend_type, i * a.addend_row_stride + c);
  return acc;
}

template <typename in_t, typename out_t>
void combine_rows(const CpuArgs& a) {
  const in_t* input = static_cast<const in_t*>(a.input);
  out_t* out = static_cast<out_t*>(a.out);
  const int64_t k = a.k;
  const bool has_epilogue = a.scale != 1.f || a.addend != nullptr;

  // A call that reads less than kSerialBytes runs on the calling thread alone: one core streams it in
  // ~10 us, and waking a second thread costs about that, or milliseconds when that core is busy
  // elsewhere. Such a call (or any call with one thread) is one pass over whole rows.
  constexpr int64_t kSerialBytes = 256 * 1024;
  const int64_t threads = static_cast<int64_t>(torch::stable::get_num_threads());
  const bool serial = threads <= 1 || a.m * a.topk * k * static_cast<int64_t>(sizeof(in_t)) < kSerialBytes;
  // Else K is split into chunks so that M * chunks gives every thread work even when M is 1.
  const int64_t want_tasks = threads * 4;
  int64_t chunks = 1;
  if (!serial && a.m < want_tasks) chunks = std::min<int64_t>((want_tasks + a.m - 1) / a.m, (k + 1023) / 1024);
  chunks = std::max<int64_t>(chunks, 1);
  int64_t chunk_cols = (k + chunks - 1) / chunks;
  chunk_cols = (chunk_cols + kTile - 1) / kTile * kTile;  // whole tiles, so only the last chunk has a tail
  chunks = (k + chunk_cols - 1) / chunk_cols;
  // Grain: enough tasks per parallel_for piece to amortise its cost (~32 KiB of input).
  const int64_t bytes_per_task = std::max<int64_t>(1, a.topk * chunk_cols * (int64_t)sizeof(in_t));
  const int64_t total_tasks = a.m * chunks;
  const int64_t grain = serial ? total_tasks : std::max<int64_t>(1, (32 * 1024) / bytes_per_task);

  constexpr int64_t kTileBytes = kTile * static_cast<int64_t>(sizeof(in_t));
  auto body = [&](int64_t begin, int64_t end) {
    // Loop invariants as locals: the vector stores below may alias anything (the intrinsics' types
    // are may_alias), so what the closure holds by reference would be reloaded after every store.
    const bool epilogue_on = has_epilogue, row_prefetch = a.row_prefetch;
    const int64_t n_chunks = chunks, cols = chunk_cols;
    // A token's live slots: on the stack for every real router's topk, on the heap beyond.
    constexpr int64_t kStackSlots = 64;
    const in_t* src_stack[kStackSlots];
    float w_stack[kStackSlots];
    std::vector<const in_t*> src_heap;
    std::vector<float> w_heap;
    if (a.topk > kStackSlots) {
      src_heap.resize(a.topk);
      w_heap.resize(a.topk);
    }
    const in_t** src = a.topk > kStackSlots ? src_heap.data() : src_stack;
    float* w = a.topk > kStackSlots ? w_heap.data() : w_stack;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task / n_chunks;
      const int64_t c_begin = (task % n_chunks) * cols;
      const int64_t c_end = std::min(k, c_begin + cols);
      // Gather this token's live slots once: skipped slots are dropped here (their factor unread).
      // A masked row reads as zeros: it adds 0 * factor, which is 0, or NaN for a NaN/inf factor
      // (what eager's masked_fill-then-multiply gives), so it only decides the accumulator's start.
      int64_t n = 0;
      float acc0 = 0.f;
      for (int64_t j = 0; j < a.topk; ++j) {
        const int64_t p = source_row(a, i, j);
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
      // At most 16 prefetches a tile: more (float32, topk 8) crowd the loads they were to speed up
      // (measured: docs/BENCHMARKS.md, stable-ABI CPU kernel).
      const bool prefetch = row_prefetch && n * kTileBytes <= 1024;
      // ... and none past the row's end: those lines belong to whatever lies after the row (another
      // row, read later or never), and on short rows (K 4096 in 16 bits: 8 KiB) they were 1/8 more traffic.
      const int64_t prefetch_end = k - kPrefetchBytes / static_cast<int64_t>(sizeof(in_t));
      int64_t c = c_begin;
      for (; c + kTile <= c_end; c += kTile) {
        const bool prefetch_tile = prefetch && c < prefetch_end;
        VecF acc[kTileRegs];
        for (int r = 0; r < kTileRegs; ++r) acc[r] = splat(acc0);
        for (int64_t s = 0; s < n; ++s) {
          const VecF ws = splat(w[s]);
          const in_t* row = src[s] + c;
          // The rows are visited in routing order, so the hardware prefetcher, which stops at each
          // 4 KiB page, restarts on every page of every row: ask for the lines kPrefetchBytes ahead
          // (in the copies and on the CPUs where that was measured to pay: select_kernel).
          if (prefetch_tile) {
            for (int64_t b = 0; b < kTileBytes; b += 64) {
              __builtin_prefetch(reinterpret_cast<const char*>(row) + kPrefetchBytes + b);
            }
          }
          for (int r = 0; r < kTileRegs; ++r) acc[r] = vfmadd(vload(row + r * kLanes), ws, acc[r]);
        }
        if (epilogue_on) {
          for (int r = 0; r < kTileRegs; ++r) acc[r] = epilogue(a, i, c + r * kLanes, acc[r]);
        }
        for (int r = 0; r < kTileRegs; ++r) vstore(dst + c + r * kLanes, acc[r]);
      }
      for (; c < c_end; ++c) {  // tail: K not a multiple of the tile
        float acc = acc0;
        for (int64_t s = 0; s < n; ++s) acc += w[s] * static_cast<float>(src[s][c]);
        dst[c] = static_cast<out_t>(epilogue_on ? epilogue(a, i, c, acc) : acc);
      }
    }
  };
  if (serial || grain >= total_tasks) {
    body(0, total_tasks);  // no trip through the parallel backend for a serial call
  } else {
    torch::stable::parallel_for(0, total_tasks, grain, body);
  }
}

}  // namespace

// This ISA's copy of the kernel. Arguments are checked, the permutation's range too.
void combine_cpu(const CpuArgs& a, ScalarType in_type, ScalarType out_type) {
  dispatch_float(in_type, [&](auto in_tag) {
    dispatch_float(out_type, [&](auto out_tag) {
      combine_rows<typename decltype(in_tag)::type, typename decltype(out_tag)::type>(a);
    });
  });
}

}  // namespace FMO_ISA
}  // namespace fused_moe_ops
