// The grid emulator's own checks, one small kernel each: `selftest NAME [order]` runs kernel NAME and
// prints "LAUNCH ERROR <message>" or "LAUNCH OK <what the kernel observed>". tests/test_cuda_emulated.py
// runs every one and checks the message (a mistake the emulator must report) or the observation.
#include <iostream>
#include <map>
#include <sstream>

#include "cuda_emulator.h"  // last: it redefines assert

namespace {

std::ostringstream seen;  // what a kernel observed, printed after a clean launch

void barrier_at_two_sites() {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncthreads();
  }
}

void barrier_after_an_exit() {
  if (threadIdx.x == 5) return;
  __syncthreads();
}

void ballot_names_an_exited_lane() {
  if (threadIdx.x == 3) return;
  (void)__ballot_sync(0xffffffffu, true);
}

void ballot_names_a_lane_at_a_barrier() {
  if (threadIdx.x == 7) {
    __syncthreads();
  } else {
    (void)__ballot_sync(0xffffffffu, true);
  }
}

void ballot_omits_the_caller() { (void)__ballot_sync(1u, true); }

void ballot_names_a_missing_lane() { (void)__ballot_sync(0xffffffffu, true); }  // launched with 16 threads

void any_at_two_sites() {
  if (threadIdx.x % 2) {
    (void)__any_sync(0xffffffffu, true);
  } else {
    (void)__any_sync(0xffffffffu, true);
  }
}

void device_assert() { assert(threadIdx.x != 9 || blockIdx.x != 1); }

void spins() {
  volatile bool forever = true;
  while (forever) {
  }
}

void votes() {  // 64 threads: two warps vote independently
  const unsigned lane = threadIdx.x % 32;
  const unsigned ballot = __ballot_sync(0xffffffffu, lane % 3 == 0 || threadIdx.x == 40);
  const bool any = __any_sync(0xffffffffu, threadIdx.x == 40);
  const unsigned half = lane < 16 ? __ballot_sync(0x0000ffffu, true) : __ballot_sync(0xffff0000u, lane % 2 == 0);
  if (lane == 0) seen << "warp" << threadIdx.x / 32 << " ballot=" << std::hex << ballot << " any=" << any
                      << " half=" << half << std::dec << " popc=" << __popc(ballot) << ";";
}

void shared_poison() {
  FMO_SHARED(int, never_written, 4);
  FMO_SHARED(float, also_never_written, 1);
  __syncthreads();
  if (threadIdx.x == 0) seen << "int=" << never_written[2] << " nan=" << std::isnan(also_never_written[0]) << ";";
}

void shared_is_per_block() {  // the second block must not see the first one's value
  FMO_SHARED(int, slot, 1);
  if (threadIdx.x == 0) {
    seen << "block" << blockIdx.x << " found " << slot[0] << ";";
    slot[0] = 42;
  }
}

void order_of_first_runs() {
  if (blockIdx.x == 0 && threadIdx.x < 4) seen << threadIdx.x;
}

volatile int g_depth_limit = 1 << 30;  // never reached: the guard page stops the recursion first

int recurse(int depth) {  // 1 KiB frames, page by page down into the guard page below the stack
  volatile char frame[1024];
  frame[0] = static_cast<char>(depth);
  if (depth >= g_depth_limit) return frame[0];
  return recurse(depth + 1) + frame[0];
}

void stack_overflow_hits_the_guard_page() { seen << recurse(0); }

struct Kernel {
  void (*fn)();
  unsigned grid, block;
};

const std::map<std::string, Kernel> kKernels = {
    {"barrier-at-two-sites", {barrier_at_two_sites, 1, 64}},
    {"barrier-after-an-exit", {barrier_after_an_exit, 1, 64}},
    {"ballot-names-an-exited-lane", {ballot_names_an_exited_lane, 1, 32}},
    {"ballot-names-a-lane-at-a-barrier", {ballot_names_a_lane_at_a_barrier, 1, 32}},
    {"ballot-omits-the-caller", {ballot_omits_the_caller, 1, 32}},
    {"ballot-names-a-missing-lane", {ballot_names_a_missing_lane, 1, 16}},
    {"any-at-two-sites", {any_at_two_sites, 1, 32}},
    {"device-assert", {device_assert, 2, 32}},
    {"spins", {spins, 1, 32}},
    {"votes", {votes, 1, 64}},
    {"shared-poison", {shared_poison, 1, 32}},
    {"shared-is-per-block", {shared_is_per_block, 2, 32}},
    {"order", {order_of_first_runs, 1, 32}},
    {"stack-overflow", {stack_overflow_hits_the_guard_page, 1, 1}},
};

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || !kKernels.count(argv[1])) {
    std::cerr << "usage: selftest NAME [forward|reverse|random]\n";
    return 2;
  }
  const Kernel& k = kKernels.at(argv[1]);
  cuda_emu::Options opt;
  opt.timeout_s = 2;
  const std::string order = argc > 2 ? argv[2] : "forward";
  opt.order = order == "reverse" ? cuda_emu::Order::kReverse
                                 : (order == "random" ? cuda_emu::Order::kRandom : cuda_emu::Order::kForward);
  opt.seed = 7;
  try {
    cuda_emu::launch(dim3(k.grid), dim3(k.block), k.fn, opt);
  } catch (const cuda_emu::LaunchError& e) {
    std::cout << "LAUNCH ERROR " << e.message << std::endl;
    return 0;
  }
  std::cout << "LAUNCH OK " << seen.str() << std::endl;
  return 0;
}
