// The scatter form's stable sort on CUB (scatter_sort_cuda.h says why it is a file of its own).
#include "scatter_sort_cuda.h"

#include <cub/device/device_radix_sort.cuh>

namespace fused_moe_ops {
namespace cuda_sort {

cudaError_t sort_pairs_scratch_bytes(int n, int end_bit, size_t* bytes) {
  *bytes = 0;
  return cub::DeviceRadixSort::SortPairs(nullptr, *bytes, static_cast<const uint32_t*>(nullptr),
                                         static_cast<uint32_t*>(nullptr), static_cast<const int32_t*>(nullptr),
                                         static_cast<int32_t*>(nullptr), n, 0, end_bit);
}

cudaError_t sort_pairs(void* scratch, size_t scratch_bytes, const uint32_t* keys_in, uint32_t* keys_out,
                       const int32_t* rows_in, int32_t* rows_out, int n, int end_bit, cudaStream_t stream) {
  return cub::DeviceRadixSort::SortPairs(scratch, scratch_bytes, keys_in, keys_out, rows_in, rows_out, n, 0, end_bit,
                                         stream);
}

}  // namespace cuda_sort
}  // namespace fused_moe_ops
