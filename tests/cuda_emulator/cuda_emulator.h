// A CPU grid emulator for the CUDA kernel's device code (csrc/shuffle_mul_sum_cuda_device.cuh), so that
// CI executes that code, unchanged, without a GPU. Test-only: never part of the library.
//
// Blocks run one at a time. Each thread of a block is a fiber (ucontext) on its own mmap'd stack with
// a guard page below it; a thread runs until it reaches __syncthreads or a warp collective
// (__ballot_sync, __any_sync), or returns. When no thread can run, the scheduler resolves what they
// wait at: a warp collective whose lanes all arrived with one mask, else a barrier every live thread
// reached at one call site; anything else is an error, reported with file:line, block and thread,
// never a hang:
//   * a barrier not reached by every thread of the block (one exited), or reached at different sites;
//   * a collective whose mask omits the caller, names a lane that does not exist, has exited, or
//     waits elsewhere (a barrier, another collective);
//   * a thread that never yields (a watchdog, cuda_emu::Options::timeout_s).
// Threads start and resume in forward, reverse or seeded random order: a missing __syncthreads
// passes in forward order (warp 0 stages first), not in the other two.
//
// Shared memory (FMO_SHARED) is a per-block heap array filled with 0xFF bytes (NaN, -1) and freed
// when the block ends: a read of a slot nobody wrote reads poison, a read past the end is a heap
// overflow under ASan. Device assert / printf go to the host; a failed assert prints CUDA's message
// (file:line, block, thread) and fails the launch, as cudaErrorAssert does.
//
// Built with ASan + UBSan (tests/cuda_emulator/build.py): the fiber switches are annotated
// (__sanitizer_start_switch_fiber / __sanitizer_finish_switch_fiber) so ASan follows the stacks.
// Flags that keep the host build honest: -fno-strict-aliasing (the kernel's 16-byte reinterpret_cast
// loads), never -ffast-math (it folds isfinite to true).
#pragma once

#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <utility>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define CUDA_EMU_ASAN 1
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#else
#define CUDA_EMU_ASAN 0
#endif

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace cuda_emu {

enum class Order { kForward, kReverse, kRandom };

struct Options {
  Order order = Order::kForward;
  uint64_t seed = 0;     // kRandom
  unsigned timeout_s = 60;
};

// A launch failed (device assert, barrier divergence, bad collective): what CUDA would report.
struct LaunchError {
  std::string message;
};

enum class Wait { kRunnable, kBarrier, kBallot, kAny, kExited };

struct Site {
  const char* file = "?";
  int line = 0;
  bool operator==(const Site& o) const { return line == o.line && std::strcmp(file, o.file) == 0; }
};

struct Thread {
  ucontext_t ctx;
  char* stack = nullptr;  // usable stack (above the guard page)
  dim3 idx;
  Wait wait = Wait::kRunnable;
  Site site;
  unsigned mask = 0;
  bool pred = false;
  unsigned result = 0;
  void* fake_stack = nullptr;
};

struct SharedArray {
  Site site;
  void* data;
};

constexpr size_t kStackBytes = CUDA_EMU_ASAN ? 256 * 1024 : 128 * 1024;
constexpr size_t kGuardBytes = 4096;
constexpr int kWarp = 32;

struct Block {
  dim3 grid, dim, idx;
  std::vector<Thread> threads;
  std::vector<SharedArray> shared;
  int current = -1;
  ucontext_t scheduler;
  const void* scheduler_stack = nullptr;  // for the fiber-switch annotations
  size_t scheduler_stack_size = 0;
  bool failed = false;
  std::string error;
  const std::function<void()>* body = nullptr;
};

inline Block*& current_block() {
  static Block* b = nullptr;
  return b;
}

inline Thread& self() { return current_block()->threads[current_block()->current]; }

inline std::string where(const Block& b, int tid, const Site& s) {
  const Thread& t = b.threads[tid];
  char buf[512];
  std::snprintf(buf, sizeof buf, "%s:%d: block (%u,%u,%u) thread (%u,%u,%u)", s.file, s.line, b.idx.x, b.idx.y,
                b.idx.z, t.idx.x, t.idx.y, t.idx.z);
  return buf;
}

// Stacks: one pool, reused by every block (a block has at most 1024 threads).
inline std::vector<char*>& stack_pool() {
  static std::vector<char*> pool;
  return pool;
}

inline char* stack_for(size_t i) {
  auto& pool = stack_pool();
  while (pool.size() <= i) {
    void* p = mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
      std::perror("cuda_emulator: mmap of a fiber stack");
      std::abort();
    }
    if (mprotect(p, kGuardBytes, PROT_NONE) != 0) {  // the stack grows down into the guard page
      std::perror("cuda_emulator: mprotect of a guard page");
      std::abort();
    }
    pool.push_back(static_cast<char*>(p) + kGuardBytes);
  }
  return pool[i];
}

