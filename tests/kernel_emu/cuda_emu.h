// CPU emulation of the CUDA constructs our kernels use, so that a kernel file compiles as host
// C++ and its launches run here: on a machine without a GPU, the tests check a kernel's
// indexing, tiling and shared-memory use against the CPU op it must equal, with the address
// sanitizer catching every out-of-bounds read or write (or, built with the thread sanitizer, a
// missing barrier: a data race between a block's threads). Emulated: qualifiers, index variables,
// the _rn intrinsics, static and dynamic shared memory, __syncthreads, full-warp
// __shfl_xor_sync. Not emulated, so not to be used by a kernel tested this way: atomics, other
// shuffles, and anything else that relies on warp lockstep.
//
// A launch runs its blocks one after another. Without barriers a block's threads run one after
// another too; a kernel that calls __syncthreads runs each block's threads as real threads
// meeting at a std::barrier, which is what __syncthreads promises. A thread that returns early
// from such a kernel while the others still wait would unbalance the barrier: the results then
// come out wrong, which the tests see (on a GPU it is undefined behaviour).
#pragma once
#include <math.h>

#include <algorithm>
#include <barrier>
#include <cstdio>
#include <cstdlib>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

struct EmuDim3 {
  unsigned x = 1, y = 1, z = 1;
};

inline EmuDim3 gridDim, blockDim;
inline thread_local EmuDim3 blockIdx, threadIdx;
inline std::barrier<>* emu_block_barrier = nullptr;

inline void __syncthreads() { emu_block_barrier->arrive_and_wait(); }

#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__
// Blocks run one at a time, so a function-local static is exactly a block's shared array.
#define __shared__ static
#define PRS_KERNEL_EMU 1
#define __align__(n) __attribute__((aligned(n)))

using std::max;
using std::min;

// The _rn intrinsics: one IEEE operation, rounded to nearest (the harness is compiled with
// -ffp-contract=off, so nothing is fused into an FMA here either).
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fsqrt_rn(float a) { return sqrtf(a); }

// Dynamic shared memory of the block being run (the kernel files declare their `extern
// __shared__ smem[]` only when PRS_KERNEL_EMU is not defined).
// It is allocated per launch at exactly the launch's size, so the address sanitizer sees an
// access past it.
namespace {
unsigned char* smem = nullptr;
}

// One warp's exchange for the shuffles: each lane posts its value, the warp meets, each lane
// reads its partner's, the warp meets again before the slots are reused.
struct EmuWarp {
  std::barrier<>* meet;
  alignas(8) unsigned char slots[32][8];
};
inline std::vector<EmuWarp> emu_warps;

template <typename T>
T __shfl_xor_sync(unsigned /*mask: every kernel here shuffles across full warps*/, T v, int lane_mask) {
  static_assert(sizeof(T) <= 8, "shuffled values are at most 8 bytes");
  const unsigned t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  if ((blockDim.x * blockDim.y * blockDim.z) % 32 != 0) {
    std::fprintf(stderr, "kernel emulation: a full-warp shuffle in a block that is not whole warps\n");
    std::abort();
  }
  EmuWarp& w = emu_warps[t / 32];
  std::memcpy(w.slots[t % 32], &v, sizeof(T));
  w.meet->arrive_and_wait();
  T r;
  std::memcpy(&r, w.slots[(t % 32) ^ (unsigned)lane_mask], sizeof(T));
  w.meet->arrive_and_wait();
  return r;
}

// Runs `kernel` (a callable taking no arguments; it reads the index globals) over the grid.
inline void emu_launch(EmuDim3 grid, EmuDim3 block, size_t smem_bytes, bool uses_barriers,
                       const std::function<void()>& kernel) {
  gridDim = grid;
  blockDim = block;
  const std::unique_ptr<unsigned char[]> dynamic_smem(new unsigned char[smem_bytes ? smem_bytes : 1]);
  smem = dynamic_smem.get();
  auto fill_smem = [smem_bytes] { std::fill(smem, smem + smem_bytes, (unsigned char)0xA5); };  // as on a GPU
  const unsigned threads = block.x * block.y * block.z;
  auto index = [block](unsigned t) { return EmuDim3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)}; };
  auto each_block = [grid](auto&& body) {
    for (unsigned bz = 0; bz < grid.z; ++bz)
      for (unsigned by = 0; by < grid.y; ++by)
        for (unsigned bx = 0; bx < grid.x; ++bx) body(EmuDim3{bx, by, bz});
  };
  if (!uses_barriers) {
    each_block([&](EmuDim3 b) {
      blockIdx = b;
      fill_smem();
      for (unsigned t = 0; t < threads; ++t) {
        threadIdx = index(t);
        kernel();
      }
    });
    smem = nullptr;
    return;
  }
  // One pool of threads for the launch, going through the blocks together: a barrier before a
  // block (its shared memory is refilled with garbage) and after it (no thread starts the next
  // block while another still uses this one's shared memory).
  std::barrier<> bar(threads);
  emu_block_barrier = &bar;
  std::vector<std::unique_ptr<std::barrier<>>> warp_meets;
  emu_warps.assign((threads + 31) / 32, EmuWarp{});
  for (unsigned w = 0; w < emu_warps.size(); ++w) {
    warp_meets.push_back(std::make_unique<std::barrier<>>(std::min(32u, threads - 32 * w)));
    emu_warps[w].meet = warp_meets.back().get();
  }
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (unsigned t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      threadIdx = index(t);
      each_block([&](EmuDim3 b) {
        blockIdx = b;
        if (t == 0) fill_smem();
        bar.arrive_and_wait();
        kernel();
        bar.arrive_and_wait();
      });
    });
  for (auto& th : pool) th.join();
  emu_block_barrier = nullptr;
  smem = nullptr;
}
