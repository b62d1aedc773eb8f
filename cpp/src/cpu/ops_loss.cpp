// Softmax cross-entropy: the CPU per-row kernel (Backend::cross_entropy_rows; the chunked loss
// through the lm_head that drives it is model/lm_loss.cpp).
#include <algorithm>
#include <cmath>
#include <limits>

#include "cpu/ops_backward.hpp"
#include "cpu/rowops_kernels.hpp"
#include "cpu/threads.hpp"

namespace qlora::cpu::ops {

void cross_entropy_rows(SimdLevel level, int64_t M, int64_t V, float* logits, int64_t ldl, const int32_t* labels,
                        float grad_scale, bool want_grad, float* loss) {
  // SIMD levels: vector max, exp within 2 ulp, the sum still in double (a float sum of V = 49152
  // terms could be off by ~V/64 eps, more than the test's log(V)-scaled bound allows).
  const rowk::Kernels* kr = rowk::for_level(level);
  parallel_range(M, 1, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      float* row = logits + m * ldl;  // [V]
      const int32_t y = labels[m];
      if (y == -100) {
        loss[m] = 0.0f;
        if (want_grad) std::fill(row, row + V, 0.0f);
        continue;
      }
      if (kr) {
        const float mx = kr->max(row, V);
        const double lse = static_cast<double>(mx) + std::log(kr->exp_sum_ro(row, V, mx));
        loss[m] = static_cast<float>(lse - static_cast<double>(row[y]));
        if (want_grad) {
          kr->exp_scale(row, V, static_cast<float>(lse), grad_scale);
          row[y] -= grad_scale;
        }
        continue;
      }
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t i = 0; i < V; ++i) mx = std::max(mx, row[i]);
      double sum = 0.0;
      for (int64_t i = 0; i < V; ++i) sum += std::exp(row[i] - mx);
      const double lse = static_cast<double>(mx) + std::log(sum);
      loss[m] = static_cast<float>(lse - static_cast<double>(row[y]));
      if (want_grad) {
        const float l = static_cast<float>(lse);
        for (int64_t i = 0; i < V; ++i) row[i] = grad_scale * std::exp(row[i] - l);
        row[y] -= grad_scale;
      }
    }
  });
}

}  // namespace qlora::cpu::ops