// ---- fiber switches (annotated for ASan) ----------------------------------------------------------

inline void enter_fiber(Block& b, int tid) {
  Thread& t = b.threads[tid];
  b.current = tid;
#if CUDA_EMU_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, t.stack, kStackBytes);
  swapcontext(&b.scheduler, &t.ctx);
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#else
  swapcontext(&b.scheduler, &t.ctx);
#endif
  b.current = -1;
}

// From a fiber back to the scheduler; `exiting`: the fiber never resumes (ASan drops its fake stack).
inline void leave_fiber(bool exiting) {
  Block& b = *current_block();
  Thread& t = b.threads[b.current];
#if CUDA_EMU_ASAN
  __sanitizer_start_switch_fiber(exiting ? nullptr : &t.fake_stack, b.scheduler_stack, b.scheduler_stack_size);
  swapcontext(&t.ctx, &b.scheduler);
  __sanitizer_finish_switch_fiber(t.fake_stack, nullptr, nullptr);
#else
  (void)exiting;
  swapcontext(&t.ctx, &b.scheduler);
#endif
}

inline void fiber_main() {
  Block& b = *current_block();
#if CUDA_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &b.scheduler_stack, &b.scheduler_stack_size);
#endif
  (*b.body)();
  b.threads[b.current].wait = Wait::kExited;
  leave_fiber(/*exiting=*/true);
  std::abort();  // never resumed
}

// ---- what a thread calls ---------------------------------------------------------------------------


inline unsigned collective(Wait kind, unsigned mask, bool pred, Site site) {
  Thread& t = self();
  t.wait = kind;
  t.site = site;
  t.mask = mask;
  t.pred = pred;
  leave_fiber(false);
  return self().result;
}

inline void syncthreads(Site site) {
  Thread& t = self();
  t.wait = Wait::kBarrier;
  t.site = site;
  leave_fiber(false);
}

template <typename T>
T* shared_array(int64_t n, Site site) {
  Block& b = *current_block();
  for (const SharedArray& a : b.shared) {
    if (a.site == site) return static_cast<T*>(a.data);
  }
  const size_t bytes = static_cast<size_t>(n) * sizeof(T);
  void* data = std::malloc(bytes ? bytes : 1);
  std::memset(data, 0xFF, bytes);
  b.shared.push_back({site, data});
  return static_cast<T*>(data);
}

[[noreturn]] inline void assert_fail(const char* expr, const char* file, int line, const char* func) {
  Block& b = *current_block();
  const Thread& t = self();
  char buf[1024];
  // CUDA's own wording (a host test can look for "block: [" and "thread: [").
  std::snprintf(buf, sizeof buf, "%s:%d: %s: block: [%u,%u,%u], thread: [%u,%u,%u] Assertion `%s` failed.", file,
                line, func, b.idx.x, b.idx.y, b.idx.z, t.idx.x, t.idx.y, t.idx.z, expr);
  std::fprintf(stderr, "%s\n", buf);
  // The block is never resumed: nothing that owns memory may live on this stack past the switch.
  b.failed = true;
  b.error = "device-side assert triggered: ";
  b.error += buf;
  leave_fiber(/*exiting=*/true);
  std::abort();
}

// ---- the scheduler ---------------------------------------------------------------------------------

inline const char* wait_name(Wait w) {
  switch (w) {
    case Wait::kBarrier: return "__syncthreads";
    case Wait::kBallot: return "__ballot_sync";
    case Wait::kAny: return "__any_sync";
    case Wait::kExited: return "exit";
    default: return "running";
  }
}

inline std::string describe(const Block& b, int tid) {
  const Thread& t = b.threads[tid];
  if (t.wait == Wait::kExited) return "thread " + std::to_string(tid) + " has exited";
  return std::string("thread ") + std::to_string(tid) + " waits at " + wait_name(t.wait) + " " + t.site.file + ":" +
         std::to_string(t.site.line);
}

