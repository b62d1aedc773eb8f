// CPU GEMM dispatch and the blocked driver (GotoBLAS/BLIS style) shared by every SIMD level:
// packed A and B panels, MC/KC/NC cache blocking, a register-tiled micro-kernel per level.
// B "packing" is where the fused NF4 kernels dequantize: each [KC, NR] panel is decoded from the
// packed nibbles on the fly, so no fp32 copy of the weight ever exists.
#include "cpu/gemm.hpp"
#include "cpu/cache_info.hpp"
#include "cpu/gemv_f32.hpp"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>
#include <vector>

#include "common/error.hpp"
#include "cpu/aligned_scratch.hpp"
#include "cpu/gemm_checks.hpp"
#include "cpu/gemm_kernels.hpp"
#include "cpu/gemm_scalar.hpp"
#include "cpu/gemm_small.hpp"
#include "cpu/nf4_gemv.hpp"
#include "cpu/pack.hpp"
#include "cpu/threads.hpp"

namespace qlora::cpu {

namespace {

using namespace gemm_k;

struct Kern {
  int mr, nr;        // micro-tile
  int64_t kc, mc, nc;  // cache blocking (upper bounds; the driver balances the actual sizes)
  UkernelFn ukernel;
  PackBTFn pack_b_t;
  PackBNFn pack_b_n;
  Nf4DecodeFn nf4_decode;
  PackATFn pack_a_t;  // null: the portable pack::a_rows
  UkernelDirectFn ukernel_direct = nullptr;  // null: A is always packed
  // nf4_gemm_nn's full B panel in one call (rows 16-aligned); null: nf4_decode row by row.
  void (*nf4_panel_n)(const uint8_t*, int64_t, int64_t, int64_t, const float*, const float*, float*) = nullptr;
};

// A read in place by ukernel_direct when N <= NR: element (i, k) of op(A) at a[i * rs + k * cs].
struct DirectA {
  const float* a = nullptr;
  int64_t rs = 0, cs = 0;
};

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
constexpr int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }
int64_t clamp64(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : v > hi ? hi : v; }
int64_t pow2_floor(int64_t v) {
  int64_t p = 1;
  while (p * 2 <= v) p *= 2;
  return p;
}

}  // namespace

// Cache blocking from the cache sizes (cpu/cache_info.hpp) instead of one host's constants.
// KC: depth of a micro-kernel call (the [KC, NR] B micro-panel is reused down the A block).
//   AVX-512 and AVX2: the B micro-panel is served from L2, KC = L2 / 8 / (4 NR) as a power of two
//   in [256, 1024]: 1024 on a 1 MiB L2 (Zen 4/5: 3-13% over KC = 384 on every bench_gemm shape at
//   M >= 256 on Zen 5, fewer passes over C; AVX2 on Zen 4, with its C prefetch: K = 576 / 1536 in
//   one or two depth passes instead of three to six, lm_head's 256x49152x576 at 2 threads 15-20%
//   less CPU than KC = 256 (as fast as AVX-512), the NF4 GEMMs 1-6%).
//   Generic: the micro-panel in half of L1d, KC = L1d / 2 / (4 * 16), a multiple of 16 in
//   [128, 512] (256 on a 32 KiB L1d).
// MC: the [MC, KC] A block in 2/3 of L2 with the L2-panel kernels (168 rows for AVX-512 and AVX2
//   on 1 MiB), in 1/7 of it otherwise, at most 64 tiles.
// NC: bounds the [M, NC] slab of C that every depth block rereads (NC = 4096 left C of a
//   2048-row GEMM in DRAM: -12% on Zen 5) and the [KC, NC] B block, whose share of the L3 it
//   must fit: min(1024, L3 / sharers / (4 KC)), at least 256.
// KC sets the depth blocks, so results can differ in the last bits between machines with
// different caches (never between runs or thread counts on one machine).
GemmBlocking gemm_blocking(int mr, int nr, bool l2_panel, const CacheSizes& c) {
  GemmBlocking b;
  if (l2_panel)
    b.kc = clamp64(pow2_floor(c.l2 / 8 / (4 * nr)), 256, 1024);
  else
    b.kc = clamp64(c.l1d / 2 / (4 * 16) / 16 * 16, 128, 512);
  b.mc = clamp64((l2_panel ? c.l2 * 2 / 3 : c.l2 / 7) / (4 * b.kc) / mr * mr, mr, 64 * mr);
  const int64_t l3_share = c.l3 / (c.l3_sharing > 0 ? c.l3_sharing : 1);
  b.nc = clamp64(l3_share / (4 * b.kc) / nr * nr, 256, 1024);
  return b;
}

