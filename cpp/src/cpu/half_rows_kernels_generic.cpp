// Portable GEMV over 16-bit rows (baseline ISA, compiler-vectorized): the fallback for non-x86
// builds and the "generic" level.
#include "cpu/half_rows.hpp"
#include "cpu/half_rows_kernels.hpp"

namespace qlora::cpu {

void half_gemv_generic(int bf16, int64_t M, int64_t n0, int64_t n1, int64_t K, const float* X, int64_t ldx,
                       const uint16_t* W, float* Y, int64_t ldy) {
  constexpr int L = 8;  // independent partial sums per row of X (one vector's worth)
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* row = W + n * K;
    float acc[4][L] = {};  // M <= 4
    for (int64_t k0 = 0; k0 < K; k0 += L) {
      const int len = K - k0 < L ? static_cast<int>(K - k0) : L;
      float w[L] = {};  // this step's weights widened (zeros beyond K)
      for (int l = 0; l < len; ++l) w[l] = half_to_f32(bf16 != 0, row[k0 + l]);
      for (int64_t m = 0; m < M; ++m) {
        const float* x = X + m * ldx + k0;
        for (int l = 0; l < len; ++l) acc[m][l] += x[l] * w[l];
      }
    }
    for (int64_t m = 0; m < M; ++m) {
      float s = 0.0f;
      for (int l = 0; l < L; ++l) s += acc[m][l];
      Y[m * ldy + n] = s;
    }
  }
}

}  // namespace qlora::cpu