// Resolve every warp collective whose lanes have all arrived; "" when fine (progress says whether
// one was), else the error.
inline std::string resolve_collectives(Block& b, bool& progress) {
  const int n = static_cast<int>(b.threads.size());
  for (int tid = 0; tid < n; ++tid) {
    Thread& t = b.threads[tid];
    if (t.wait != Wait::kBallot && t.wait != Wait::kAny) continue;
    const int warp0 = tid / kWarp * kWarp, lane = tid % kWarp;
    char head[64];
    std::snprintf(head, sizeof head, "%s(mask 0x%08x): ", wait_name(t.wait), t.mask);
    if (!(t.mask >> lane & 1u)) {
      return where(b, tid, t.site) + ": " + head + "the mask omits the calling lane " + std::to_string(lane);
    }
    unsigned bits = 0;
    for (int l = 0; l < kWarp; ++l) {
      if (!(t.mask >> l & 1u)) continue;
      const int other = warp0 + l;
      if (other >= n) {
        return where(b, tid, t.site) + ": " + head + "the mask names lane " + std::to_string(l) +
               ", which does not exist (blockDim.x = " + std::to_string(n) + ")";
      }
      const Thread& o = b.threads[other];
      if (o.wait != t.wait || !(o.site == t.site) || o.mask != t.mask) {
        return where(b, tid, t.site) + ": " + head + "the mask names lane " + std::to_string(l) + ", but " +
               describe(b, other) + (o.wait == t.wait && o.site == t.site ? " with mask " + std::to_string(o.mask) : "");
      }
      if (o.pred) bits |= 1u << l;
    }
    const unsigned result = t.wait == Wait::kAny ? (bits != 0) : bits;
    for (int l = 0; l < kWarp; ++l) {
      if (!(t.mask >> l & 1u)) continue;
      Thread& o = b.threads[warp0 + l];
      o.result = result;
      o.wait = Wait::kRunnable;
    }
    progress = true;
  }
  return "";
}

inline std::string release_barrier(Block& b) {
  const int n = static_cast<int>(b.threads.size());
  int first = -1;
  for (int tid = 0; tid < n; ++tid) {
    if (b.threads[tid].wait == Wait::kBarrier) {
      first = tid;
      break;
    }
  }
  if (first < 0) return "";
  for (int tid = 0; tid < n; ++tid) {
    const Thread& t = b.threads[tid];
    if (t.wait == Wait::kBarrier && !(t.site == b.threads[first].site)) {
      return where(b, tid, t.site) + ": __syncthreads reached at different call sites: this one and " +
             b.threads[first].site.file + ":" + std::to_string(b.threads[first].site.line) + " (thread " +
             std::to_string(first) + ")";
    }
    if (t.wait != Wait::kBarrier) {
      return where(b, first, b.threads[first].site) + ": __syncthreads not reached by every thread of the block: " +
             describe(b, tid);
    }
  }
  for (Thread& t : b.threads) t.wait = Wait::kRunnable;
  return "";
}

inline std::vector<int> thread_order(int n, const Options& opt, std::mt19937_64& rng) {
  std::vector<int> order(n);
  for (int i = 0; i < n; ++i) order[i] = i;
  if (opt.order == Order::kReverse) std::reverse(order.begin(), order.end());
  if (opt.order == Order::kRandom) std::shuffle(order.begin(), order.end(), rng);
  return order;
}

inline void release_block(Block& b) {
  for (SharedArray& a : b.shared) std::free(a.data);
  b.shared.clear();
#if CUDA_EMU_ASAN
  // An abandoned block's fibers leave poisoned frames on stacks the next block reuses. (A fiber that
  // returned has popped its frames, so a clean block needs nothing.)
  if (b.failed || !std::all_of(b.threads.begin(), b.threads.end(), [](const Thread& t) { return t.wait == Wait::kExited; })) {
    for (size_t i = 0; i < b.threads.size(); ++i) ASAN_UNPOISON_MEMORY_REGION(stack_pool()[i], kStackBytes);
  }
#endif
}

