// The bf16 GEMM's two drivers (cpu/gemm_bf16.cpp): blocked() (the GotoBLAS/BLIS loop, each task its own
// panels) and shared() (A panels packed once per pass by all threads), and drive() choosing between them.
// Templates over the A / B packers; internal linkage, included only by gemm_bf16.cpp.
#pragma once
#include "cpu/gemm_bf16.hpp"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <vector>

#include "common/error.hpp"
#include "cpu/aligned_scratch.hpp"
#include "cpu/cache_info.hpp"
#include "cpu/gemm.hpp"
#include "cpu/gemm_checks.hpp"
#include "cpu/gemm_bf16_amx.hpp"
#include "cpu/gemm_bf16_kernels.hpp"
#include "cpu/gemm_kernels.hpp"
#include "cpu/gemm_scalar.hpp"
#include "cpu/gemv_f32.hpp"
#include "cpu/nf4_gemv_bf16.hpp"
#include "cpu/pack.hpp"
#include "cpu/threads.hpp"

namespace qlora::cpu {
namespace {

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
constexpr int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// ------------------------------------------------------------------ blocked driver
constexpr int MR = bf16_k::kMR, NR = bf16_k::kNR;
// Cache blocking: the fp32 AVX-512 kernel's (derived from this machine's cache sizes, same 14x32
// tile and the same B-panel-from-L2 scheme) with KC doubled: a bf16 pair takes the 4 bytes of one
// fp32 k, so the panels and the A block fill the caches exactly as the fp32 ones do
// (1 MiB L2: KC = 2048 k, MC = 168, NC = 1024). KC is a multiple of 32 (the packers' step).
constexpr int64_t kKCMax = RunScales::kMaxLen;  // RunScales bound
struct Blocking {
  int64_t kc, mc, nc;
};
const Blocking& blocking() {
  static const Blocking b = [] {
    const GemmBlocking f = gemm_blocking_in_use(SimdLevel::AVX512);
    Blocking r;
    r.kc = std::min<int64_t>(kKCMax, std::max<int64_t>(64, (2 * f.kc) / 32 * 32));
    r.mc = std::max<int64_t>(MR, f.mc / MR * MR);
    r.nc = std::max<int64_t>(NR, f.nc / NR * NR);
    return r;
  }();
  return b;
}

thread_local AlignedScratch t_a, t_b, t_tmp;

// The micro-kernel (cpu/gemm_bf16_amx.hpp: AVX512-BF16, or AMX-BF16 where usable / QLORA_AMX=emulate)
// is chosen once per task or shared() call, so its A panels and its calls agree. AMX reads each A
// panel re-laid after packing (once per panel, not per B panel), and takes two panels a call. AMX A
// panels have 16 rows (whole tiles), the AVX512-BF16 kernel's 14: A blocks are in panels of
// panel_rows(uk) (the row grouping changes no element's bits).
using bf16_amx::Kernel;
int panel_rows(Kernel uk) { return uk == Kernel::Avx512Bf16 ? MR : bf16_amx::kMR16; }
// pack_a(i0, mr, p0, kc, Ap, W, amx): one A panel of W >= mr rows, [kp][W] pairs; or, where amx and
// the packer can (true returned), straight in the AMX layout (bf16_amx::pack_a_rows_amx).
template <class PackA>
void pack_a_for(Kernel uk, int w, const PackA& pack_a, int64_t i0, int mr, int64_t p0, int64_t kc, uint32_t* Ap) {
  const bool amx = uk != Kernel::Avx512Bf16;
  if (!pack_a(i0, mr, p0, kc, Ap, w, amx) && amx) bf16_amx::relayout_a(Ap, ceil_div(kc, 2), w);
}
// Rows [0, rows) of a packed A block against one B panel.
void micro_rows(Kernel uk, int pr, int64_t kp, const uint32_t* Ap, int64_t rows, const uint32_t* bp, float* c,
                int64_t ldc, float alpha, float beta, int nr) {
  const int64_t step = uk == Kernel::Avx512Bf16 ? MR : 2 * pr;
  for (int64_t ir = 0; ir < rows; ir += step) {
    const int mr = static_cast<int>(std::min<int64_t>(step, rows - ir));
    if (uk == Kernel::Avx512Bf16)
      bf16_k::ukernel_avx512bf16(kp, Ap + ir * kp, bp, c + ir * ldc, ldc, alpha, beta, mr, nr);
    else
      bf16_amx::ukernel16(uk, kp, Ap + ir * kp, bp, c + ir * ldc, ldc, alpha, beta, mr, nr);
  }
}

void scale_c(int64_t M, int64_t N, float beta, float* C, int64_t ldc) {
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) C[i * ldc + j] = beta == 0.0f ? 0.0f : beta * C[i * ldc + j];
}

// One task: rows [m0, m1) x columns [n0, n1) of C over all of K (see cpu/gemm.cpp run_task).
template <class PackA, class PackB>
void run_task(int64_t m0, int64_t m1, int64_t n0, int64_t n1, int64_t K, int64_t kc, float alpha, float beta,
              float* C, int64_t ldc, const PackA& pack_a, const PackB& pack_b) {
  const int64_t rows = m1 - m0, cols = n1 - n0;
  const Kernel uk = bf16_amx::kernel_choice();
  const int64_t pr = panel_rows(uk);
  const int64_t mc = round_up(ceil_div(rows, ceil_div(rows, blocking().mc)), pr);
  const int64_t nc = std::min(round_up(cols, NR), blocking().nc);
  const int64_t kpmax = kc / 2;
  uint32_t* Bp = t_b.get<uint32_t>(static_cast<size_t>(kpmax * nc));  // [nc / NR][kp][NR]
  uint32_t* Ap = t_a.get<uint32_t>(static_cast<size_t>(kpmax * mc));  // [mc / pr][kp][pr]
  const bf16_amx::TileScope tiles(uk);  // AMX: tiles configured once for the task
  for (int64_t jc = n0; jc < n1; jc += nc) {
    const int64_t ncur = std::min(nc, n1 - jc), n_pan = ceil_div(ncur, NR);
    for (int64_t pc = 0; pc < K; pc += kc) {
      const int64_t kcur = std::min(kc, K - pc), kp = ceil_div(kcur, 2);
      const float beta_k = pc == 0 ? beta : 1.0f;
      for (int64_t p = 0; p < n_pan; ++p)
        pack_b(jc + p * NR, static_cast<int>(std::min<int64_t>(NR, ncur - p * NR)), pc, kcur, Bp + p * NR * kp);
      for (int64_t ic = m0; ic < m1; ic += mc) {
        const int64_t mcur = std::min(mc, m1 - ic);
        for (int64_t ir = 0; ir < mcur; ir += pr)
          pack_a_for(uk, static_cast<int>(pr), pack_a, ic + ir, static_cast<int>(std::min<int64_t>(pr, mcur - ir)), pc,
                     kcur, Ap + ir * kp);
        for (int64_t p = 0; p < n_pan; ++p) {
          const uint32_t* bp = Bp + p * NR * kp;
          const int nr = static_cast<int>(std::min<int64_t>(NR, ncur - p * NR));
          float* c = C + ic * ldc + jc + p * NR;
          micro_rows(uk, static_cast<int>(pr), kp, Ap, mcur, bp, c, ldc, alpha, beta_k, nr);
        }
      }
    }
  }
}

// The task grid of cpu/gemm.cpp blocked(): n_mt x n_nt independent tasks, one parallel_for.
template <class PackA, class PackB>
void blocked(int64_t M, int64_t N, int64_t K, float alpha, float beta, float* C, int64_t ldc, const PackA& pack_a,
             const PackB& pack_b, double b_cost = 1.0) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) return scale_c(M, N, beta, C, ldc);
  const int64_t kcb = blocking().kc;
  const int64_t kc = std::min(round_up(K, 32), round_up(ceil_div(K, ceil_div(K, kcb)), 32));  // balanced, even
  const int nth = num_threads();
  const int64_t m_tiles = ceil_div(M, MR), n_pan = ceil_div(N, NR);
  int64_t n_mt = 1, n_nt = 1;
  const double flops = 2.0 * M * N * K;
  if (nth > 1 && flops > 4e6) {
    const int64_t target = flops > 5e8 ? 4 * nth : 2 * nth;
    double best = 1e300;
    for (int64_t mt = 1; mt <= std::min(target, m_tiles); ++mt) {
      const int64_t nt = std::min(n_pan, ceil_div(target, mt));
      // b_cost: packing one B element relative to one A element (NF4 decode + round > a rounding copy)
      const double cost = static_cast<double>(nt) * M + b_cost * static_cast<double>(mt) * N +
                          (mt * nt < nth ? 1e200 : 0.0);
      if (cost < best) best = cost, n_mt = mt, n_nt = nt;
    }
  }
  const int64_t m_step = ceil_div(m_tiles, n_mt) * MR, n_step = ceil_div(n_pan, n_nt) * NR;
  n_mt = ceil_div(M, m_step);
  n_nt = ceil_div(N, n_step);
  parallel_for(n_mt * n_nt, [&](int64_t t) {
    const int64_t m0 = (t / n_nt) * m_step, n0 = (t % n_nt) * n_step;
    run_task(m0, std::min(M, m0 + m_step), n0, std::min(N, n0 + n_step), K, kc, alpha, beta, C, ldc, pack_a, pack_b);
  });
}