namespace {

const Kern& kern_for(SimdLevel level) {
  // Derived once from the detected caches (QLORA_CACHE_SIZES overrides them for experiments).
  static const Kern generic = [] {
    const GemmBlocking b = gemm_blocking(kGenericMR, kGenericNR, false, cache_sizes());
    return Kern{kGenericMR, kGenericNR, b.kc, b.mc, b.nc, ukernel_generic, pack_b_t_generic, pack_b_n_generic,
                nf4_decode_generic, nullptr};
  }();
#ifdef QLORA_X86
  static const Kern avx2 = [] {
    const GemmBlocking b = gemm_blocking(kAvx2MR, kAvx2NR, true, cache_sizes());
    return Kern{kAvx2MR, kAvx2NR, b.kc, b.mc, b.nc, ukernel_avx2, pack_b_t_avx2, pack_b_n_avx2, nf4_decode_avx2,
                pack_a_t_avx2, ukernel_direct_avx2, nf4_panel_n_avx2};
  }();
  static const Kern avx512 = [] {
    const GemmBlocking b = gemm_blocking(kAvx512MR, kAvx512NR, true, cache_sizes());
    return Kern{kAvx512MR, kAvx512NR, b.kc, b.mc, b.nc, ukernel_avx512, pack_b_t_avx512, pack_b_n_avx512,
                nf4_decode_avx512, pack_a_t_avx512, ukernel_direct_avx512};
  }();
  if (level == SimdLevel::AVX512) return avx512;
  if (level == SimdLevel::AVX2) return avx2;
#endif
  return generic;
}

// One per thread and purpose (cpu/aligned_scratch.hpp), handing out floats.
struct Scratch : AlignedScratch {
  float* get(size_t floats) { return AlignedScratch::get<float>(floats); }
};
thread_local Scratch t_a, t_b, t_tmp;

// QLORA_NF4_PANEL_N=0: nf4_gemm_nn decodes row by row even where a panel kernel exists (A/B runs;
// tests compare both ways bit for bit).
bool nf4_panel_n_off() {
  static const bool off = [] {
    const char* e = std::getenv("QLORA_NF4_PANEL_N");
    return e && std::string(e) == "0";
  }();
  return off;
}

// A panel from row-major A [M, K] (gemm_nt, gemm_nn and the NF4 GEMMs).
void pack_a_rows(const Kern& kn, const float* A, int64_t lda, int mr, int64_t kc, float* Ap) {
  if (kn.pack_a_t) kn.pack_a_t(A, lda, mr, kc, Ap);
  else pack::a_rows(kn.mr, A, lda, mr, kc, Ap);
}

void scale_c(int64_t M, int64_t N, float beta, float* C, int64_t ldc) {  // C = beta * C (K == 0)
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) C[i * ldc + j] = beta == 0.0f ? 0.0f : beta * C[i * ldc + j];
}

// One task: rows [m0, m1) x columns [n0, n1) of C, all of K. It packs its own B blocks and A
// blocks into thread-local buffers, so tasks never wait for each other.
//   for jc (NC columns): for pc (KC depth): pack B [kc, nc]; for ic (MC rows): pack A [mc, kc];
//     for each B micro-panel (stays in L1): run the micro-kernel down the A block (in L2).
// run_task's row walk for depth blocks up to this (QLORA_GEMM_ROW_WALK=0 turns it off, A/B runs).
constexpr int64_t kRowWalkMaxK = 64;
bool row_walk_on() {
  const char* e = std::getenv("QLORA_GEMM_ROW_WALK");
  return !(e && std::strcmp(e, "0") == 0);
}

// A/B switches of the task grids, read per call (default: 4 tasks per thread on big problems, 2
// below 5e8 FLOP). In blocked_tasks() each task packs its own A rows and B columns, so more tasks
// mean more duplicated packing (shared_a() packs A once): QLORA_GEMM_GRID_THREADS=2 with
// QLORA_NUM_THREADS=1 runs the 2-thread grid's tasks on one thread, so its CPU time against the
// 1-task run is that duplication, measurable on a loaded machine. QLORA_GEMM_TASKS_PER_THREAD=N
// (1..8) sets the task count per thread.
int env_int(const char* name, int lo, int hi, int dflt) {
  const char* e = std::getenv(name);
  const int v = e ? std::atoi(e) : dflt;
  return v < lo || v > hi ? dflt : v;
}
int grid_threads() { return env_int("QLORA_GEMM_GRID_THREADS", 1, 1024, 0); }
int tasks_per_thread() { return env_int("QLORA_GEMM_TASKS_PER_THREAD", 1, 8, 4); }

// One (row block, column block, depth block) of C: c[mcur, ncur] (ld ldc) = alpha * A·B + beta_k * c
// from packed A panels Ap [mcur / MR][kcur][MR] and B panels Bp [ceil(ncur / NR)][kcur][NR]; the
// same micro-kernel calls for both drivers (run_task and shared_a), so the same bits.
void run_block(const Kern& kn, int64_t kcur, const float* Ap, const float* Bp, float* c, int64_t ldc, int64_t mcur,
               int64_t ncur, float alpha, float beta_k, bool row_walk) {
  const int MR = kn.mr, NR = kn.nr;
  const int64_t n_pan = ceil_div(ncur, NR);
  if (kcur <= kRowWalkMaxK && row_walk) {
    // Shallow depth (LoRA's rank-r expand, C += s·t·Bᵀ over a 1536-wide C): each tile is a few FMAs
    // per C element, so the C traffic bounds it; walking a tile row across all panels reads C row
    // runs in order (the prefetchers follow), where going down a panel jumped 14 rows per call.
    // Same tiles, same calls: same bits.
    for (int64_t ir = 0; ir < mcur; ir += MR)
      for (int64_t p = 0; p < n_pan; ++p)
        kn.ukernel(kcur, Ap + ir * kcur, Bp + p * NR * kcur, c + ir * ldc + p * NR, ldc, alpha, beta_k,
                   static_cast<int>(std::min<int64_t>(MR, mcur - ir)),
                   static_cast<int>(std::min<int64_t>(NR, ncur - p * NR)));
    return;
  }
  for (int64_t p = 0; p < n_pan; ++p) {
    const float* bp = Bp + p * NR * kcur;
    const int nr = static_cast<int>(std::min<int64_t>(NR, ncur - p * NR));
    for (int64_t ir = 0; ir < mcur; ir += MR)
      kn.ukernel(kcur, Ap + ir * kcur, bp, c + p * NR + ir * ldc, ldc, alpha, beta_k,
                 static_cast<int>(std::min<int64_t>(MR, mcur - ir)), nr);
  }
}

