// Portable expand kernel of the multi-adapter LoRA op (see lora_sgmv_kernels.hpp). A [16 x r]
// block of B is transposed into a local tile so the inner loop runs along 16 output columns
// (which the compiler vectorizes for the baseline ISA) with the accumulators in registers.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/lora_sgmv_kernels.hpp"

namespace qlora::cpu::sgmv_detail {

void expand_generic(int64_t M, int64_t n0, int64_t n1, int64_t r, float alpha, const float* t, int64_t ldt,
                    const float* B, int64_t ldb, float* y, int64_t ldy) {
  constexpr int NB = 16;
  thread_local std::vector<float> tile;
  if (tile.size() < static_cast<size_t>(r * NB)) tile.resize(static_cast<size_t>(r * NB));
  float* bt = tile.data();  // bt[j * NB + i] = B[n + i, j]
  for (int64_t n = n0; n < n1; n += NB) {
    const int nn = static_cast<int>(std::min<int64_t>(NB, n1 - n));
    if (nn < NB) std::fill(bt, bt + r * NB, 0.0f);
    for (int i = 0; i < nn; ++i) {
      const float* b = B + (n + i) * ldb;
      for (int64_t j = 0; j < r; ++j) bt[j * NB + i] = b[j];
    }
    for (int64_t m = 0; m < M; ++m) {
      const float* tm = t + m * ldt;
      float acc[NB] = {};
      for (int64_t j = 0; j < r; ++j) {
        const float tv = tm[j];
        const float* b = bt + j * NB;
        for (int i = 0; i < NB; ++i) acc[i] += tv * b[i];
      }
      float* ym = y + m * ldy + n;
      for (int i = 0; i < nn; ++i) ym[i] += alpha * acc[i];
    }
  }
}

}  // namespace qlora::cpu::sgmv_detail
