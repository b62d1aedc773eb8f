// Few-column bf16-compute GEMM driver (cpu/gemm_bf16_skinny.hpp). Per K block: the whole B
// (N <= 16 columns) is packed once into one [kp][16] bf16-pair panel shared by all threads; tasks
// take runs of 28-row tiles of op(A), pack each tile (the packers of gemm_bf16_avx512bf16.cpp)
// and run the 28x16 micro-kernel. Rounding is the blocked kernel's (RNE when packed), so results
// differ from it only in the fp32 summation order.
#include "cpu/gemm_bf16_skinny.hpp"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>

#include "cpu/gemm_bf16_kernels.hpp"
#include "cpu/gemm_bf16_skinny_kernels.hpp"
#include "cpu/threads.hpp"

namespace qlora::cpu {

namespace {
constexpr int64_t MR = bf16_k::kSkinnyMR, NR = kSkinnyMaxN;
constexpr int64_t kKCMax = 2048;  // k per block: a 28-row A tile (112 KiB) and B (64 KiB) stay in L2

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

struct Scratch {  // 64-byte aligned, grown on demand, one per thread
  void* p = nullptr;
  size_t n = 0;
  ~Scratch() { std::free(p); }
  uint32_t* get(size_t count) {
    const size_t bytes = static_cast<size_t>(round_up(static_cast<int64_t>(count * sizeof(uint32_t)), 64));
    if (bytes > n) {
      std::free(p);
      p = std::aligned_alloc(64, bytes);
      if (!p) {
        n = 0;
        throw std::bad_alloc();
      }
      n = bytes;
    }
    return static_cast<uint32_t*>(p);
  }
};
thread_local Scratch t_ap, t_bp;

// QLORA_GEMM_BF16_SKINNY=0: off (the blocked 14x32 kernel runs these shapes; A/B runs).
bool skinny_on() {
  static const bool on = [] {
    const char* e = std::getenv("QLORA_GEMM_BF16_SKINNY");
    return !(e && std::string(e) == "0");
  }();
  return on;
}
}  // namespace

bool gemm_bf16_skinny(SkinnyLayout layout, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                      const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
#ifndef QLORA_X86
  return false;
#else
  if (N > NR || N <= 0 || M <= 0 || K <= 0 || !skinny_on()) return false;
  const int64_t a_cols = layout == SkinnyLayout::TN ? M : K, b_cols = layout == SkinnyLayout::NT ? K : N;
  if (lda < a_cols || ldb < b_cols || ldc < N) return false;  // the caller's check raises
  const int64_t kc = std::min(round_up(K, 32), round_up(ceil_div(K, ceil_div(K, kKCMax)), 32));
  const int64_t m_tiles = ceil_div(M, MR);
  const int nth = num_threads();
  // Tasks: runs of tiles, a few per thread (dynamic claiming evens them out); one for small work.
  const int64_t n_tasks = nth > 1 && 2.0 * M * N * K > 2e6 ? std::min<int64_t>(m_tiles, 4 * nth) : 1;
  const int64_t tiles_per = ceil_div(m_tiles, n_tasks);
  uint32_t* Bp = t_bp.get(static_cast<size_t>(kc / 2 * NR));  // the caller's: read by every task
  for (int64_t pc = 0; pc < K; pc += kc) {
    const int64_t kcur = std::min(kc, K - pc), kp = ceil_div(kcur, 2);
    const float beta_k = pc == 0 ? beta : 1.0f;
    if (layout == SkinnyLayout::NT)
      bf16_k::pack_rows_avx512bf16(B + pc, ldb, static_cast<int>(N), kcur, NR, Bp);
    else
      bf16_k::pack_cols_avx512bf16(B + pc * ldb, ldb, static_cast<int>(N), kcur, NR, Bp);
    parallel_for(ceil_div(m_tiles, tiles_per), [&](int64_t task) {
      uint32_t* Ap = t_ap.get(static_cast<size_t>(kp * MR));
      const int64_t t1 = std::min(m_tiles, (task + 1) * tiles_per);
      for (int64_t t = task * tiles_per; t < t1; ++t) {
        const int64_t i0 = t * MR;
        const int mr = static_cast<int>(std::min(MR, M - i0));
        if (layout == SkinnyLayout::TN)
          bf16_k::pack_cols_avx512bf16(A + pc * lda + i0, lda, mr, kcur, MR, Ap);
        else
          bf16_k::pack_rows_avx512bf16(A + i0 * lda + pc, lda, mr, kcur, MR, Ap);
        bf16_k::ukernel16_avx512bf16(kp, Ap, Bp, C + i0 * ldc, ldc, alpha, beta_k, mr, static_cast<int>(N));
      }
    });
  }
  return true;
#endif
}

}  // namespace qlora::cpu
