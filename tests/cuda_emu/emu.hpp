// A CPU emulator for small CUDA kernels, for tests on machines without a GPU
// (tests/test_cuda_emu_attention.py): a kernel source is compiled as host C++ with these headers
// in place of the CUDA ones, and every block runs its threads as ucontext fibers on one OS thread.
// A thread runs until __syncthreads / __syncthreads_or (all threads of the block must arrive:
// anything else is reported as a deadlock) or a bf16 mma.sync (the warp's 32 lanes must arrive;
// the product follows the PTX ISA fragment layout of m16n8k16, operands exact bf16, fp32 sums).
// Warp shuffles (__shfl_xor_sync, full mask), __match_any_sync and __syncwarp likewise wait for the warp's 32 lanes.
// Shared memory starts as NaN, so a read before any write, or a missing barrier that lets a thread
// read a tile another thread has not written yet, usually shows as NaN (static __shared__ arrays
// too, where a test rewrites them to emu::shared_static; tests/test_cuda_emu_gemm.py runs the
// real mma_tile.cuh that way, its mma asm replaced by emu::mma). Not emulated: atomics,
// partial-warp shuffles, memory ordering beyond the barriers, timing. Test-only code.
#pragma once
#include <math.h>
#include <ucontext.h>
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __shared__ static  // one copy for all fibers of the (sequentially run) blocks
#define __constant__
#ifndef __CUDA_ARCH__  // -D__CUDA_ARCH__=750 emulates a pre-sm_80 build (no cp.async, no mma)
#define __CUDA_ARCH__ 800
#endif
using std::min;
struct float4 { float x, y, z, w; };
struct uint4 { uint32_t x, y, z, w; };
struct float2 { float x, y; };
struct uint2 { uint32_t x, y; };
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
namespace emu {
struct Fiber {
  ucontext_t ctx;
  unsigned tid;
  int state = 0;  // 0 runnable, 1 block barrier, 2 warp mma, 3 done, 4 warp shuffle, 5 __syncwarp, 6 match
  int pred = 0;
  std::vector<char> stack;
};
inline Fiber* cur = nullptr;
inline ucontext_t sched;
inline std::vector<Fiber>* fibers = nullptr;
inline dim3 bidx, bdim, gdim;
inline std::vector<float> smem_buf;
inline int or_result = 0;
inline std::function<void()> body;
// A test's planted bug number (tests rewrite kernel code to `if (emu::plant == i) bug else original`).
inline const int plant = std::getenv("EMU_PLANT") ? std::atoi(std::getenv("EMU_PLANT")) : 0;
// EMU_REVERSE=1: run a block's runnable fibers from the last thread to the first (default: first to
// last), each warp running on through its warp collectives before the lower warps start, so a read
// that only a missing barrier orders after (or before) another thread's write changes the result in
// one of the two orders (tests/test_cuda_emu_ops.py runs both).
inline const bool reverse = std::getenv("EMU_REVERSE") && std::atoi(std::getenv("EMU_REVERSE")) != 0;
// Fresh per-block storage for a static __shared__ array that a test rewrote to
// emu::shared_static<T, Id>() (tests/test_cuda_emu_gemm.py): all bytes 0xFF (NaN as fp32 and
// bf16), so a read before the block wrote it shows, where a plain static keeps the last block's data.
inline unsigned long block_gen = 0;
inline std::vector<std::vector<unsigned char>> shared_arena;
template <class T, int Id>
T& shared_static() {
  static T* p = nullptr;
  static unsigned long gen = 0;
  if (gen != block_gen) {
    shared_arena.emplace_back(sizeof(T) + 16, 0xFF);
    auto a = reinterpret_cast<uintptr_t>(shared_arena.back().data());
    p = reinterpret_cast<T*>((a + 15) & ~uintptr_t{15});
    gen = block_gen;
  }
  return *p;
}
// mma operands of each thread (its fragments) and its share of the warp's product
struct Dep { uint32_t a[4], b[2]; float out[4]; };
inline std::vector<Dep> deps;
// __shfl_xor_sync: each lane's value and lane offset, and what it receives.
struct Shfl { double v; int off; double out; };
inline std::vector<Shfl> shfl;
struct Tid { unsigned x, y, z; };
inline Tid tid_of() { return Tid{cur->tid, 0, 0}; }
inline void yield() { swapcontext(&cur->ctx, &sched); }
inline void syncthreads() { cur->state = 1; yield(); }
inline int syncthreads_or(int p) { cur->pred = p; cur->state = 1; yield(); return or_result; }
inline float* smem() { return smem_buf.data(); }
inline void trampoline() { body(); cur->state = 3; swapcontext(&cur->ctx, &sched); }
inline float bf(uint32_t h) { uint32_t u = h << 16; float f; std::memcpy(&f, &u, 4); return f; }
// The warp's D = A·B from its lanes' fragments, lane = 4g + t (PTX ISA, mma.m16n8k16 with .bf16, as
// cuda/mma_tile.cuh documents): a0..a3 = A[g][2t..2t+1], A[g+8][2t..], A[g][2t+8..], A[g+8][2t+8..];
// b0, b1 = B[2t..2t+1][g], B[2t+8..2t+9][g]; c0..c3 = C[g][2t], C[g][2t+1], C[g+8][2t], C[g+8][2t+1];
// the lower k index in each register's low 16 bits.
inline void warp_mma_compute(int w) {
  float A[16][16], B[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const Dep& d = deps[w * 32 + lane];
    int g = lane >> 2, t = lane & 3;
    auto lo = [](uint32_t x) { return bf(x & 0xFFFFu); };
    auto hi = [](uint32_t x) { return bf(x >> 16); };
    A[g][2 * t] = lo(d.a[0]); A[g][2 * t + 1] = hi(d.a[0]);
    A[g + 8][2 * t] = lo(d.a[1]); A[g + 8][2 * t + 1] = hi(d.a[1]);
    A[g][2 * t + 8] = lo(d.a[2]); A[g][2 * t + 9] = hi(d.a[2]);
    A[g + 8][2 * t + 8] = lo(d.a[3]); A[g + 8][2 * t + 9] = hi(d.a[3]);
    B[2 * t][g] = lo(d.b[0]); B[2 * t + 1][g] = hi(d.b[0]);
    B[2 * t + 8][g] = lo(d.b[1]); B[2 * t + 9][g] = hi(d.b[1]);
  }
  for (int lane = 0; lane < 32; ++lane) {
    int g = lane >> 2, t = lane & 3;
    int rr[4] = {g, g, g + 8, g + 8}, cc[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
    for (int r = 0; r < 4; ++r) {
      float s = 0;
      for (int k = 0; k < 16; ++k) s += A[rr[r]][k] * B[k][cc[r]];
      deps[w * 32 + lane].out[r] = s;
    }
  }
}
inline void mma(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  Dep& d = deps[cur->tid];
  for (int i = 0; i < 4; ++i) d.a[i] = a[i];
  d.b[0] = b[0], d.b[1] = b[1];
  cur->state = 2;
  yield();
  for (int r = 0; r < 4; ++r) c[r] += deps[cur->tid].out[r];
}
template <class T>
inline T shfl_xor(T v, int off) {
  Shfl& s = shfl[cur->tid];
  s.v = static_cast<double>(v), s.off = off;
  cur->state = 4;
  yield();
  return static_cast<T>(shfl[cur->tid].out);
}
// __match_any_sync (full mask): the lanes of the warp holding the same value, as a bit mask.
inline unsigned match_any(double v) {
  Shfl& s = shfl[cur->tid];
  s.v = v;
  cur->state = 6;
  yield();
  return static_cast<unsigned>(shfl[cur->tid].out);
}
inline void syncwarp() {
  cur->state = 5;
  yield();
}
inline void run_block(unsigned nthreads) {
  static std::vector<std::vector<char>> stacks;  // kept across blocks: allocating them dominated the run time
  if (stacks.size() < nthreads) stacks.resize(nthreads, std::vector<char>(128 * 1024));
  std::vector<Fiber> fs(nthreads);
  fibers = &fs;
  deps.assign(nthreads, Dep{});
  shfl.assign(nthreads, Shfl{});
  for (unsigned i = 0; i < nthreads; ++i) {
    fs[i].tid = i;
    fs[i].stack.swap(stacks[i]);
    getcontext(&fs[i].ctx);
    fs[i].ctx.uc_stack.ss_sp = fs[i].stack.data();
    fs[i].ctx.uc_stack.ss_size = fs[i].stack.size();
    fs[i].ctx.uc_link = nullptr;
    makecontext(&fs[i].ctx, trampoline, 0);
  }
  // A warp whose 32 lanes all wait at the same collective (mma, shuffle, __syncwarp, match): computed and
  // made runnable again.
  auto release_warp = [&](unsigned w) {
    int nw = 0, ns = 0, ny = 0, nm = 0;
    for (int l = 0; l < 32; ++l) {
      const int st = fs[w * 32 + l].state;
      nw += st == 2, ns += st == 4, ny += st == 5, nm += st == 6;
    }
    if (nm == 32)
      for (int l = 0; l < 32; ++l) {
        unsigned m = 0;
        for (int o = 0; o < 32; ++o) m |= (shfl[w * 32 + o].v == shfl[w * 32 + l].v ? 1u : 0u) << o;
        shfl[w * 32 + l].out = m;
      }
    if (nw == 32) warp_mma_compute(w);
    if (ns == 32)
      for (int l = 0; l < 32; ++l) shfl[w * 32 + l].out = shfl[w * 32 + (l ^ shfl[w * 32 + l].off)].v;
    if (nw == 32 || ns == 32 || ny == 32 || nm == 32) {
      for (int l = 0; l < 32; ++l) fs[w * 32 + l].state = 0;
      return true;
    }
    return false;
  };
  for (;;) {
    for (unsigned i = 0; i < nthreads; ++i) {
      const unsigned t = reverse ? nthreads - 1 - i : i;
      Fiber& f = fs[t];
      if (f.state == 0) { cur = &f; swapcontext(&sched, &f.ctx); }
      // EMU_REVERSE: a warp runs on through its collectives before the lower warps run at all, so it
      // reaches the next write to shared memory first (a missing barrier before it then shows).
      if (reverse && t % 32 == 0 && t + 32 <= nthreads)
        while (release_warp(t / 32))
          for (unsigned l = 32; l-- > 0;)
            if (fs[t + l].state == 0) { cur = &fs[t + l]; swapcontext(&sched, &fs[t + l].ctx); }
    }
    int nb = 0, nd = 0;
    for (auto& f : fs) nb += f.state == 1, nd += f.state == 3;
    if (nd == (int)nthreads) {
      for (unsigned i = 0; i < nthreads; ++i) fs[i].stack.swap(stacks[i]);
      break;
    }
    bool released = false;
    for (unsigned w = 0; w < nthreads / 32; ++w) released |= release_warp(w);
    if (released) continue;
    if (nb == (int)nthreads) {
      or_result = 0;
      for (auto& f : fs) or_result |= f.pred != 0, f.pred = 0, f.state = 0;
      continue;
    }
    std::fprintf(stderr, "EMU DEADLOCK: block (%u,%u,%u): %d threads at a barrier, %d done, of %u\n", bidx.x, bidx.y,
                 bidx.z, nb, nd, nthreads);
    std::abort();
  }
}
inline void launch(dim3 g, unsigned threads, size_t smem_bytes, std::function<void()> k) {
  gdim = g, bdim = dim3(threads);
  body = k;
  for (unsigned z = 0; z < g.z; ++z)
    for (unsigned y = 0; y < g.y; ++y)
      for (unsigned x = 0; x < g.x; ++x) {
        bidx = dim3(x, y, z);
        smem_buf.assign(smem_bytes / 4 + 1, NAN);  // uninitialised shared reads show as NaN
        ++block_gen, shared_arena.clear();
        run_block(threads);
      }
}
}  // namespace emu
#define threadIdx (emu::tid_of())
#define blockIdx (emu::bidx)
#define blockDim (emu::bdim)
#define gridDim (emu::gdim)
#define __syncthreads() emu::syncthreads()
#define __syncthreads_or(p) emu::syncthreads_or(p)
#define __ldg(p) (*(p))
#define __shfl_xor_sync(mask, v, off) emu::shfl_xor((v), (off))
#define __syncwarp() emu::syncwarp()
#define __match_any_sync(mask, v) emu::match_any(static_cast<double>(v))
#define __expf(x) expf(x)
inline float __uint_as_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
#define __trap() std::abort()