// Run one block to completion; "" or the error.
inline std::string run_block(Block& b, const Options& opt, std::mt19937_64& rng) {
  const int n = static_cast<int>(b.threads.size());
  for (int tid = 0; tid < n; ++tid) {
    Thread& t = b.threads[tid];
    t = Thread{};
    t.idx = dim3(static_cast<unsigned>(tid), 0, 0);
    t.stack = stack_for(static_cast<size_t>(tid));
    getcontext(&t.ctx);
    t.ctx.uc_stack.ss_sp = t.stack;
    t.ctx.uc_stack.ss_size = kStackBytes;
    t.ctx.uc_link = nullptr;
    makecontext(&t.ctx, fiber_main, 0);
  }
  for (;;) {
    bool ran = false;
    for (int tid : thread_order(n, opt, rng)) {
      if (b.threads[tid].wait != Wait::kRunnable) continue;
      enter_fiber(b, tid);
      ran = true;
      if (b.failed) return b.error;
    }
    if (ran) continue;
    if (std::all_of(b.threads.begin(), b.threads.end(), [](const Thread& t) { return t.wait == Wait::kExited; })) {
      return "";
    }
    bool progress = false;
    std::string err = resolve_collectives(b, progress);
    if (!err.empty()) return err;
    if (progress) continue;
    err = release_barrier(b);
    if (!err.empty()) return err;
    if (std::any_of(b.threads.begin(), b.threads.end(), [](const Thread& t) { return t.wait == Wait::kRunnable; })) {
      continue;
    }
    for (int tid = 0; tid < n; ++tid) {  // nothing can move: a deadlock
      if (b.threads[tid].wait != Wait::kExited) {
        return where(b, tid, b.threads[tid].site) + ": deadlock: " + describe(b, tid) + ", and no thread can move";
      }
    }
    return "deadlock";
  }
}

inline void on_watchdog(int) {
  static const char msg[] = "cuda_emulator: a thread ran past the watchdog without reaching a sync point or exit\n";
  (void)!write(2, msg, sizeof msg - 1);
  _exit(3);
}

// Run `body` (one thread's kernel call) over grid x block, blocks in order; throws LaunchError.
inline void launch(dim3 grid, dim3 block, const std::function<void()>& body, const Options& opt = {}) {
  if (block.y != 1 || block.z != 1 || block.x == 0 || block.x > 1024 || grid.z != 1) {
    throw LaunchError{"cuda_emulator: only 1-D blocks of 1..1024 threads and 2-D grids are emulated"};
  }
  std::mt19937_64 rng(opt.seed);
  Block b;
  b.grid = grid;
  b.dim = block;
  b.body = &body;
  b.threads.resize(block.x);
  signal(SIGALRM, on_watchdog);
  alarm(opt.timeout_s);
  for (unsigned y = 0; y < grid.y; ++y) {
    for (unsigned x = 0; x < grid.x; ++x) {
      b.idx = dim3(x, y, 0);
      b.failed = false;
      current_block() = &b;
      const std::string err = run_block(b, opt, rng);
      release_block(b);
      current_block() = nullptr;
      if (!err.empty()) {
        alarm(0);
        throw LaunchError{err};
      }
    }
  }
  alarm(0);
}

}  // namespace cuda_emu

// ---- CUDA's names, as the device code uses them ----------------------------------------------------
#define __device__
#define __host__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define threadIdx (::cuda_emu::self().idx)
#define blockIdx (::cuda_emu::current_block()->idx)
#define blockDim (::cuda_emu::current_block()->dim)
#define gridDim (::cuda_emu::current_block()->grid)
#define __syncthreads() ::cuda_emu::syncthreads(::cuda_emu::Site{__FILE__, __LINE__})
#define __ballot_sync(mask, pred) \
  ::cuda_emu::collective(::cuda_emu::Wait::kBallot, (mask), (pred), ::cuda_emu::Site{__FILE__, __LINE__})
#define __any_sync(mask, pred) \
  (::cuda_emu::collective(::cuda_emu::Wait::kAny, (mask), (pred), ::cuda_emu::Site{__FILE__, __LINE__}) != 0)
#define FMO_SHARED(T, name, n) T* const name = ::cuda_emu::shared_array<T>((n), ::cuda_emu::Site{__FILE__, __LINE__})

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}
using std::fmaf;
// Round-to-nearest multiply and add, never contracted into an FMA (build.py also passes -ffp-contract=off).
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
using std::isfinite;

// Device assert: CUDA's message and a failed launch (cassert is included first, so this one stays).
#include <cassert>
#undef assert
#define assert(e) ((e) ? static_cast<void>(0) : ::cuda_emu::assert_fail(#e, __FILE__, __LINE__, __func__))
