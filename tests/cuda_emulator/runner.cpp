// The CUDA kernels' device code (csrc/shuffle_mul_sum_cuda_device.cuh, csrc/scatter_mul_sum_cuda_device.cuh)
// run on the CPU grid emulator,
// as a standalone executable fed cases by tests/cuda_emulator/emulated.py. A process of its own, so
// that the ASan + UBSan build never shares an address space with torch, and every tensor lives in an
// allocation of exactly its extent (a read past a tensor's end is a heap overflow).
//
//   runner CASES BLOB RESULTS OUT_BLOB
// CASES: one case per line, `key=value` tokens (emulated.py writes them; the Params field names);
// `op=scatter` marks a case of the scatter form (run_scatter: its three steps, the sort on the host).
// BLOB: the tensors' bytes. RESULTS: one line per case, "ok threads slices vec" or "error <message>".
// OUT_BLOB: each ok case's `out` bytes at its out_result offset.
// The standard headers first: cuda_emulator.h redefines assert, which a later <cassert> would undo.
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <sstream>

#include "shuffle_mul_sum.h"  // Half, BFloat16, the option enums, round_factor

#include "cuda_emulator.h"

#include "scatter_mul_sum_cuda_device.cuh"  // and shuffle_mul_sum_cuda_device.cuh