// ------------------------------------------------------------------ shared-A driver
// blocked() above gives each task its own panels: with T tasks in a row of the grid every A panel
// is packed T times (2 threads on a 1024 x 1536 x 576 NF4 GEMM: A packed 8 times; on the lm_head's
// 256 x 576 x 49152 dh GEMM the 256 x 49152 logit gradient 4 times). shared() packs the A panels
// of a (row super-block, depth block) once, all threads together, into one buffer; then each task
// packs the B panels it alone uses (NC at a time, into its own L2, as blocked() does) and runs
// them against all its rows. B is packed once too unless there are fewer B panels than tasks
// (then rows split). A task never reads B panels another core packed (a first version that also
// shared the B panels measured no better on 2 threads). Same KC split, same k order, same
// rounding points: bit-identical to blocked().
// Bytes of the A panels per pass: a quarter of this core's L3 share within [1, 8] MiB (4 MiB on a
// 2-core Zen 4 with 32 MiB L3: one pass for every SmolLM2 training GEMM, at most 3 MiB).
// QLORA_BF16_SHARED_BYTES overrides it (tests reach the row super-block loop with small shapes).
int64_t shared_budget_bytes() {
  static const int64_t b = [] {
    const CacheSizes& c = cache_sizes();
    const int64_t l3 = c.l3 / (c.l3_sharing > 0 ? c.l3_sharing : 1);
    return std::min<int64_t>(8 << 20, std::max<int64_t>(1 << 20, l3 / 4));
  }();
  if (const char* e = std::getenv("QLORA_BF16_SHARED_BYTES")) {
    char* end = nullptr;
    const long long v = std::strtoll(e, &end, 10);
    if (end != e && *end == '\0' && v > 0) return v;
  }
  return b;
}