// A task whose rows are one A block (M <= MC: the lm_head's 256-row chunks, short batches) uses each
// B micro-panel once per depth block: it is packed right before its micro-kernel calls, into one
// [kc, NR] slot that stays in L1, instead of all NC / NR panels first (a [kc, NC] block of up to 4 MB
// that left L2 before its use). Same micro-kernel calls in the same order per C tile: same bits.
// Emerald Rapids (family 6 model 207), loaded, 1 thread CPU, interleaved: SmolLM2's lm_head over Q8_0
// rows (cpu/q8_0_head.cpp, 256 x 49152 x 576) logits + dh better in 5 of 6 pairs (median -2.7%, dh
// -5%); fp32 256x1536x576 nt 3.12-3.39 -> 2.91-2.98 ms, 128x576x576 0.67 -> 0.62 (min of 15, 3 pairs).
// QLORA_GEMM_PANEL_FUSE=0 (read per call): all panels first (A/B runs).
bool panel_fuse_on() {
  const char* e = std::getenv("QLORA_GEMM_PANEL_FUSE");
  return !(e && std::strcmp(e, "0") == 0);
}
template <class PackB>
void run_panels(const Kern& kn, int64_t kcur, const float* Ap, float* Bp, float* c, int64_t ldc, int64_t mcur,
                int64_t j0, int64_t ncur, int64_t pc, float alpha, float beta_k, const PackB& pack_b) {
  for (int64_t p = 0; p * kn.nr < ncur; ++p) {  // c: row 0, column 0 of C; j0: column of the task's block
    const int nr = static_cast<int>(std::min<int64_t>(kn.nr, ncur - p * kn.nr));
    pack_b(j0 + p * kn.nr, nr, pc, kcur, Bp);
    run_block(kn, kcur, Ap, Bp, c + j0 + p * kn.nr, ldc, mcur, nr, alpha, beta_k, false);
  }
}

template <class PackA, class PackB>
void run_task(const Kern& kn, int64_t m0, int64_t m1, int64_t n0, int64_t n1, int64_t K, int64_t kc, float alpha,
              float beta, float* C, int64_t ldc, const PackA& pack_a, const PackB& pack_b, const DirectA& da) {
  const int MR = kn.mr, NR = kn.nr;
  const bool row_walk = K <= kRowWalkMaxK && row_walk_on();
  const int64_t rows = m1 - m0, cols = n1 - n0;
  if (da.a && kn.ukernel_direct && cols <= NR) {
    // One B micro-panel: each A element is used once, so the kernel reads A in place.
    float* Bp = t_b.get(static_cast<size_t>(kc * NR));
    const int nr = static_cast<int>(cols);
    for (int64_t pc = 0; pc < K; pc += kc) {
      const int64_t kcur = std::min(kc, K - pc);
      const float beta_k = pc == 0 ? beta : 1.0f;
      pack_b(n0, nr, pc, kcur, Bp);
      for (int64_t ir = m0; ir < m1; ir += MR)
        kn.ukernel_direct(kcur, da.a + ir * da.rs + pc * da.cs, da.rs, da.cs, Bp, C + ir * ldc + n0, ldc, alpha,
                          beta_k, static_cast<int>(std::min<int64_t>(MR, m1 - ir)), nr);
    }
    return;
  }
  const int64_t mc = round_up(ceil_div(rows, ceil_div(rows, kn.mc)), MR);  // balanced row blocks
  const int64_t nc = std::min(round_up(cols, NR), kn.nc);
  float* Bp = t_b.get(static_cast<size_t>(kc * nc));  // [nc / NR][kc][NR]
  float* Ap = t_a.get(static_cast<size_t>(kc * mc));  // [mc / MR][kc][MR]
  const bool one_block = rows <= mc && !row_walk && panel_fuse_on();
  for (int64_t jc = n0; jc < n1; jc += nc) {
    const int64_t ncur = std::min(nc, n1 - jc), n_pan = ceil_div(ncur, NR);
    for (int64_t pc = 0; pc < K; pc += kc) {
      const int64_t kcur = std::min(kc, K - pc);
      const float beta_k = pc == 0 ? beta : 1.0f;  // later depth blocks accumulate into C
      if (one_block) {
        for (int64_t ir = 0; ir < rows; ir += MR)
          pack_a(m0 + ir, static_cast<int>(std::min<int64_t>(MR, rows - ir)), pc, kcur, Ap + ir * kcur);
        run_panels(kn, kcur, Ap, Bp, C + m0 * ldc, ldc, rows, jc, ncur, pc, alpha, beta_k, pack_b);
        continue;
      }
      for (int64_t p = 0; p < n_pan; ++p)
        pack_b(jc + p * NR, static_cast<int>(std::min<int64_t>(NR, ncur - p * NR)), pc, kcur, Bp + p * NR * kcur);
      for (int64_t ic = m0; ic < m1; ic += mc) {
        const int64_t mcur = std::min(mc, m1 - ic);
        for (int64_t ir = 0; ir < mcur; ir += MR)
          pack_a(ic + ir, static_cast<int>(std::min<int64_t>(MR, mcur - ir)), pc, kcur, Ap + ir * kcur);
        run_block(kn, kcur, Ap, Bp, C + ic * ldc + jc, ldc, mcur, ncur, alpha, beta_k, row_walk);
      }
    }
  }
}

