// Few-column bf16-compute GEMM driver (cpu/gemm_bf16_skinny.hpp). gemm_nt / gemm_nn: op(B) is
// packed once into 16-row pair panels shared by all threads, tasks take runs of rows of A and run
// the row-dot kernel (A read in order, never packed: in training it is cold in cache, and a
// transposing pack of 28 rows at once streamed at half the fp32 kernel's rate). gemm_tn: per K
// block the whole B (N <= 16) is one [kp][16] panel, tasks take runs of 28-row tiles of op(A),
// pack each tile (gemm_bf16_avx512bf16.cpp's packer) and run the 28x16 micro-kernel. Rounding is
// the blocked kernel's (RNE), so results differ from it only in the fp32 summation order.
#include "cpu/gemm_bf16_skinny.hpp"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>

#include "cpu/aligned_scratch.hpp"
#include "cpu/gemm_bf16_kernels.hpp"
#include "cpu/gemm_bf16_skinny_kernels.hpp"
#include "cpu/threads.hpp"

namespace qlora::cpu {

namespace {
constexpr int64_t MR = bf16_k::kSkinnyMR, NR = 16;
constexpr int64_t kKCMax = 2048;      // gemm_tn k per block: a 28-row A tile (112 KiB) and B (64 KiB) in L2
constexpr int64_t kRowdotL1K = 1024;  // row-dot 1x16 up to here: W panel 16 x 1024 bf16 = 32 KiB

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

thread_local AlignedScratch t_ap, t_bp, t_tmp;

// QLORA_GEMM_BF16_SKINNY=0: off (the blocked 14x32 kernel runs these shapes; A/B runs).
bool skinny_on() {
  static const bool on = [] {
    const char* e = std::getenv("QLORA_GEMM_BF16_SKINNY");
    return !(e && std::string(e) == "0");
  }();
  return on;
}
// Row-dot variant: 1 row x 16 columns while the 16-row W panel (64 bytes per 32 k) fits in L1
// with room to spare, else 2 rows x 8 columns (half the W traffic). QLORA_ROWDOT=1x16 / 2x8: forced.
bool rowdot_1x16(int64_t K) {
  static const int forced = [] {
    const char* e = std::getenv("QLORA_ROWDOT");
    return e ? (std::string(e) == "1x16" ? 1 : std::string(e) == "2x8" ? 2 : 0) : 0;
  }();
  if (forced) return forced == 1;
  return K <= kRowdotL1K;
}
}  // namespace

bool gemm_bf16_skinny(SkinnyLayout layout, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                      const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
#ifndef QLORA_X86
  return false;
#else
  if (N > (layout == SkinnyLayout::TN ? kSkinnyMaxNTile : kSkinnyMaxN) || N <= 0 || M <= 0 || K <= 0 || !skinny_on())
    return false;
  const int64_t a_cols = layout == SkinnyLayout::TN ? M : K, b_cols = layout == SkinnyLayout::NT ? K : N;
  if (lda < a_cols || ldb < b_cols || ldc < N) return false;  // the caller's check raises
  const int nth = num_threads();
  const bool par = nth > 1 && 2.0 * M * N * K > 2e6;
  if (layout != SkinnyLayout::TN) {
    // Row-dot: W = op(B)ᵀ as 16-row pair panels (shared), rows of A streamed once per 16 columns.
    const int64_t kq = round_up(K, 32) / 2, nblk = ceil_div(N, NR);
    uint32_t* W = t_bp.get<uint32_t>(static_cast<size_t>(nblk * NR * kq));  // the caller's: read by every task
    for (int64_t jb = 0; jb < nblk; ++jb) {
      const int nj = static_cast<int>(std::min(NR, N - jb * NR));
      if (layout == SkinnyLayout::NT) {
        bf16_k::pack_w16_avx512bf16(B + jb * NR * ldb, ldb, nj, K, kq, W + jb * NR * kq);
      } else {  // B [K, N]: its columns jb*16.. as fp32 rows first
        float* tmp = t_tmp.get<float>(static_cast<size_t>(NR * K));
        for (int64_t k = 0; k < K; ++k)
          for (int j = 0; j < nj; ++j) tmp[j * K + k] = B[k * ldb + jb * NR + j];
        bf16_k::pack_w16_avx512bf16(tmp, K, nj, K, kq, W + jb * NR * kq);
      }
    }
    const int64_t n_tasks = par ? std::min<int64_t>(ceil_div(M, 8), 4 * nth) : 1, rows = ceil_div(M, n_tasks);
    const auto kernel = rowdot_1x16(K) ? bf16_k::rowdot16x1_avx512bf16 : bf16_k::rowdot16_avx512bf16;
    parallel_for(ceil_div(M, rows), [&](int64_t task) {
      const int64_t i0 = task * rows, m = std::min(M, i0 + rows) - i0;
      for (int64_t jb = 0; jb < nblk; ++jb)
        kernel(m, K, A + i0 * lda, lda, W + jb * NR * kq, kq, C + i0 * ldc + jb * NR, ldc, alpha, beta,
               static_cast<int>(std::min(NR, N - jb * NR)));
    });
    return true;
  }
  // gemm_tn (dB = dyᵀ·t): op(A) is a column walk; 28x16 tiles over packed panels.
  // Whole-K tiles (up to kKCMax): blocking K to keep a block of A in L2 (32 k at M = 1536) cost
  // more in C reloads and per-block packing than it saved (measured 0.5x the fp32 kernel there).
  const int64_t kc = std::min(round_up(K, 32), round_up(ceil_div(K, ceil_div(K, kKCMax)), 32));
  const int64_t m_tiles = ceil_div(M, MR);
  // Tasks: runs of tiles, a few per thread (dynamic claiming evens them out); one for small work.
  const int64_t n_tasks = par ? std::min<int64_t>(m_tiles, 4 * nth) : 1;
  const int64_t tiles_per = ceil_div(m_tiles, n_tasks);
  uint32_t* Bp = t_bp.get<uint32_t>(static_cast<size_t>(kc / 2 * NR));  // the caller's: read by every task
  for (int64_t pc = 0; pc < K; pc += kc) {
    const int64_t kcur = std::min(kc, K - pc), kp = ceil_div(kcur, 2);
    const float beta_k = pc == 0 ? beta : 1.0f;
    bf16_k::pack_cols_avx512bf16(B + pc * ldb, ldb, static_cast<int>(N), kcur, NR, Bp);
    parallel_for(ceil_div(m_tiles, tiles_per), [&](int64_t task) {
      uint32_t* Ap = t_ap.get<uint32_t>(static_cast<size_t>(kp * MR));
      const int64_t t1 = std::min(m_tiles, (task + 1) * tiles_per);
      for (int64_t t = task * tiles_per; t < t1; ++t) {
        const int64_t i0 = t * MR;
        const int mr = static_cast<int>(std::min(MR, M - i0));
        bf16_k::pack_cols_avx512bf16(A + pc * lda + i0, lda, mr, kcur, MR, Ap);
        bf16_k::ukernel16_avx512bf16(kp, Ap, Bp, C + i0 * ldc, ldc, alpha, beta_k, mr, static_cast<int>(N));
      }
    });
  }
  return true;
#endif
}

}  // namespace qlora::cpu
