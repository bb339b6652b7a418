// The CPU kernel of moe::scatter_mul_sum (the scatter form), one ISA's copy: the per-token segment
// sum. No include guard on purpose: shuffle_mul_sum_cpu.cpp includes this file once per ISA, right
// after shuffle_mul_sum_cpu_kernel.h, inside the same `#pragma GCC target` region, and uses that
// file's vector helpers (VecF, vload, vstore, kLanes, kTile, ...).
//
// The rows arrive sorted by destination (shuffle_mul_sum_cpu.cpp: sort_by_token, a stable counting
// sort): token t's rows are sorted_rows[segment_start[t] .. segment_start[t + 1]), in increasing r.
// Work is split over (token, column chunk) like the gather kernel's, so that one token (M = 1,
// decode) still uses every core; inside a chunk a tile of columns is held in float32 registers
// while the token's rows stream through it, every row in increasing r.
//
// The determinism contract is stronger than "the same bits every run": the result is the float32
// sum of each token's products, each product rounded, added in increasing r, then scaled and added
// to the addend with one rounding each, then rounded once to the output dtype: bit for bit what
// reference.scatter_mul_sum_fused_reference gives in float32 (CPU index_add_ adds in index order).
// So the products must not be fused into the additions (an FMA rounds once where the spec rounds
// twice, and the compiler contracts a multiply and an add on its own under -ffp-contract=fast, GCC's
// default): keep_rounded below makes each product a value the compiler cannot look through.