// A/B switch of the driver (read per call): QLORA_GEMM_DRIVER=tasks runs the task grid of
// blocked_tasks() only (the driver before shared_a()), =shared forces shared_a() wherever it applies
// (also at 1 thread); unset: shared_a() from 2 threads and kSharedMinFlops up (blocked()).
enum class Driver { Auto, Tasks, Shared };
Driver driver_choice() {
  const char* e = std::getenv("QLORA_GEMM_DRIVER");
  if (e && std::strcmp(e, "tasks") == 0) return Driver::Tasks;
  if (e && std::strcmp(e, "shared") == 0) return Driver::Shared;
  return Driver::Auto;
}

// pack_a(i0, mr, p0, kc, Ap): A panel of rows [i0, i0+mr), depth [p0, p0+kc) -> Ap [kc, MR]
// pack_b(j0, nr, p0, kc, Bp): B panel of columns [j0, j0+nr), depth [p0, p0+kc) -> Bp [kc, NR]
// Threads: ONE parallel_for over a grid of n_mt x n_nt independent tasks (the pool wakes its
// workers once per GEMM, no barrier per depth block). Splitting N repacks A once per column
// task, splitting M re-decodes B once per row task; the grid minimizes that duplicated work.
template <class PackA, class PackB>
void blocked_tasks(const Kern& kn, int64_t M, int64_t N, int64_t K, int64_t kc, int nth, float alpha, float beta,
                   float* C, int64_t ldc, const PackA& pack_a, const PackB& pack_b, const DirectA& da) {
  const int MR = kn.mr, NR = kn.nr;
  const int64_t m_tiles = ceil_div(M, MR), n_pan = ceil_div(N, NR);
  int64_t n_mt = 1, n_nt = 1;
  const double flops = 2.0 * M * N * K;
  if (nth > 1 && flops > 4e6) {
    // Enough tasks for dynamic claiming to absorb a preempted thread; more on big problems,
    // where the duplicated packing is cheap relative to the work.
    const int64_t per = tasks_per_thread();
    const int64_t target = flops > 5e8 ? per * nth : std::min<int64_t>(per, 2) * nth;
    double best = 1e300;
    for (int64_t mt = 1; mt <= std::min(target, m_tiles); ++mt) {
      const int64_t nt = std::min(n_pan, ceil_div(target, mt));
      const double cost = static_cast<double>(nt) * M + static_cast<double>(mt) * N +
                          (mt * nt < nth ? 1e200 : 0.0);  // too few tasks to feed the threads
      if (cost < best) {
        best = cost;
        n_mt = mt;
        n_nt = nt;
      }
    }
  }
  const int64_t m_step = ceil_div(m_tiles, n_mt) * MR, n_step = ceil_div(n_pan, n_nt) * NR;
  n_mt = ceil_div(M, m_step);
  n_nt = ceil_div(N, n_step);
  parallel_for(n_mt * n_nt, [&](int64_t t) {
    const int64_t m0 = (t / n_nt) * m_step, n0 = (t % n_nt) * n_step;
    run_task(kn, m0, std::min(M, m0 + m_step), n0, std::min(N, n0 + n_step), K, kc, alpha, beta, C, ldc, pack_a,
             pack_b, da);
  });
}

