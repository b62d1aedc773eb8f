// NF4 GEMV dispatcher (level-neutral): validates, regroups X for the SIMD kernels, decodes the
// double-quant block scales of each row range into a small buffer (so the kernels read one
// float per block and the decode is bit-identical at every level: no FMA contraction here),
// and spreads output rows over the thread pool. The packed weight is streamed once per call.
#include "cpu/nf4_gemv.hpp"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "common/error.hpp"
#include "cpu/cache_info.hpp"
#include "cpu/gemm_bf16.hpp"
#include "cpu/gemm_scalar.hpp"
#include "cpu/gemv_tasks.hpp"
#include "cpu/nf4_gemv_bf16_kernels.hpp"
#include "cpu/nf4_gemv_kernels.hpp"
#include "cpu/threads.hpp"
#include "cpu/tuning.hpp"

namespace qlora::cpu {

namespace {

using nf4_gemv_detail::Args;
static_assert(kNf4GemvMaxM >= 1 && kNf4GemvMaxM <= 8, "the kernels are instantiated for M = 1..8");
using RowsFn = void (*)(const Args&, int64_t, int64_t);
constexpr int64_t kNarrowMaxM = 4;  // rows of X per pass of the generic kernel

// The generic kernel takes M <= 4: larger M runs over rows [0, 4) and [4, M) of X.
template <RowsFn F>
void rows_narrow(const Args& a, int64_t r0, int64_t r1) {
  for (int64_t m0 = 0; m0 < a.M; m0 += kNarrowMaxM) {
    Args b = a;
    b.M = std::min(kNarrowMaxM, a.M - m0);
    b.x = a.x + m0 * a.ldx;
    b.y = a.y + m0 * a.ldy;
    F(b, r0, r1);
  }
}

// QLORA_NF4_GEMV_M1=0 sends M = 1 at AVX-512 back to the general kernel (rows_avx512 with M = 1;
// A/B measurements); QLORA_NF4_GEMV_PF="l1,l2" sets the M = 1 kernel's prefetch distances in bytes
// ("0,0": none), also for AVX2's M = 1. Read per call: a few hundred calls per decode step, negligible.
bool m1_kernel_enabled() {
  const char* e = std::getenv("QLORA_NF4_GEMV_M1");
  return !(e && std::strcmp(e, "0") == 0);
}
// QLORA_NF4_GEMV_M1_PAIRS=0: the M = 1 kernel one weight row at a time (A/B runs; same bits).
bool m1_pairs_enabled() {
  const char* e = std::getenv("QLORA_NF4_GEMV_M1_PAIRS");
  return !(e && std::strcmp(e, "0") == 0);
}
// The M = 1 kernel in groups of four weight rows (else pairs; same bits) where X[K] in fp32 exceeds
// half the L1d: there each group re-reads X from L2, and four rows per pass halve that traffic
// (Emerald Rapids, 48 KiB L1d, 1 thread, CPU time: 4096x11008 +10%); where X fits (K = 1536:
// 576x1536 -5%, K = 4096: within noise) pairs stay. QLORA_NF4_GEMV_M1_QUADS=0 / 1 forces pairs /
// fours at every K (A/B runs, read per call).
bool m1_quads(int64_t K, int64_t l1d) {
  const char* e = std::getenv("QLORA_NF4_GEMV_M1_QUADS");
  if (e && std::strcmp(e, "0") == 0) return false;
  if (e && std::strcmp(e, "1") == 0) return true;
  return 4 * K > l1d / 2;
}
#if defined(QLORA_X86)
// The AVX2 kernels' decode of whole blocks (nf4_gemv_avx2.cpp): 0 = two vpermps tables and a
// blend, 1 = byte-table lookups (vpshufb), the same bits. Which is faster depends on the core's
// shuffle ports and, for the wide kernel (M = 5..8, eight accumulators), on register pressure, so
// each is measured once per machine (cpu/tuning.hpp) on a 64 x 2048 weight in L2 at M = 1 / 8
// (Emerald Rapids, 1 thread: lookups ~1.25x at M = 1); QLORA_NF4_GEMV_AVX2_LOOKUP=0 / 1 forces
// both (read per call).
int avx2_lookup_choice(bool wide) {
  const char* e = std::getenv("QLORA_NF4_GEMV_AVX2_LOOKUP");
  const int forced = !e ? -1 : std::strcmp(e, "0") == 0 ? 0 : std::strcmp(e, "1") == 0 ? 1 : -1;
  // Built once: this runs on every AVX2 GEMV call (a few hundred per decode step).
  static const std::string key_m4 = "nf4_gemv_avx2_decode.v1", key_m8 = "nf4_gemv_avx2_decode_m8.v1";
  static const std::vector<std::string> names = {"vpermps", "lookup"};
  return tuning::choose(wide ? key_m8 : key_m4, names, 1, forced, [wide](int v) {
    constexpr int64_t N = 64, K = 2048;
    static const std::vector<uint8_t> packed = [] {  // [N * K / 2] arbitrary codes
      std::vector<uint8_t> p(static_cast<size_t>(N * K / 2));
      uint32_t r = 12345;
      for (uint8_t& b : p) b = static_cast<uint8_t>((r = r * 1664525u + 1013904223u) >> 24);
      return p;
    }();
    const int64_t M = wide ? 8 : 1;
    static const std::vector<float> absmax(static_cast<size_t>(N * K / 64), 0.75f), x(static_cast<size_t>(8 * K), 0.5f);
    std::vector<float> y(static_cast<size_t>(M * N));
    Args a{};
    a.M = M, a.K = K, a.packed = packed.data(), a.absmax = absmax.data(), a.bs_shift = 6, a.codes = kNf4Codes;
    a.x = x.data(), a.ldx = wide ? 16 : K, a.alpha = 1.0f, a.y = y.data(), a.ldy = N, a.avx2_lookup = v;
    a.pf_l1 = 1024, a.pf_l2 = 16 * K;
    const auto t0 = std::chrono::steady_clock::now();
    for (int rep = 0; rep < 3; ++rep) nf4_gemv_detail::rows_avx2(a, 0, N);
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  });
}
#endif
bool m1_prefetch_override(int64_t& l1, int64_t& l2) {
  const char* e = std::getenv("QLORA_NF4_GEMV_PF");
  long long a = 0, b = 0;
  if (!e || std::sscanf(e, "%lld,%lld", &a, &b) != 2 || a < 0 || b < 0) return false;
  l1 = a, l2 = b;
  return true;
}

int log2_exact(int bs) {
  int s = 0;
  while ((1 << s) < bs) ++s;
  return s;
}

// X[M, K] -> Xg[M, K] in the order the SIMD kernels decode weights: per group of G columns
// (G/2 bytes), slot q < G/2 holds the even column of byte p = 4*(q % C) + q / C (C = G/8, the
// register's copies of the broadcast bytes) and slot G/2 + q its odd column. The reference for
// regroup_x_avx512 / regroup_x_avx2 (which x86 builds run instead).
[[maybe_unused]] void regroup_x(int64_t M, int64_t K, const float* X, int64_t ldx, int64_t G, float* Xg) {
  const int64_t C = G / 8;
  for (int64_t m = 0; m < M; ++m) {
    const float* x = X + m * ldx;
    float* xg = Xg + m * K;
    for (int64_t g = 0; g < K; g += G)
      for (int64_t q = 0; q < G / 2; ++q) {
        const int64_t p = 4 * (q % C) + q / C;
        xg[g + q] = x[g + 2 * p];
        xg[g + G / 2 + q] = x[g + 2 * p + 1];
      }
  }
}

}  // namespace

namespace {

void check_weight(const char* fn, const Nf4Ref& W) {
  if (W.rows < 1 || W.cols < 1) throw ValueError(std::string(fn) + ": weight shape must be positive");
  if (W.blocksize < 32 || W.blocksize > 4096 || (W.blocksize & (W.blocksize - 1)) != 0)
    throw ValueError(std::string(fn) + ": blocksize must be a power of two in [32, 4096], got " +
                     std::to_string(W.blocksize));
}

// Rows [r0, r1) of one weight (gemv_tasks::scaled_rows: double-quant scales decoded a few rows at a time).
void run_rows(RowsFn rows, bool avx512, bool avx2, const Args& a, const Nf4Ref& W, int64_t r0, int64_t r1) {
  const uint8_t* code = static_cast<const uint8_t*>(W.absmax);
  gemv_tasks::scaled_rows(
      a, W, r0, r1,
      [&](int64_t b0, int64_t b1, float* out) {
        // Same float ops as scalar::nf4_block_absmax (this file is built without FMA contraction on x86).
#if defined(QLORA_X86)
        if (avx512)
          nf4_gemv_detail::decode_scales_avx512(code, W.nested_map, W.nested_absmax, W.offset, b0, b1, out);
        else if (avx2)
          nf4_gemv_detail::decode_scales_avx2(code, W.nested_map, W.nested_absmax, W.offset, b0, b1, out);
        else
#endif
          for (int64_t b = b0; b < b1; ++b) out[b - b0] = W.nested_map[code[b]] * W.nested_absmax[b >> 8] + W.offset;
      },
      [&](const Args& x, int64_t q0, int64_t q1) { rows(x, q0, q1); });
}

// The calling thread's regrouped X and task list, grow-only: no allocation and no zero-fill of
// M x K floats per call (~120 calls per decode step). QLORA_GEMV_SCRATCH=0 (read per call, A/B
// runs): a fresh zero-filled vector per call as before. The pool's threads only read them while
// the caller waits in parallel_for.
struct GemvScratch {
  std::vector<float> xg;
  std::vector<gemv_tasks::Task> tasks;
};
GemvScratch& gemv_scratch() {
  thread_local GemvScratch s;
  return s;
}

// Y_i[M, W_i.rows] = alpha * X[M, K] · deq(W_i)ᵀ + beta * Y_i for n weights sharing X (K = W_i.cols):
// X is regrouped once and all weights' rows go to the thread pool as one job.
void gemv_many(SimdLevel level, int64_t M, float alpha, const float* X, int64_t ldx, int64_t n, const Nf4Ref* const* W,
               float beta, float* const* Y, const int64_t* ldy, const GemvTail* tail = nullptr,
               bool bf16_ops = false) {
  const int64_t K = W[0]->cols;
  // Pick the kernel; SIMD kernels need K to be a whole number of groups (else the generic path).
  RowsFn rows = rows_narrow<nf4_gemv_detail::rows_generic>;
  int64_t G = 0;
#if defined(QLORA_X86)
  if (level == SimdLevel::AVX512 && K % nf4_gemv_detail::kGroupAvx512 == 0) {
    rows = nf4_gemv_detail::rows_avx512;
    G = nf4_gemv_detail::kGroupAvx512;
  } else if (level >= SimdLevel::AVX2 && K % nf4_gemv_detail::kGroupAvx2 == 0) {
    rows = nf4_gemv_detail::rows_avx2;  // all M in one pass
    G = nf4_gemv_detail::kGroupAvx2;
  }
#endif
#if defined(QLORA_X86)
  const bool m1 = G == nf4_gemv_detail::kGroupAvx512 && M == 1 && m1_kernel_enabled();
  const bool m1_groups = m1 && m1_pairs_enabled(), quads = m1_groups && m1_quads(K, cache_sizes().l1d);
  if (m1) rows = !m1_groups ? nf4_gemv_detail::rows_avx512_m1
                 : quads    ? nf4_gemv_detail::rows_avx512_m1_quads
                            : nf4_gemv_detail::rows_avx512_m1_pairs;
  // The bf16 contract at M = 1: the same row groups with hardware-rounded tables (AVX512-BF16:
  // checked by nf4_gemv_nt_many_bf16_fp32).
  if (m1_groups && bf16_ops) rows = quads ? nf4_gemv_bf16_detail::rows_m1_fp32_quads : nf4_gemv_bf16_detail::rows_m1_fp32;
#else
  const bool m1 = false;
#endif
  Args base{};
  base.M = M;
  base.K = K;
  // Prefetch distances and X chunks from the caches (measured on a 32-48 KiB L1d, 1 MiB L2 with
  // 4 and 16 row pairs ahead and 24 KiB chunks): pairs ahead, capped so the lines still sit in
  // L1 (half of it) and L2 (1/16) when the loop reaches them.
  const CacheSizes& cs = cache_sizes();
  base.pf_l1 = std::max<int64_t>(64, std::min<int64_t>(4 * K, cs.l1d / 2));
  base.pf_l2 = std::max<int64_t>(base.pf_l1, std::min<int64_t>(16 * K, cs.l2 / 16));
  base.x_chunk = std::max<int64_t>(4 << 10, cs.l1d * 3 / 4);
  if (M == 1) {
    // One row streams at a time (the M = 1 kernels at AVX-512 and AVX2): a short L1 distance (X[K]
    // shares the L1: 16 KiB at K = 4096) and the L2 distance of the row-pair kernels.
    base.pf_l1 = std::min<int64_t>(1024, cs.l1d / 16);
    m1_prefetch_override(base.pf_l1, base.pf_l2);
  }
  base.codes = kNf4Codes;
  base.round_bf16 = bf16_ops ? 1 : 0;
#if defined(QLORA_X86)
  if (G == nf4_gemv_detail::kGroupAvx2) base.avx2_lookup = avx2_lookup_choice(M > 4);
#endif
  base.alpha = alpha;
  base.beta = beta;
  GemvScratch fresh;  // QLORA_GEMV_SCRATCH=0
  GemvScratch& sc = gemv_tasks::scratch_enabled() ? gemv_scratch() : fresh;
  std::vector<float>& xg = sc.xg;  // [M, K] regrouped X (SIMD kernels)
  const bool avx512 = G == nf4_gemv_detail::kGroupAvx512;
  const bool avx2 = G == nf4_gemv_detail::kGroupAvx2;
  if (G) {
    if (xg.size() < static_cast<size_t>(M * K)) xg.resize(static_cast<size_t>(M * K));
    base.x = xg.data();
    base.ldx = K;
#if defined(QLORA_X86)
    if (m1)
      nf4_gemv_detail::regroup_x_avx512_m1(K, X, xg.data());
    else if (avx512)
      nf4_gemv_detail::regroup_x_avx512(M, K, X, ldx, xg.data());
    else
      base.ldx = nf4_gemv_detail::regroup_x_avx2(M, K, X, ldx, xg.data());
#else
    regroup_x(M, K, X, ldx, G, xg.data());
#endif
    if (bf16_ops) {  // the regroup only permutes: rounding after it is rounding X
#if defined(QLORA_X86)
      nf4_gemv_bf16_detail::round_x_bf16(xg.data(), M * K);  // AVX512-BF16: nf4_gemv_nt_many_bf16_fp32 checked
#else
      for (int64_t i = 0; i < M * K; ++i) xg[static_cast<size_t>(i)] = bf16_round(xg[static_cast<size_t>(i)]);
#endif
    }
  } else {
    base.x = X;
    base.ldx = ldx;
  }

  // Tasks: even row chunks of each weight (gemv_tasks::split), one job with the tail's tasks.
  const int64_t total = gemv_tasks::split(M, K, n, W, sc.tasks);
  const bool pf = tail && tail->prefetch && avx512;
  gemv_tasks::run(sc.tasks, total, tail, pf,
                  [&](const gemv_tasks::Task& t, int64_t r0, int64_t r1, const char* pf_lo, const char* pf_hi) {
                    const Nf4Ref& w = *W[t.w];
                    Args a = base;
                    a.packed = w.packed;
                    a.bs_shift = log2_exact(w.blocksize);
                    a.y = Y[t.w];
                    a.ldy = ldy[t.w];
                    a.pf_lo = pf_lo, a.pf_hi = pf_hi;
                    run_rows(rows, avx512, avx2, a, w, r0, r1);
                  });
}

// The message is built only on failure: these checks run ~120 times per decode step.
void check_rows(const char* fn, int64_t M) {
  if (M < 1 || M > kNf4GemvMaxM)
    throw ValueError(std::string(fn) + ": M must be in [1, " + std::to_string(kNf4GemvMaxM) + "], got " +
                     std::to_string(M));
}

}  // namespace

void nf4_gemv_nt(SimdLevel level, int64_t M, float alpha, const float* X, int64_t ldx, const Nf4Ref& W, float beta,
                 float* Y, int64_t ldy) {
  check_rows("nf4_gemv_nt", M);
  check_weight("nf4_gemv_nt", W);
  check_arg(M == 1 || (ldx >= W.cols && ldy >= W.rows), "nf4_gemv_nt: leading dimensions too small");  // unused at M = 1
  if (level == SimdLevel::Scalar) {  // the oracle stays the plain reference loop
    scalar::nf4_gemm_nt(M, alpha, X, ldx, W, beta, Y, ldy);
    return;
  }
  const Nf4Ref* w = &W;
  gemv_many(level, M, alpha, X, ldx, 1, &w, beta, &Y, &ldy);
}

void nf4_gemv_nt_many(SimdLevel level, int64_t M, const float* X, int64_t ldx, int64_t n, const Nf4Ref* const* W,
                      float* const* Y, const int64_t* ldy) {
  check_rows("nf4_gemv_nt_many", M);
  check_arg(n >= 1, "nf4_gemv_nt_many: no weights");
  for (int64_t i = 0; i < n; ++i) {
    check_weight("nf4_gemv_nt_many", *W[i]);
    check_arg(W[i]->cols == W[0]->cols, "nf4_gemv_nt_many: the weights must share their input size");
    check_arg(M == 1 || (ldx >= W[i]->cols && ldy[i] >= W[i]->rows), "nf4_gemv_nt_many: leading dimensions too small");
  }
  if (level == SimdLevel::Scalar) {
    for (int64_t i = 0; i < n; ++i) scalar::nf4_gemm_nt(M, 1.0f, X, ldx, *W[i], 0.0f, Y[i], ldy[i]);
    return;
  }
  gemv_many(level, M, 1.0f, X, ldx, n, W, 0.0f, Y, ldy);
}

void nf4_gemv_nt_many_tail(SimdLevel level, int64_t M, const float* X, int64_t ldx, int64_t n, const Nf4Ref* const* W,
                           float* const* Y, const int64_t* ldy, const GemvTail& tail) {
  check_arg(level != SimdLevel::Scalar, "nf4_gemv_nt_many_tail: not at the scalar level");
  check_rows("nf4_gemv_nt_many_tail", M);
  check_arg(n >= 1, "nf4_gemv_nt_many_tail: no weights");
  for (int64_t i = 0; i < n; ++i) {
    check_weight("nf4_gemv_nt_many_tail", *W[i]);
    check_arg(W[i]->cols == W[0]->cols, "nf4_gemv_nt_many_tail: the weights must share their input size");
    check_arg(M == 1 || (ldx >= W[i]->cols && ldy[i] >= W[i]->rows),
              "nf4_gemv_nt_many_tail: leading dimensions too small");
  }
  gemv_many(level, M, 1.0f, X, ldx, n, W, 0.0f, Y, ldy, &tail);
}

void nf4_gemv_nt_many_bf16_fp32(int64_t M, float alpha, const float* X, int64_t ldx, int64_t n,
                                 const Nf4Ref* const* W, float beta, float* const* Y, const int64_t* ldy,
                                 const GemvTail* tail) {
  check_arg(M >= 1 && M <= kNf4GemvMaxM && W[0]->cols % 32 == 0, "nf4_gemv_nt_many_bf16_fp32: M or K out of range");
  check_arg(cpu_has_avx512_bf16(), "nf4_gemv_nt_many_bf16_fp32: needs AVX512-BF16");
#if !defined(QLORA_X86)
  check_arg(false, "nf4_gemv_nt_many_bf16_fp32: x86 AVX-512 only");  // the generic kernel ignores round_bf16
#endif
  gemv_many(SimdLevel::AVX512, M, alpha, X, ldx, n, W, beta, Y, ldy, tail, true);
}

}  // namespace qlora::cpu
