// The few-column GEMM paths of the LoRA shapes (cpu/gemm_small.hpp).
#include "cpu/gemm_small.hpp"

#include <algorithm>
#include <cstdlib>
#include <string>

#include "cpu/aligned_scratch.hpp"
#include "cpu/gemm.hpp"
#include "cpu/gemm_kernels.hpp"
#include "cpu/gemv_f32.hpp"
#include "cpu/threads.hpp"

namespace qlora::cpu {

#ifdef QLORA_X86
namespace {

using namespace gemm_k;

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

thread_local AlignedScratch t_s48;
bool skinny48_on() {  // QLORA_GEMM_SKINNY48=0: the blocked way instead (A/B runs; tests compare bit for bit)
  const char* e = std::getenv("QLORA_GEMM_SKINNY48");
  return !(e && std::string(e) == "0");
}

// C[M, N] = alpha * A·op(B) + beta * C for 32 < N <= 48 at AVX-512 (the grouped q/k/v LoRA shrink
// x·[A_q; A_k; A_v]ᵀ, R = 48): B packed once [K][48], A read in place by 8 x 48 tiles (a broadcast
// per 3 FMAs; the blocked way packed A and ran a 32-column panel plus a half-width 16-column one at a
// broadcast per FMA). Same depth blocks and FMA chains as the blocked way: same bits.
// pack(Bp): Bp[k][j] = op(B)[k][j] for j < N, 0 for N <= j < 48.
template <class PackB>
void skinny48(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda, float beta, float* C,
              int64_t ldc, const PackB& pack) {
  float* Bp = t_s48.get<float>(static_cast<size_t>(K * 48));
  pack(Bp);
  const int64_t kc = gemm_depth_block(SimdLevel::AVX512, K), R = kSkinny48Rows;
  const int64_t tiles = ceil_div(M, R);
  const int64_t per = std::max<int64_t>(1, static_cast<int64_t>(4e6 / (2.0 * R * 48 * K)));  // ~4 MFLOP a task
  const int nr = static_cast<int>(N);
  parallel_for(ceil_div(tiles, per), [&](int64_t t) {
    for (int64_t it = t * per; it < std::min(tiles, (t + 1) * per); ++it) {
      const int64_t i0 = it * R;
      const int mr = static_cast<int>(std::min(R, M - i0));
      for (int64_t pc = 0; pc < K; pc += kc)
        skinny48_avx512(std::min(kc, K - pc), A + i0 * lda + pc, lda, Bp + pc * 48, C + i0 * ldc, ldc, alpha,
                        pc == 0 ? beta : 1.0f, mr, nr);
    }
  });
}
bool skinny48_fits(SimdLevel level, int64_t M, int64_t N, int64_t K) {
  return level == SimdLevel::AVX512 && N > 32 && N <= 48 && M > kGemvF32MaxM && K >= 1 && skinny48_on();
}

// QLORA_GEMM_TN_SMALL=0: gemm_tn's few-row kernel off (A/B runs; tests compare both ways bit for bit).
bool tn_small_off() {
  static const bool off = [] {
    const char* e = std::getenv("QLORA_GEMM_TN_SMALL");
    return e && std::string(e) == "0";
  }();
  return off;
}

// gemm_tn with at most 48 rows of output (or, transposed, columns) against at least 128 of the other:
// the rank-r LoRA factor gradients. The blocked way packed the big operand (a copy of x or dy per
// call) and ran a 2-row remainder tile; tn_small_avx512 reads both in place instead, tn_small_avx2
// copies 64-column chunks of the wide one (cpu/gemm_kernels_avx2.cpp says why).
bool tn_small_fits(int64_t rows, int64_t cols) { return rows <= 48 && cols >= 128; }

// Wide operand rows at least 4 KiB apart (1536 columns: a page per row): the chunk-copying kernels
// pay there. 1 thread CPU time, Emerald Rapids (family 6 model 207), loaded: AVX-512 16x1536x1024
// in place 0.86-0.92 ms -> copied 0.67-0.68 (both orientations), 576 columns 0.18-0.26 either way
// (kept in place); AVX2 transposed (dB) 1536x16x1024 blocked 1.29-1.32 -> 0.88-0.96, 576x16 0.32
// -> 0.33-0.35 and 192x16 0.09 -> 0.10 (kept blocked).
constexpr int64_t kTnCopyMinLd = 1024;

// Out element (i < rows, j < cols) = sum_k A[k, i] B[k, j], at C[i * ldc + j] (trans: C[j * ldc + i]).
void tn_small(SimdLevel level, int64_t rows, int64_t cols, int64_t K, float alpha, const float* A, int64_t lda,
              const float* B, int64_t ldb, float beta, float* C, int64_t ldc, bool trans) {
  const bool v512 = level == SimdLevel::AVX512, copy = v512 && ldb >= kTnCopyMinLd;
  const auto kern = copy ? tn_small_copy_avx512 : v512 ? tn_small_avx512 : tn_small_avx2;
  const int64_t kc = gemm_depth_block(level, K);  // the blocked way's depth blocks
  const int64_t R = copy ? kTnSmallRowsCopy : v512 ? kTnSmallRows : kTnSmallRowsAvx2;
  const int64_t W = copy ? kTnSmallColsCopy : v512 ? kTnSmallCols : kTnSmallColsAvx2;
  const int64_t tiles = ceil_div(cols, W);
  const double tile_flops = 2.0 * static_cast<double>(rows) * W * K;
  const int64_t per = std::max<int64_t>(1, static_cast<int64_t>(4e6 / std::max(tile_flops, 1.0)));  // ~4 MFLOP a task
  parallel_for(ceil_div(tiles, per), [&](int64_t t) {
    for (int64_t jt = t * per; jt < std::min(tiles, (t + 1) * per); ++jt) {
      const int64_t j0 = jt * W;
      const int nr = static_cast<int>(std::min(W, cols - j0));
      for (int64_t i0 = 0; i0 < rows; i0 += R) {
        const int mr = static_cast<int>(std::min(R, rows - i0));
        float* c = trans ? C + j0 * ldc + i0 : C + i0 * ldc + j0;
        for (int64_t pc = 0; pc < K; pc += kc)
          kern(std::min(kc, K - pc), A + pc * lda + i0, lda, B + pc * ldb + j0, ldb, c, ldc, alpha,
               pc == 0 ? beta : 1.0f, mr, nr, trans);
      }
    }
  });
}
}  // namespace
#endif

bool gemm_nt_skinny48(SimdLevel level, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                      const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
#ifdef QLORA_X86
  if (!skinny48_fits(level, M, N, K)) return false;
  skinny48(M, N, K, alpha, A, lda, beta, C, ldc,
           [&](float* Bp) { pack_b_t48_avx512(B, ldb, static_cast<int>(N), K, Bp); });
  return true;
#else
  (void)level, (void)M, (void)N, (void)K, (void)alpha, (void)A, (void)lda, (void)B, (void)ldb, (void)beta, (void)C,
      (void)ldc;
  return false;
#endif
}

bool gemm_tn_small(SimdLevel level, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                   const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
#ifdef QLORA_X86
  if ((level == SimdLevel::AVX512 || level == SimdLevel::AVX2) && K > 0 && !tn_small_off()) {
    if (tn_small_fits(M, N)) return tn_small(level, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, false), true;
    // Transposed (dB of r = 16): at AVX2 only where A's rows are far apart (kTnCopyMinLd); below that
    // the blocked way's direct micro-kernel is as fast (576 columns) or faster (192).
    if ((level == SimdLevel::AVX512 || lda >= kTnCopyMinLd) && tn_small_fits(N, M))
      return tn_small(level, N, M, K, alpha, B, ldb, A, lda, beta, C, ldc, true), true;  // Cᵀ = Bᵀ·A
  }
#else
  (void)level, (void)M, (void)N, (void)K, (void)alpha, (void)A, (void)lda, (void)B, (void)ldb, (void)beta, (void)C,
      (void)ldc;
#endif
  return false;
}

}  // namespace qlora::cpu