// ------------------------------------------------------------------ shared-A driver
// blocked_tasks() packs every A panel once per column task and every B panel once per row task: at
// 2 threads (8 tasks) a 1024 x 1536 x 576 NF4 GEMM packs A 4 times and decodes W twice, the lm_head
// dh GEMM (256 x 576 x 49152) packs the 50 MB logit gradient 4 times. shared_a() (the bf16 driver's
// shared(), cpu/gemm_bf16_drivers.hpp) packs the A panels of a (row super-block, depth block) once,
// all threads together, into one buffer; then each task packs (decodes) the B panels of its columns
// into its own buffer, NC at a time as run_task does, and runs them against its rows of that
// buffer. B is packed once too unless the panels are fewer than the tasks (then rows split as
// well). Each C element sees the same depth blocks in the same order through the same
// micro-kernel calls (tiles start at multiples of MR / NR either way): bit-identical to
// blocked_tasks(). The price: two pool jobs (a barrier each) per pass instead of one per GEMM.
// Bytes of A panels of a super-block: a quarter of this core's L3 share within [1, 8] MiB (every
// SmolLM2 training GEMM in one super-block, at most 3 MiB a depth block). A pass packs as many of
// its depth blocks as the L2 holds (at least one; the lm_head dh GEMM's 1.1 MB blocks one a pass).
// QLORA_GEMM_SHARED_BYTES=N sets both bounds to N bytes (tests reach the super-block and pass
// loops; N = 8388608 gives lm_head dh 7 blocks a pass, the K = 1536 NF4 GEMMs 2). Emerald Rapids
// 2-core VM, loaded: several blocks a pass cost 1 thread 3-6% more CPU (the tasks re-read a slab
// beyond L2: NF4 1024x576x1536 13.4 vs 12.7 ms, dh 107 vs 104), and saved dh 2-thread wall
// under preemption (fewer barriers: 111 vs 121 ms min of 12), too noisy to make it the default.
int64_t shared_bytes_env() {  // QLORA_GEMM_SHARED_BYTES, 0 when unset or not a positive integer
  const char* e = std::getenv("QLORA_GEMM_SHARED_BYTES");
  if (!e) return 0;
  char* end = nullptr;
  const long long v = std::strtoll(e, &end, 10);
  return end != e && *end == '\0' && v > 0 ? v : 0;
}
int64_t shared_budget_bytes() {
  static const int64_t b = [] {
    const CacheSizes& c = cache_sizes();
    const int64_t l3 = c.l3 / (c.l3_sharing > 0 ? c.l3_sharing : 1);
    return std::min<int64_t>(8 << 20, std::max<int64_t>(1 << 20, l3 / 4));
  }();
  const int64_t e = shared_bytes_env();
  return e > 0 ? e : b;
}
thread_local Scratch t_sa;  // the calling thread's shared A panels [mb / MR][kc][MR]

// Task grid of one super-block of mcur rows: panel groups, rows split only where the panels are
// fewer than the target; a panel step whose task count the threads share evenly (6 panels in 4
// tasks -> 3 of 2 on 2 threads leaves a thread idle at the end), nearest the target.
struct SharedGrid {
  int64_t m_step, n_step, n_mt, n_nt;
};
SharedGrid shared_grid(int64_t mcur, int64_t N, int64_t K, int MR, int NR, int nth) {
  const int64_t m_tiles = ceil_div(mcur, MR), n_pan = ceil_div(N, NR);
  const double flops = 2.0 * mcur * N * K;
  const int64_t per = tasks_per_thread();
  const int64_t target = nth <= 1 ? 1 : (flops > 5e8 ? per : std::min<int64_t>(per, 2)) * nth;
  const int64_t n_nt0 = std::min(n_pan, target);
  const int64_t n_mt0 = std::min(m_tiles, ceil_div(target, n_nt0));
  SharedGrid g;
  g.m_step = ceil_div(m_tiles, n_mt0) * MR;
  g.n_mt = ceil_div(mcur, g.m_step);
  int64_t pan_step = ceil_div(n_pan, n_nt0);
  if (nth > 1 && (g.n_mt * ceil_div(n_pan, pan_step)) % nth != 0) {
    int64_t best = -1;
    for (int64_t st = 1; st <= n_pan; ++st) {
      const int64_t tasks = g.n_mt * ceil_div(n_pan, st);
      if (tasks % nth != 0 || tasks > 2 * target) continue;
      if (best < 0 || std::abs(tasks - target) <= std::abs(g.n_mt * ceil_div(n_pan, best) - target))
        best = st;  // ties: wider
    }
    if (best > 0) pan_step = best;
  }
  g.n_step = pan_step * NR;
  g.n_nt = ceil_div(N, g.n_step);
  return g;
}

