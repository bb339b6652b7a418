/* The torch shims the CPU kernel's translation unit refers to, for kernel_probe.cpp, which runs the
 * kernel without torch. The two the kernel calls do their job: torch_get_num_threads reports
 * FMO_PROBE_THREADS (default 1; more makes the kernel split K into chunks as it does under a
 * multi-threaded torch), torch_parallel_for runs the range piece by piece, grain by grain. Every
 * other one (the op's registration at load, the tensor accessors the probe never reaches) succeeds
 * and does nothing; check.sh generates those from the object's undefined symbols. */
#include <stdint.h>
#include <stdlib.h>

typedef void (*ParallelFunc)(int64_t begin, int64_t end, void* ctx);

int32_t torch_get_num_threads(uint32_t* out) {
  const char* env = getenv("FMO_PROBE_THREADS");
  *out = env ? (uint32_t)atoi(env) : 1u;
  return 0;
}

int32_t torch_parallel_for(int64_t begin, int64_t end, int64_t grain, ParallelFunc func, void* ctx) {
  if (grain < 1) grain = 1;
  for (int64_t b = begin; b < end; b += grain) func(b, b + grain < end ? b + grain : end, ctx);
  return 0;
}
