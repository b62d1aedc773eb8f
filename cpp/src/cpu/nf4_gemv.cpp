// NF4 GEMV dispatcher (level-neutral): validates, regroups X for the SIMD kernels, decodes the
// double-quant block scales of each row range into a small buffer (so the kernels read one
// float per block and the decode is bit-identical at every level: no FMA contraction here),
// and spreads output rows over the thread pool. The packed weight is streamed once per call.
#include "cpu/nf4_gemv.hpp"

#include <algorithm>
#include <string>
#include <vector>

#include "common/error.hpp"
#include "cpu/gemm_scalar.hpp"
#include "cpu/nf4_gemv_kernels.hpp"
#include "cpu/threads.hpp"

namespace qlora::cpu {

namespace {

using nf4_gemv_detail::Args;
static_assert(kNf4GemvMaxM >= 1 && kNf4GemvMaxM <= 8, "the kernels are instantiated for M = 1..8");
using RowsFn = void (*)(const Args&, int64_t, int64_t);
constexpr int64_t kNarrowMaxM = 4;  // rows of X per pass of the AVX2 and generic kernels

// The AVX2 and generic kernels take M <= 4: larger M runs over rows [0, 4) and [4, M) of X.
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

int log2_exact(int bs) {
  int s = 0;
  while ((1 << s) < bs) ++s;
  return s;
}

// X[M, K] -> Xg[M, K] in the order the SIMD kernels decode weights: per group of G columns
// (G/2 bytes), slot q < G/2 holds the even column of byte p = 4*(q % C) + q / C (C = G/8, the
// register's copies of the broadcast bytes) and slot G/2 + q its odd column.
void regroup_x(int64_t M, int64_t K, const float* X, int64_t ldx, int64_t G, float* Xg) {
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

void nf4_gemv_nt(SimdLevel level, int64_t M, float alpha, const float* X, int64_t ldx, const Nf4Ref& W, float beta,
                 float* Y, int64_t ldy) {
  const int64_t N = W.rows, K = W.cols;
  check_arg(M >= 1 && M <= kNf4GemvMaxM,
            "nf4_gemv_nt: M must be in [1, " + std::to_string(kNf4GemvMaxM) + "], got " + std::to_string(M));
  check_arg(N >= 1 && K >= 1, "nf4_gemv_nt: weight shape must be positive");
  check_arg(W.blocksize >= 32 && W.blocksize <= 4096 && (W.blocksize & (W.blocksize - 1)) == 0,
            "nf4_gemv_nt: blocksize must be a power of two in [32, 4096], got " + std::to_string(W.blocksize));
  check_arg(M == 1 || (ldx >= K && ldy >= N), "nf4_gemv_nt: leading dimensions too small");  // unused at M = 1
  if (level == SimdLevel::Scalar) {  // the oracle stays the plain reference loop
    scalar::nf4_gemm_nt(M, alpha, X, ldx, W, beta, Y, ldy);
    return;
  }

  // Pick the kernel; SIMD kernels need K to be a whole number of groups (else the generic path).
  RowsFn rows = rows_narrow<nf4_gemv_detail::rows_generic>;
  int64_t G = 0;
#if defined(QLORA_X86)
  if (level == SimdLevel::AVX512 && K % nf4_gemv_detail::kGroupAvx512 == 0) {
    rows = nf4_gemv_detail::rows_avx512;
    G = nf4_gemv_detail::kGroupAvx512;
  } else if (level >= SimdLevel::AVX2 && K % nf4_gemv_detail::kGroupAvx2 == 0) {
    rows = rows_narrow<nf4_gemv_detail::rows_avx2>;
    G = nf4_gemv_detail::kGroupAvx2;
  }
#endif

  Args base{};
  base.M = M;
  base.K = K;
  base.packed = W.packed;
  base.bs_shift = log2_exact(W.blocksize);
  base.codes = kNf4Codes;
  base.alpha = alpha;
  base.beta = beta;
  base.y = Y;
  base.ldy = ldy;
  std::vector<float> xg;  // [M, K] regrouped X (SIMD kernels)
  const bool avx512 = G == nf4_gemv_detail::kGroupAvx512;
  if (G) {
    xg.resize(static_cast<size_t>(M * K));
#if defined(QLORA_X86)
    if (avx512)
      nf4_gemv_detail::regroup_x_avx512(M, K, X, ldx, xg.data());
    else
#endif
      regroup_x(M, K, X, ldx, G, xg.data());
    base.x = xg.data();
    base.ldx = K;
  } else {
    base.x = X;
    base.ldx = ldx;
  }

  const int s = base.bs_shift;
  // At least 128 KiB of packed weight per task at M <= 2 (about 8 us of streaming), so that small
  // layers do not pay the thread pool's wake-up and join; less at larger M, where each weight
  // costs M FMAs (at M = 8 a [192, 576] k/v projection is then split over two threads).
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / (K * std::max<int64_t>(1, M / 2)));
  if (!W.double_quant) {
    base.absmax = static_cast<const float*>(W.absmax);
    base.block0 = 0;
    parallel_range(N, grain, [&](int64_t r0, int64_t r1) { rows(base, r0, r1); });
    return;
  }
  // Double quant: decode the scales of a few rows at a time into a per-task buffer (stays in L1/L2).
  const int64_t rows_per_sub = std::max<int64_t>(1, (int64_t{4096} << s) / K);
  parallel_range(N, grain, [&](int64_t r0, int64_t r1) {
    std::vector<float> scales;
    Args a = base;
    for (int64_t q0 = r0; q0 < r1; q0 += rows_per_sub) {
      const int64_t q1 = std::min(r1, q0 + rows_per_sub);
      const int64_t b0 = (q0 * K) >> s, b1 = ((q1 * K - 1) >> s) + 1;  // blocks [b0, b1)
      scales.resize(static_cast<size_t>(b1 - b0));
      // Same float ops as scalar::nf4_block_absmax (this file is built without FMA contraction on x86).
      const uint8_t* code = static_cast<const uint8_t*>(W.absmax);
#if defined(QLORA_X86)
      if (avx512)
        nf4_gemv_detail::decode_scales_avx512(code, W.nested_map, W.nested_absmax, W.offset, b0, b1, scales.data());
      else
#endif
        for (int64_t b = b0; b < b1; ++b) scales[b - b0] = W.nested_map[code[b]] * W.nested_absmax[b >> 8] + W.offset;
      a.absmax = scales.data();
      a.block0 = b0;
      rows(a, q0, q1);
    }
  });
}

}  // namespace qlora::cpu