// QLORA_BF16_GEMM (read per call, cheap next to a GEMM): "tasks" = always blocked(), "shared" =
// always shared(); unset = shared() from 4 MFLOP up (below that blocked() runs one task, and
// shared() would wake the pool for each of its two phases). Both give the same bits.
enum class Driver { Auto, Tasks, Shared };
Driver driver_choice() {
  const char* e = std::getenv("QLORA_BF16_GEMM");
  if (!e || !*e) return Driver::Auto;
  if (std::strcmp(e, "tasks") == 0) return Driver::Tasks;
  if (std::strcmp(e, "shared") == 0) return Driver::Shared;
  return Driver::Auto;
}

// The caller's A panels (one buffer for every instantiation; a pool thread calling from an
// outer parallel_for runs the nested parallel_fors below serially, on its own buffer).
thread_local AlignedScratch t_sa;

// shared() over nb problems sharing A and K (problem b: N[b] columns, C[b], pack_b[b]): each
// (row super-block, depth block) of A packed once, then every problem's tasks run against it,
// problem by problem (the q/k/v or gate/up projections of one input). Per problem the same task
// grid, KC split and k order as a call of its own: the same bits.
template <class PackA, class PackB>
void shared_many(int64_t M, int64_t K, float alpha, float beta, int nb, const int64_t* Ns, float* const* Cs,
                 const int64_t* ldcs, const PackA& pack_a, const PackB* pack_bs) {
  if (M <= 0) return;
  if (K <= 0) {
    for (int b = 0; b < nb; ++b) scale_c(M, Ns[b], beta, Cs[b], ldcs[b]);
    return;
  }
  const int64_t kcb = blocking().kc;
  const int64_t kc = std::min(round_up(K, 32), round_up(ceil_div(K, ceil_div(K, kcb)), 32));  // as blocked()
  const int64_t kpmax = kc / 2;
  const Kernel uk = bf16_amx::kernel_choice();
  const int64_t pr = panel_rows(uk);
  const int64_t mb_max = std::max<int64_t>(pr, shared_budget_bytes() / (4 * kpmax) / pr * pr);
  const int64_t mb = round_up(ceil_div(M, ceil_div(M, mb_max)), pr);  // balanced row super-blocks
  uint32_t* Ap = t_sa.get<uint32_t>(static_cast<size_t>(kpmax * mb));  // [mb / pr][kp][pr]
  const int nth = num_threads();
  constexpr int64_t kGroup = 4;  // A tiles per packing task
  for (int64_t ms = 0; ms < M; ms += mb) {
    const int64_t mcur = std::min(mb, M - ms), m_tiles = ceil_div(mcur, pr);
    for (int64_t pc = 0; pc < K; pc += kc) {
      const int64_t kcur = std::min(kc, K - pc), kp = ceil_div(kcur, 2);
      const float beta_k = pc == 0 ? beta : 1.0f;
      parallel_for(ceil_div(m_tiles, kGroup), [&](int64_t t) {
        for (int64_t i = t * kGroup; i < std::min(m_tiles, (t + 1) * kGroup); ++i)
          pack_a_for(uk, static_cast<int>(pr), pack_a, ms + i * pr,
                     static_cast<int>(std::min<int64_t>(pr, mcur - i * pr)), pc, kcur, Ap + i * pr * kp);
      });
      for (int b = 0; b < nb; ++b) {
        const int64_t N = Ns[b], ldc = ldcs[b];
        if (N <= 0) continue;
        float* const C = Cs[b];
        const PackB& pack_b = pack_bs[b];
        const int64_t n_pan = ceil_div(N, NR);
        // task grid: panel groups first; rows split only where panels are fewer than the target
        const double flops = 2.0 * mcur * N * K;
        const int64_t target = nth <= 1 ? 1 : (flops > 5e8 ? 4 : 2) * nth;
        const int64_t n_nt0 = std::min(n_pan, target);
        const int64_t n_mt0 = std::min(m_tiles, ceil_div(target, n_nt0));
        const int64_t m_step = ceil_div(m_tiles, n_mt0) * pr;
        const int64_t n_mt = ceil_div(mcur, m_step);
        // Panels per task: ceil(n_pan / n_nt0), unless rounding leaves a task count that the threads
        // cannot share evenly (6 panels / 4 tasks -> 3 tasks of 2 on 2 threads: a third idle in the
        // end); then the step whose task count is a multiple of the threads, nearest the target.
        int64_t pan_step = ceil_div(n_pan, n_nt0);
        if (nth > 1 && (n_mt * ceil_div(n_pan, pan_step)) % nth != 0) {
          int64_t best = -1;
          for (int64_t st = 1; st <= n_pan; ++st) {
            const int64_t tasks = n_mt * ceil_div(n_pan, st);
            if (tasks % nth != 0 || tasks > 2 * target) continue;
            const int64_t d = std::abs(tasks - target);
            if (best < 0 || d <= std::abs(n_mt * ceil_div(n_pan, best) - target)) best = st;  // ties: wider
          }
          if (best > 0) pan_step = best;
        }
        const int64_t n_step = pan_step * NR, n_nt = ceil_div(N, n_step);
        parallel_for(n_mt * n_nt, [&](int64_t t) {
          const int64_t r0 = (t / n_nt) * m_step, r1 = std::min(mcur, r0 + m_step);
          const int64_t n0 = (t % n_nt) * n_step, n1 = std::min(N, n0 + n_step);
          const int64_t rows = r1 - r0;
          const bf16_amx::TileScope tiles(uk);  // AMX: tiles configured once for the task
          const int64_t mc = round_up(ceil_div(rows, ceil_div(rows, blocking().mc)), pr);
          const int64_t nc = std::min(round_up(n1 - n0, NR), blocking().nc);
          uint32_t* Bp = t_b.get<uint32_t>(static_cast<size_t>(kp * nc));  // [nc / NR][kp][NR]
          for (int64_t jc = n0; jc < n1; jc += nc) {
            const int64_t ncur = std::min(nc, n1 - jc), np = ceil_div(ncur, NR);
            pack_b(jc, ncur, pc, kcur, Bp);
            for (int64_t ic = r0; ic < r1; ic += mc) {
              const int64_t icur = std::min(mc, r1 - ic);
              const uint32_t* ap = Ap + ic * kp;  // (a copy into this core's L2 first measured no faster)
              for (int64_t p = 0; p < np; ++p) {
                const uint32_t* bp = Bp + p * NR * kp;
                const int nr = static_cast<int>(std::min<int64_t>(NR, ncur - p * NR));
                float* c = C + (ms + ic) * ldc + jc + p * NR;
                micro_rows(uk, static_cast<int>(pr), kp, ap, icur, bp, c, ldc, alpha, beta_k, nr);
              }
            }
          }
        });
      }
    }
  }
}

template <class PackA, class PackB>
void shared(int64_t M, int64_t N, int64_t K, float alpha, float beta, float* C, int64_t ldc, const PackA& pack_a,
            const PackB& pack_b) {
  if (N <= 0) return;
  shared_many(M, K, alpha, beta, 1, &N, &C, &ldc, pack_a, &pack_b);
}

template <class PackA, class PackB>
void drive(int64_t M, int64_t N, int64_t K, float alpha, float beta, float* C, int64_t ldc, const PackA& pack_a,
           const PackB& pack_b, double b_cost = 1.0) {
  const Driver d = driver_choice();
  if (d == Driver::Shared || (d == Driver::Auto && 2.0 * M * N * K >= 4e6))
    return shared(M, N, K, alpha, beta, C, ldc, pack_a, pack_b);
  blocked(M, N, K, alpha, beta, C, ldc, pack_a, pack_b, b_cost);
}

}  // namespace
}  // namespace qlora::cpu
