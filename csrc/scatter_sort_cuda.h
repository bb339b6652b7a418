// The stable sort of the scatter form's step 2 (scatter_mul_sum_cuda_device.cuh): (key, row) pairs
// ordered by key, rows of equal keys kept in their input order, on CUB's radix sort
// (cub::DeviceRadixSort::SortPairs: stable, deterministic, on the given stream, no host sync, no
// allocation of its own: the caller passes the scratch, so the sort captures into a CUDA graph).
//
// A translation unit of its own (scatter_sort_cuda.cu), without torch's headers: CUB's templates are the
// slowest part of the library to compile, and the machine-code checks (fused_moe_ops/codegen), which
// compile shuffle_mul_sum_cuda.cu alone, need none of them.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace fused_moe_ops {
namespace cuda_sort {

// The scratch bytes sort_pairs needs for n pairs whose keys fit in end_bit bits (host only: no launch).
cudaError_t sort_pairs_scratch_bytes(int n, int end_bit, size_t* bytes);

// keys_out / rows_out = (keys_in, rows_in) sorted by the low end_bit bits of the key, stably.
cudaError_t sort_pairs(void* scratch, size_t scratch_bytes, const uint32_t* keys_in, uint32_t* keys_out,
                       const int32_t* rows_in, int32_t* rows_out, int n, int end_bit, cudaStream_t stream);

}  // namespace cuda_sort
}  // namespace fused_moe_ops