namespace {

using namespace fused_moe_ops;
using namespace fused_moe_ops::cuda_kernel;

using Case = std::map<std::string, std::string>;

Case parse(const std::string& line) {
  Case c;
  std::istringstream in(line);
  std::string token;
  while (in >> token) {
    const auto eq = token.find('=');
    if (eq != std::string::npos) c[token.substr(0, eq)] = token.substr(eq + 1);
  }
  return c;
}

int64_t get(const Case& c, const char* key, int64_t fallback = 0) {
  const auto it = c.find(key);
  return it == c.end() ? fallback : std::stoll(it->second);
}

// A tensor's bytes in an allocation of exactly its extent, at the data pointer's alignment mod 16.
struct Buffer {
  std::unique_ptr<char[]> storage;
  char* data = nullptr;
  int64_t bytes = 0;
};

// key=blob_offset,bytes,align[,spread_stride_bytes,row_bytes]: a spread buffer holds rows of row_bytes
// taken densely from the blob and placed spread_stride_bytes apart (a row stride past 2^31 elements
// without shipping the gaps).
Buffer take(const Case& c, const char* key, const std::vector<char>& blob) {
  Buffer b;
  const auto it = c.find(key);
  if (it == c.end()) return b;
  std::vector<int64_t> f;
  std::istringstream in(it->second);
  std::string part;
  while (std::getline(in, part, ',')) f.push_back(std::stoll(part));
  const int64_t off = f.at(0), bytes = f.at(1), align = f.at(2);
  int64_t extent = bytes;
  int64_t stride = 0, row = 0;
  if (f.size() == 5) {
    stride = f[3];
    row = f[4];
    extent = bytes == 0 ? 0 : (bytes / row - 1) * stride + row;
  }
  b.storage.reset(new char[align + extent]);
  b.data = b.storage.get() + align;
  b.bytes = extent;
  if (bytes == 0) return b;
  if (stride == 0) {
    std::memcpy(b.data, blob.data() + off, bytes);
  } else {
    for (int64_t r = 0; r * row < bytes; ++r) std::memcpy(b.data + r * stride, blob.data() + off + r * row, row);
  }
  return b;
}

template <typename in_t, typename out_t>
std::string run(const Case& c, Params P, int64_t m) {
  constexpr int kVec = 16 / sizeof(in_t);
  LaunchShape L = choose_launch<in_t, out_t>(P, m, get(c, "sms", 132));
  if (get(c, "threads") > 0) L.threads = static_cast<int>(get(c, "threads"));
  if (get(c, "slices") > 0) L.slices = get(c, "slices");
  P.addend_vec = L.addend_vec;
  cuda_emu::Options opt;
  opt.order = static_cast<cuda_emu::Order>(get(c, "order"));
  opt.seed = static_cast<uint64_t>(get(c, "seed"));
  const dim3 grid(static_cast<unsigned>(m), static_cast<unsigned>(L.slices)), block(static_cast<unsigned>(L.threads));
  if (L.vec) {
    cuda_emu::launch(grid, block, [&] { shuffle_mul_sum_kernel<in_t, out_t, kVec>(P); }, opt);
  } else {
    cuda_emu::launch(grid, block, [&] { shuffle_mul_sum_kernel<in_t, out_t, 1>(P); }, opt);
  }
  return "ok " + std::to_string(L.threads) + " " + std::to_string(L.slices) + " " + std::to_string(L.vec ? kVec : 1);
}

// The scatter form as combine_scatter_cuda runs it: the keys kernel, the stable sort of (key, row), the
// segment-sum kernel. CUB's radix sort does not run here: std::stable_sort stands in for it (the same
// contract, a stable sort by key; the GPU tests run CUB's). Every buffer is an exact allocation of its own.
template <typename in_t, typename out_t>
std::string run_scatter(const Case& c, SegmentSumParams S, const Buffer& index, int64_t m) {
  constexpr int kVec = 16 / sizeof(in_t);
  const int64_t rows = S.rows;
  cuda_emu::Options opt;
  opt.order = static_cast<cuda_emu::Order>(get(c, "order"));
  opt.seed = static_cast<uint64_t>(get(c, "seed"));
  std::unique_ptr<uint32_t[]> keys(new uint32_t[rows]), sorted_keys(new uint32_t[rows]);
  std::unique_ptr<int32_t[]> row_ids(new int32_t[rows]), sorted_rows(new int32_t[rows]);
  if (rows > 0) {  // the index is checked whenever it has entries, even when the result is empty
    ScatterKeysParams K{};
    K.index = index.data;
    K.index_stride = get(c, "index_stride");
    K.rows = rows;
    K.tokens = m;
    K.negative_index = static_cast<int>(get(c, "negative_index"));
    K.keys = keys.get();
    K.row_ids = row_ids.get();
    const dim3 grid(static_cast<unsigned>(scatter_keys_blocks(rows, get(c, "sms", 132)))), block(kMaxThreads);
    if (get(c, "index_is_int32")) {
      cuda_emu::launch(grid, block, [&] { scatter_keys_kernel<int32_t>(K); }, opt);
    } else {
      cuda_emu::launch(grid, block, [&] { scatter_keys_kernel<int64_t>(K); }, opt);
    }
    std::vector<std::pair<uint32_t, int32_t>> pairs(static_cast<size_t>(rows));
    for (int64_t r = 0; r < rows; ++r) pairs[r] = {keys[r], row_ids[r]};
    std::stable_sort(pairs.begin(), pairs.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
    for (int64_t r = 0; r < rows; ++r) {
      sorted_keys[r] = pairs[r].first;
      sorted_rows[r] = pairs[r].second;
    }
  }
  if (m == 0 || S.combine.k == 0) return "ok 0 0 0";
  S.sorted_keys = sorted_keys.get();
  S.sorted_rows = sorted_rows.get();
  LaunchShape L = choose_launch<in_t, out_t>(S.combine, m, get(c, "sms", 132));
  if (get(c, "threads") > 0) L.threads = static_cast<int>(get(c, "threads"));
  if (get(c, "slices") > 0) L.slices = get(c, "slices");
  S.combine.addend_vec = L.addend_vec;
  const dim3 grid(static_cast<unsigned>(m), static_cast<unsigned>(L.slices)), block(static_cast<unsigned>(L.threads));
  if (L.vec) {
    cuda_emu::launch(grid, block, [&] { scatter_segment_sum_kernel<in_t, out_t, kVec>(S); }, opt);
  } else {
    cuda_emu::launch(grid, block, [&] { scatter_segment_sum_kernel<in_t, out_t, 1>(S); }, opt);
  }
  return "ok " + std::to_string(L.threads) + " " + std::to_string(L.slices) + " " + std::to_string(L.vec ? kVec : 1);
}

template <typename F>
void dispatch_kind(int kind, F&& f) {
  if (kind == kF32) return f(TypeTag<float>{});
  if (kind == kF16) return f(TypeTag<Half>{});
  return f(TypeTag<BFloat16>{});
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 5) {
    std::cerr << "usage: runner CASES BLOB RESULTS OUT_BLOB\n";
    return 2;
  }
  std::ifstream blob_file(argv[2], std::ios::binary);
  const std::vector<char> blob((std::istreambuf_iterator<char>(blob_file)), std::istreambuf_iterator<char>());
  std::ifstream cases(argv[1]);
  std::ofstream results(argv[3]);
  std::vector<char> out_blob;
  std::string line;
  while (std::getline(cases, line)) {
    if (line.empty()) continue;
    const Case c = parse(line);
    Buffer input = take(c, "input", blob), perm = take(c, "perm", blob), factors = take(c, "factors", blob),
           addend = take(c, "addend", blob), row_mask = take(c, "row_mask", blob), out = take(c, "out", blob);
    Params P{};
    P.input = input.data;
    P.input_row_stride = get(c, "input_row_stride");
    P.rows = get(c, "rows");
    P.perm = perm.data;
    P.perm_is_int32 = get(c, "perm_is_int32") != 0;
    P.perm_stride_row = get(c, "perm_stride_row");
    P.perm_stride_slot = get(c, "perm_stride_slot");
    P.factors = factors.data;
    P.factor_kind = static_cast<int>(get(c, "factor_kind"));
    P.factor_stride0 = get(c, "factor_stride0");
    P.factor_stride1 = get(c, "factor_stride1");
    P.factors_per_row = get(c, "factors_per_row") != 0;
    P.negative_index = static_cast<int>(get(c, "negative_index"));
    P.factor_round = static_cast<int>(get(c, "factor_round"));
    P.scale = std::strtof(c.at("scale").c_str(), nullptr);
    P.addend = addend.data;
    P.addend_kind = static_cast<int>(get(c, "addend_kind"));
    P.addend_row_stride = get(c, "addend_row_stride");
    P.row_mask = reinterpret_cast<const bool*>(row_mask.data);
    P.row_mask_stride = get(c, "row_mask_stride");
    P.out = out.data;
    P.out_row_stride = get(c, "out_row_stride");
    P.topk = get(c, "topk");
    P.k = get(c, "k");
    const int64_t m = get(c, "m");
    const bool scatter = c.count("op") && c.at("op") == "scatter";
    Buffer index = take(c, "index", blob);
    SegmentSumParams S{};
    S.combine = P;
    S.rows = P.rows;
    S.factors = factors.data;
    S.factor_kind = P.factor_kind;
    S.factor_stride = P.factor_stride0;
    S.factor_round = P.factor_round;
    std::string verdict = "ok 0 0 0";  // as combine_cuda: no launch for M = 0 or K = 0
    try {
      if (scatter) {
        dispatch_kind(static_cast<int>(get(c, "in_kind")), [&](auto in_tag) {
          dispatch_kind(static_cast<int>(get(c, "out_kind")), [&](auto out_tag) {
            verdict = run_scatter<typename decltype(in_tag)::type, typename decltype(out_tag)::type>(c, S, index, m);
          });
        });
      } else if (m > 0 && P.k > 0) {
        dispatch_kind(static_cast<int>(get(c, "in_kind")), [&](auto in_tag) {
          dispatch_kind(static_cast<int>(get(c, "out_kind")), [&](auto out_tag) {
            verdict = run<typename decltype(in_tag)::type, typename decltype(out_tag)::type>(c, P, m);
          });
        });
      }
    } catch (const cuda_emu::LaunchError& e) {
      std::string message = e.message;
      std::replace(message.begin(), message.end(), '\n', ' ');
      std::cerr << "cuda_emulator: launch failed: " << message << "\n";
      verdict = "error " + message;
    }
    if (verdict.rfind("ok", 0) == 0 && out.bytes > 0) {
      const int64_t at = get(c, "out_result");
      if (static_cast<int64_t>(out_blob.size()) < at + out.bytes) out_blob.resize(at + out.bytes);
      std::memcpy(out_blob.data() + at, out.data, out.bytes);
    }
    results << verdict << "\n";
  }
  std::fflush(stdout);
  std::ofstream(argv[4], std::ios::binary).write(out_blob.data(), static_cast<std::streamsize>(out_blob.size()));
  return 0;
}