template <class PackA, class PackB>
void shared_a(const Kern& kn, int64_t M, int64_t N, int64_t K, int64_t kc, int nth, float alpha, float beta,
              float* C, int64_t ldc, const PackA& pack_a, const PackB& pack_b) {
  const int MR = kn.mr, NR = kn.nr;
  const int64_t budget = shared_budget_bytes();
  const int64_t mb_max = std::max<int64_t>(MR, budget / (4 * kc) / MR * MR);
  const int64_t mb = round_up(ceil_div(M, ceil_div(M, mb_max)), MR);  // balanced row super-blocks
  // Depth blocks per pass (each pass: two pool jobs): as many as the pass bytes hold.
  const int64_t pass_bytes = shared_bytes_env() > 0 ? budget : std::min(budget, cache_sizes().l2);
  const int64_t nd = std::min(ceil_div(K, kc), std::max<int64_t>(1, pass_bytes / (4 * kc * mb)));
  float* Ap = t_sa.get(static_cast<size_t>(nd * kc * mb));  // nd x [mb / MR][kc][MR]
  const bool row_walk = K <= kRowWalkMaxK && row_walk_on(), fuse = panel_fuse_on();
  constexpr int64_t kGroup = 4;  // A panels per packing task
  for (int64_t ms = 0; ms < M; ms += mb) {
    const int64_t mcur = std::min(mb, M - ms), m_tiles = ceil_div(mcur, MR), groups = ceil_div(m_tiles, kGroup);
    const SharedGrid g = shared_grid(mcur, N, K, MR, NR, nth);
    for (int64_t pd = 0; pd < K; pd += nd * kc) {
      const int64_t pe = std::min(K, pd + nd * kc);
      parallel_for(ceil_div(pe - pd, kc) * groups, [&](int64_t t) {
        const int64_t d = t / groups, pc = pd + d * kc, kcur = std::min(kc, K - pc);
        float* ad = Ap + d * kc * mb;
        for (int64_t i = (t % groups) * kGroup; i < std::min(m_tiles, (t % groups + 1) * kGroup); ++i)
          pack_a(ms + i * MR, static_cast<int>(std::min<int64_t>(MR, mcur - i * MR)), pc, kcur, ad + i * MR * kcur);
      });
      parallel_for(g.n_mt * g.n_nt, [&](int64_t t) {
        const int64_t r0 = (t / g.n_nt) * g.m_step, r1 = std::min(mcur, r0 + g.m_step);
        const int64_t n0 = (t % g.n_nt) * g.n_step, n1 = std::min(N, n0 + g.n_step);
        const int64_t rows = r1 - r0;
        const int64_t mc = round_up(ceil_div(rows, ceil_div(rows, kn.mc)), MR);  // as run_task
        const int64_t nc = std::min(round_up(n1 - n0, NR), kn.nc);
        float* Bp = t_b.get(static_cast<size_t>(kc * nc));  // [nc / NR][kcur][NR]
        const bool one_block = rows <= mc && !row_walk && fuse;
        for (int64_t jc = n0; jc < n1; jc += nc) {  // run_task's loops, A from the shared panels
          const int64_t ncur = std::min(nc, n1 - jc), n_pan = ceil_div(ncur, NR);
          for (int64_t pc = pd; pc < pe; pc += kc) {
            const int64_t kcur = std::min(kc, K - pc);
            const float beta_k = pc == 0 ? beta : 1.0f;  // later depth blocks accumulate into C
            const float* ad = Ap + ((pc - pd) / kc) * kc * mb;
            if (one_block) {
              run_panels(kn, kcur, ad + r0 * kcur, Bp, C + (ms + r0) * ldc, ldc, rows, jc, ncur, pc, alpha, beta_k,
                         pack_b);
              continue;
            }
            for (int64_t p = 0; p < n_pan; ++p)
              pack_b(jc + p * NR, static_cast<int>(std::min<int64_t>(NR, ncur - p * NR)), pc, kcur,
                     Bp + p * NR * kcur);
            for (int64_t ic = r0; ic < r1; ic += mc) {
              const int64_t icur = std::min(mc, r1 - ic);  // A: panel ic / MR of the super-block
              run_block(kn, kcur, ad + ic * kcur, Bp, C + (ms + ic) * ldc + jc, ldc, icur, ncur, alpha, beta_k,
                        row_walk);
            }
          }
        }
      });
    }
  }
}

// The driver: shared_a() from 2 threads on GEMMs of kSharedMinFlops and up (or as QLORA_GEMM_DRIVER
// says), else blocked_tasks(). Below that shared_a()'s fixed costs (a second pool job, every task
// reading A panels packed on the other core) ate the saved packing: Emerald Rapids 2-core VM,
// 2 threads, loaded, wall min of 150 interleaved calls, shared vs tasks: NF4 1024x576x576 2.79 vs
// 2.55 ms, 1024x192x576 1.38 vs 0.94; at 1.8 GFLOP 1024x1536x576 9.46 vs 10.70. Skinny N <= NR with
// a direct kernel (A read in place, nothing of A packed) stays on the grid.
constexpr double kSharedMinFlops = 1e9;
template <class PackA, class PackB>
void blocked(const Kern& kn, int64_t M, int64_t N, int64_t K, float alpha, float beta, float* C, int64_t ldc,
             const PackA& pack_a, const PackB& pack_b, const DirectA& da = DirectA{}) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) return scale_c(M, N, beta, C, ldc);
  const int64_t kc = std::min(K, round_up(ceil_div(K, ceil_div(K, kn.kc)), 16));  // balanced depth blocks
  const int grid = grid_threads();
  const int nth = grid > 0 ? grid : num_threads();
  const Driver d = driver_choice();
  const bool direct = da.a && kn.ukernel_direct && N <= kn.nr;
  if (!direct && (d == Driver::Shared || (d == Driver::Auto && nth > 1 && 2.0 * M * N * K >= kSharedMinFlops)))
    return shared_a(kn, M, N, K, kc, nth, alpha, beta, C, ldc, pack_a, pack_b);
  blocked_tasks(kn, M, N, K, kc, nth, alpha, beta, C, ldc, pack_a, pack_b, da);
}

}  // namespace

const GemmPanels& gemm_panels(SimdLevel level) {
  static const auto make = [](SimdLevel lv) {
    const Kern& kn = kern_for(lv);
    GemmPanels g;
    g.mr = kn.mr, g.nr = kn.nr;
    g.ukernel = kn.ukernel, g.pack_b_t = kn.pack_b_t, g.pack_b_n = kn.pack_b_n;
    g.kern = &kn;
    return g;
  };
  static const GemmPanels generic = make(SimdLevel::Generic);
#ifdef QLORA_X86
  static const GemmPanels avx2 = make(SimdLevel::AVX2), avx512 = make(SimdLevel::AVX512);
  if (level == SimdLevel::AVX512) return avx512;
  if (level == SimdLevel::AVX2) return avx2;
#endif
  return generic;
}

