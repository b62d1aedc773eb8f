// Row-wise and element-wise transformer ops: embedding gather, RMSNorm, residual add, bias, SwiGLU.
#include <cmath>
#include <cstring>

#include "cpu/ops_model.hpp"
#include "cpu/rowops_kernels.hpp"
#include "cpu/swiglu_kernels.hpp"
#include "cpu/threads.hpp"

namespace qlora::cpu::ops {

namespace {
// Rows per task so that a task touches at least ~16K floats (thread hand-off is not free).
int64_t row_grain(int64_t cols) { return cols >= 16384 ? 1 : 16384 / (cols > 0 ? cols : 1); }
}  // namespace

void embedding(int64_t M, int64_t D, const float* table, const int32_t* ids, float* out) {
  parallel_range(M, row_grain(D), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      std::memcpy(out + m * D, table + static_cast<int64_t>(ids[m]) * D, sizeof(float) * D);
  });
}

void rmsnorm(SimdLevel level, int64_t M, int64_t D, const float* x, const float* w, float eps, float* out) {
  const rowk::Kernels* kr = rowk::for_level(level);  // SIMD: the same double sum in 16 lanes
  parallel_range(M, row_grain(D), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float* xr = x + m * D;
      float* o = out + m * D;
      // transformers: mean of squares in fp32, x * rsqrt(var + eps), then weight * that.
      // Double accumulation keeps the sum at least as accurate as torch's pairwise fp32 sum.
      double ss = 0.0;
      if (kr) ss = kr->sumsq(xr, D);
      else
        for (int64_t i = 0; i < D; ++i) ss += static_cast<double>(xr[i]) * xr[i];
      const float var = static_cast<float>(ss / static_cast<double>(D));
      const float r = 1.0f / std::sqrt(var + eps);
      for (int64_t i = 0; i < D; ++i) o[i] = w[i] * (xr[i] * r);
    }
  });
}

void add_inplace(int64_t n, const float* x, float* y) {
  parallel_range(n, 1 << 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) y[i] += x[i];
  });
}

void add_bias(int64_t M, int64_t N, const float* bias, float* y, int64_t ldy) {
  parallel_range(M, row_grain(N), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      float* yr = y + m * ldy;
      for (int64_t i = 0; i < N; ++i) yr[i] += bias[i];
    }
  });
}

void swiglu(SimdLevel level, int64_t M, int64_t N, const float* gate, int64_t ldg, const float* up, int64_t ldu,
            float* out, int64_t ldo) {
#if defined(QLORA_X86)
  if (level >= SimdLevel::AVX2) {
    const auto rows = level == SimdLevel::AVX512 ? swiglu_k::rows_avx512 : swiglu_k::rows_avx2;
    parallel_range(M, row_grain(N), [&](int64_t m0, int64_t m1) { rows(m0, m1, N, gate, ldg, up, ldu, out, ldo); });
    return;
  }
#endif
  parallel_range(M, row_grain(N), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float* g = gate + m * ldg;
      const float* u = up + m * ldu;
      float* o = out + m * ldo;
      for (int64_t i = 0; i < N; ++i) o[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
    }
  });
}

}  // namespace qlora::cpu::ops