namespace fused_moe_ops {
namespace FMO_ISA {
namespace {

// `v` as computed, rounded to float: an empty asm that claims to change it, so no later add can be
// fused with the operation that produced it (costs no instruction).
template <typename T>
inline void keep_rounded(T& v) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  asm("" : "+v"(v));
#elif defined(__aarch64__) && (defined(__GNUC__) || defined(__clang__))
  asm("" : "+w"(v));
#else
  // Other targets: rely on the compiler not contracting (-ffp-contract=off on such a build).
  (void)v;
#endif
}

inline VecF add_product(VecF acc, VecF x, VecF w) {
  VecF p = vmul(x, w);
  keep_rounded(p);
  return vadd(acc, p);
}

inline float add_product(float acc, float x, float w) {
  float p = x * w;
  keep_rounded(p);
  return acc + p;
}

// out = scale * sum + addend, in float32, each operation rounded (the reference's order).
inline VecF scatter_epilogue(const ScatterCpuArgs& a, int64_t t, int64_t c, VecF acc) {
  if (a.scale != 1.f) {
    acc = vmul(acc, splat(a.scale));
    keep_rounded(acc);
  }
  if (a.addend != nullptr) acc = vadd(acc, vload_any(a.addend, a.addend_type, t * a.addend_row_stride + c));
  return acc;
}

inline float scatter_epilogue(const ScatterCpuArgs& a, int64_t t, int64_t c, float acc) {
  if (a.scale != 1.f) {
    acc *= a.scale;
    keep_rounded(acc);
  }
  if (a.addend != nullptr) acc += float_at(a.addend, a.addend_type, t * a.addend_row_stride + c);
  return acc;
}

template <typename in_t, typename out_t>
void scatter_segments(const ScatterCpuArgs& a) {
  const in_t* input = static_cast<const in_t*>(a.input);
  out_t* out = static_cast<out_t*>(a.out);
  const int64_t k = a.k, m = a.m;

  // Serial below kSerialBytes (read and written), for the reason the gather kernel gives: waking a
  // second thread costs what one core needs to stream that much.
  constexpr int64_t kSerialBytes = 256 * 1024;
  const int64_t threads = static_cast<int64_t>(torch::stable::get_num_threads());
  const int64_t bytes =
      (a.live_rows * static_cast<int64_t>(sizeof(in_t)) + m * static_cast<int64_t>(sizeof(out_t))) * k;
  const bool serial = threads <= 1 || bytes < kSerialBytes;
  // K is split into chunks so that every thread has work when M is small, and so that the token with
  // the most rows (all rows to one token, or a skewed routing) is not one thread's alone: enough
  // chunks that the largest token's share is at most 1 / (4 * threads) of the rows. A chunk keeps at
  // least 1024 columns (whole tiles), so each row is still streamed in long runs.
  const int64_t want_tasks = threads * 4;
  int64_t chunks = 1;
  if (!serial) {
    const int64_t by_tokens = (want_tasks + m - 1) / m;
    const int64_t by_skew = a.live_rows > 0 ? (want_tasks * a.max_segment + a.live_rows - 1) / a.live_rows : 1;
    chunks = std::min<int64_t>(std::max(by_tokens, by_skew), (k + 1023) / 1024);
  }
  chunks = std::max<int64_t>(chunks, 1);
  int64_t chunk_cols = (k + chunks - 1) / chunks;
  chunk_cols = (chunk_cols + kTile - 1) / kTile * kTile;
  chunks = (k + chunk_cols - 1) / chunk_cols;
  // Grain: enough tasks per parallel_for piece to amortise its cost (~32 KiB of input on average).
  const int64_t rows_per_token = std::max<int64_t>(1, a.live_rows / std::max<int64_t>(m, 1));
  const int64_t bytes_per_task = std::max<int64_t>(1, rows_per_token * chunk_cols * (int64_t)sizeof(in_t));
  const int64_t total_tasks = m * chunks;
  const int64_t grain = serial ? total_tasks : std::max<int64_t>(1, (32 * 1024) / bytes_per_task);

  constexpr int64_t kTileBytes = kTile * static_cast<int64_t>(sizeof(in_t));
  auto body = [&](int64_t begin, int64_t end) {
    // Loop invariants as locals (the vector stores may alias what the closure holds by reference).
    const int64_t n_chunks = chunks, cols = chunk_cols, row_stride = a.input_row_stride;
    const int64_t* const segment_start = a.segment_start;
    const int64_t* const sorted_rows = a.sorted_rows;
    const float* const sorted_factors = a.sorted_factors;
    const bool has_epilogue = a.scale != 1.f || a.addend != nullptr, row_prefetch = a.row_prefetch;
    const int64_t prefetch_end = k - kPrefetchBytes / static_cast<int64_t>(sizeof(in_t));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t t = task / n_chunks;
      const int64_t c_begin = (task % n_chunks) * cols;
      const int64_t c_end = std::min(k, c_begin + cols);
      const int64_t s_begin = segment_start[t], s_end = segment_start[t + 1];
      out_t* dst = out + t * a.out_row_stride;
      // The gather kernel's software prefetch along each row, under the same limit (at most 16 a tile).
      const bool prefetch = row_prefetch && (s_end - s_begin) * kTileBytes <= 1024;
      int64_t c = c_begin;
      for (; c + kTile <= c_end; c += kTile) {
        const bool prefetch_tile = prefetch && c < prefetch_end;
        VecF acc[kTileRegs];
        for (int r = 0; r < kTileRegs; ++r) acc[r] = splat(0.f);
        for (int64_t s = s_begin; s < s_end; ++s) {
          const VecF ws = splat(sorted_factors[s]);
          const in_t* row = input + sorted_rows[s] * row_stride + c;
          if (prefetch_tile) {
            for (int64_t b = 0; b < kTileBytes; b += 64) {
              __builtin_prefetch(reinterpret_cast<const char*>(row) + kPrefetchBytes + b);
            }
          }
          for (int r = 0; r < kTileRegs; ++r) acc[r] = add_product(acc[r], vload(row + r * kLanes), ws);
        }
        if (has_epilogue) {
          for (int r = 0; r < kTileRegs; ++r) acc[r] = scatter_epilogue(a, t, c + r * kLanes, acc[r]);
        }
        for (int r = 0; r < kTileRegs; ++r) vstore(dst + c + r * kLanes, acc[r]);
      }
      for (; c < c_end; ++c) {  // tail: K not a multiple of the tile
        float acc = 0.f;
        for (int64_t s = s_begin; s < s_end; ++s) {
          acc = add_product(acc, static_cast<float>(input[sorted_rows[s] * row_stride + c]), sorted_factors[s]);
        }
        dst[c] = static_cast<out_t>(has_epilogue ? scatter_epilogue(a, t, c, acc) : acc);
      }
    }
  };
  if (serial || grain >= total_tasks) {
    body(0, total_tasks);
  } else {
    torch::stable::parallel_for(0, total_tasks, grain, body);
  }
}

}  // namespace

// This ISA's copy of the segment sum. Arguments are checked, the index's range too, the rows sorted.
void scatter_cpu(const ScatterCpuArgs& a, ScalarType in_type, ScalarType out_type) {
  dispatch_float(in_type, [&](auto in_tag) {
    dispatch_float(out_type, [&](auto out_tag) {
      scatter_segments<typename decltype(in_tag)::type, typename decltype(out_tag)::type>(a);
    });
  });
}

}  // namespace FMO_ISA
}  // namespace fused_moe_ops