void GemmPanels::pack_a_rows(const float* A, int64_t lda, int mr_, int64_t kc, float* Ap) const {
  cpu::pack_a_rows(*static_cast<const Kern*>(kern), A, lda, mr_, kc, Ap);
}

void GemmPanels::pack_a_cols(const float* A, int64_t lda, int mr_, int64_t kc, float* Ap) const {
  pack::a_cols(mr, A, lda, mr_, kc, Ap);
}

int64_t gemm_depth_block(SimdLevel level, int64_t K) {
  const Kern& kn = kern_for(level);
  return K <= 0 ? 0 : std::min(K, round_up(ceil_div(K, ceil_div(K, kn.kc)), 16));  // as blocked()
}

GemmBlocking gemm_blocking_in_use(SimdLevel level) {
  const Kern& kn = kern_for(level);
  GemmBlocking b;
  b.kc = kn.kc, b.mc = kn.mc, b.nc = kn.nc;
  return b;
}


void gemm_nt(SimdLevel level, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
             const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  check_dims(M, N, K, lda, K, ldb, K, ldc);
  if (level == SimdLevel::Scalar) return scalar::gemm_nt(M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  if (M >= 1 && M <= kGemvF32MaxM && K >= 1) return gemv_nt_f32(level, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  if (gemm_nt_skinny48(level, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc)) return;
  const Kern& kn = kern_for(level);
  blocked(
      kn, M, N, K, alpha, beta, C, ldc,
      [&](int64_t i0, int mr, int64_t p0, int64_t kc, float* Ap) { pack_a_rows(kn, A + i0 * lda + p0, lda, mr, kc, Ap); },
      [&](int64_t j0, int nr, int64_t p0, int64_t kc, float* Bp) {
        // Stream the nr row runs into L1 one at a time (a transposing read of 32 rows at once
        // defeats the hardware prefetcher when W comes from DRAM), then transpose-pack.
        float* tmp = t_tmp.get(static_cast<size_t>(kn.nr * kc));  // [nr, kc]
        for (int r = 0; r < nr; ++r) std::memcpy(tmp + r * kc, B + (j0 + r) * ldb + p0, sizeof(float) * kc);
        kn.pack_b_t(tmp, kc, nr, kc, Bp);
      },
      DirectA{A, lda, 1});
}

void gemm_nn(SimdLevel level, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
             const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  check_dims(M, N, K, lda, K, ldb, N, ldc);
  if (level == SimdLevel::Scalar) return scalar::gemm_nn(M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  const Kern& kn = kern_for(level);
  blocked(
      kn, M, N, K, alpha, beta, C, ldc,
      [&](int64_t i0, int mr, int64_t p0, int64_t kc, float* Ap) { pack_a_rows(kn, A + i0 * lda + p0, lda, mr, kc, Ap); },
      [&](int64_t j0, int nr, int64_t p0, int64_t kc, float* Bp) { kn.pack_b_n(B + p0 * ldb + j0, ldb, nr, kc, Bp); },
      DirectA{A, lda, 1});
}


void gemm_tn(SimdLevel level, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
             const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  check_dims(M, N, K, lda, M, ldb, N, ldc);
  if (level == SimdLevel::Scalar) return scalar::gemm_tn(M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  if (gemm_tn_small(level, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc)) return;
  const Kern& kn = kern_for(level);
  blocked(
      kn, M, N, K, alpha, beta, C, ldc,
      [&](int64_t i0, int mr, int64_t p0, int64_t kc, float* Ap) { pack::a_cols(kn.mr, A + p0 * lda + i0, lda, mr, kc, Ap); },
      [&](int64_t j0, int nr, int64_t p0, int64_t kc, float* Bp) { kn.pack_b_n(B + p0 * ldb + j0, ldb, nr, kc, Bp); },
      DirectA{A, 1, lda});
}

void gemm_packed_b(SimdLevel level, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                   const GemmPackB& pack, float beta, float* C, int64_t ldc) {
  check_dims(M, N, K, lda, K, N, N, ldc);
  check_arg(level != SimdLevel::Scalar && pack.fn, "gemm_packed_b: needs a SIMD level and a packer");
  const Kern& kn = kern_for(level);
  blocked(
      kn, M, N, K, alpha, beta, C, ldc,
      [&](int64_t i0, int mr, int64_t p0, int64_t kc, float* Ap) { pack_a_rows(kn, A + i0 * lda + p0, lda, mr, kc, Ap); },
      [&](int64_t j0, int nr, int64_t p0, int64_t kc, float* Bp) { pack.fn(pack.ctx, j0, nr, p0, kc, Bp); },
      DirectA{A, lda, 1});
}

void nf4_gemm_nt_many(SimdLevel level, int64_t M, const float* X, int64_t ldx, int64_t n, const Nf4Ref* const* W,
                      float* const* Y, const int64_t* ldy) {
  bool same_k = n >= 1;
  for (int64_t i = 0; i < n; ++i) same_k = same_k && W[i]->cols == W[0]->cols;
  if (level == SimdLevel::Scalar || !same_k || M < 1 || M > 2 * kNf4GemvMaxM) {
    for (int64_t i = 0; i < n; ++i) nf4_gemm_nt(level, M, 1.0f, X, ldx, *W[i], 0.0f, Y[i], ldy[i]);
    return;
  }
  for (int64_t i = 0; i < n; ++i) {
    check_nf4(*W[i]);
    check_dims(M, W[i]->rows, W[i]->cols, ldx, W[i]->cols, W[i]->cols, W[i]->cols, ldy[i]);
  }
  std::vector<float*> Yg(static_cast<size_t>(n));  // [n] outputs of one row group
  for (int64_t m0 = 0; m0 < M; m0 += kNf4GemvMaxM) {
    for (int64_t i = 0; i < n; ++i) Yg[i] = Y[i] + m0 * ldy[i];
    nf4_gemv_nt_many(level, std::min(kNf4GemvMaxM, M - m0), X + m0 * ldx, ldx, n, W, Yg.data(), ldy);
  }
}

void nf4_gemm_nt(SimdLevel level, int64_t M, float alpha, const float* X, int64_t ldx, const Nf4Ref& W, float beta,
                 float* Y, int64_t ldy) {
  const int s = check_nf4(W);
  const int64_t N = W.rows, K = W.cols;  // Y[M, N] = X[M, K] · W[N, K]ᵀ
  check_dims(M, N, K, ldx, K, K, K, ldy);
  if (level == SimdLevel::Scalar) return scalar::nf4_gemm_nt(M, alpha, X, ldx, W, beta, Y, ldy);
  if (M >= 1 && M <= 2 * kNf4GemvMaxM) {
    // Small batches (batched decode): GEMV over row groups streams the packed weight once per
    // group, far cheaper than decoding and packing the whole weight for a few rows.
    for (int64_t m0 = 0; m0 < M; m0 += kNf4GemvMaxM)
      nf4_gemv_nt(level, std::min(kNf4GemvMaxM, M - m0), alpha, X + m0 * ldx, ldx, W, beta, Y + m0 * ldy, ldy);
    return;
  }
  const Kern& kn = kern_for(level);
  blocked(
      kn, M, N, K, alpha, beta, Y, ldy,
      [&](int64_t i0, int mr, int64_t p0, int64_t kc, float* Ap) { pack_a_rows(kn, X + i0 * ldx + p0, ldx, mr, kc, Ap); },
      [&](int64_t j0, int nr, int64_t p0, int64_t kc, float* Bp) {
        // Decode nr weight rows [j0, j0+nr) x columns [p0, p0+kc) into tmp [nr, kc], then transpose-pack.
        float* tmp = t_tmp.get(static_cast<size_t>(kn.nr * kc));
        RunScales sc;
        for (int r = 0; r < nr; ++r) {
          const int64_t f0 = (j0 + r) * K + p0;  // flat index of W[j0 + r, p0]
          kn.nf4_decode(W.packed, f0, kc, sc.fill(W, f0, kc, s), s, kNf4Codes, tmp + r * kc);
        }
        kn.pack_b_t(tmp, kc, nr, kc, Bp);
      });
}

void nf4_gemm_nn(SimdLevel level, int64_t M, float alpha, const float* dY, int64_t lddy, const Nf4Ref& W, float beta,
                 float* dX, int64_t lddx) {
  const int s = check_nf4(W);
  const int64_t N = W.cols, K = W.rows;  // dX[M, N] = dY[M, K] · W[K, N]
  check_dims(M, N, K, lddy, K, N, N, lddx);
  if (level == SimdLevel::Scalar) return scalar::nf4_gemm_nn(M, alpha, dY, lddy, W, beta, dX, lddx);
  const Kern& kn = kern_for(level);
  // Every panel row run starts on a 16-element boundary (j0 is a multiple of NR = 16).
  const bool panel_n = kn.nf4_panel_n && kn.nr == 16 && N % 16 == 0 && !nf4_panel_n_off();
  blocked(
      kn, M, N, K, alpha, beta, dX, lddx,
      [&](int64_t i0, int mr, int64_t p0, int64_t kc, float* Ap) { pack_a_rows(kn, dY + i0 * lddy + p0, lddy, mr, kc, Ap); },
      [&](int64_t j0, int nr, int64_t p0, int64_t kc, float* Bp) {
        // Row k of the panel is W[p0 + k, j0 : j0 + nr), decoded straight into place.
        if (panel_n && nr == kn.nr) {
          // One call per panel (AVX2's 16-wide rows cost a call and a scale fill each, twice
          // AVX-512's count per weight): the rows' scales first, then every row, two a step.
          float scl[RunScales::kMaxLen];
          const int64_t f0 = p0 * N + j0;
          pack::nf4_scales_strided(W, f0, N, kc, s, scl);
          kn.nf4_panel_n(W.packed, f0, N, kc, scl, kNf4Codes, Bp);
          return;
        }
        RunScales sc;
        for (int64_t k = 0; k < kc; ++k) {
          const int64_t f0 = (p0 + k) * N + j0;
          float* dst = Bp + k * kn.nr;
          kn.nf4_decode(W.packed, f0, nr, sc.fill(W, f0, nr, s), s, kNf4Codes, dst);
          for (int j = nr; j < kn.nr; ++j) dst[j] = 0.0f;
        }
      });
}

}  // namespace qlora::cpu
