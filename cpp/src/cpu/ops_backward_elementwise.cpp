// Gradients of the row-wise / element-wise ops: RMSNorm (w.r.t. x only), RoPE, SwiGLU.
#include <cmath>
#include <vector>

#include "cpu/ops_backward.hpp"
#include "cpu/ops_model.hpp"
#include "cpu/rowops_kernels.hpp"
#include "cpu/threads.hpp"

namespace qlora::cpu::ops {

namespace {
// Rows per task so that a task touches at least ~16K floats (as in ops_elementwise.cpp).
int64_t row_grain(int64_t cols) { return cols >= 16384 ? 1 : 16384 / (cols > 0 ? cols : 1); }
}  // namespace

// y = w ⊙ x r, r = (mean(x²) + eps)^-1/2:
// dx = r (w ⊙ dy) - x r³/D Σ_j w_j dy_j x_j.
void rmsnorm_backward(SimdLevel level, int64_t M, int64_t D, const float* x, const float* w, float eps, const float* dy,
                      float* dx) {
  const rowk::Kernels* kr = rowk::for_level(level);  // SIMD: the same double sums in 16 lanes
  parallel_range(M, row_grain(D), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float* xr = x + m * D;   // [D]
      const float* g = dy + m * D;   // [D]
      float* o = dx + m * D;         // [D] (may alias dy: every read of g[i] precedes the write of o[i])
      double ss = 0.0, dot = 0.0;    // double sums, as the forward's
      if (kr) kr->sumsq_dot(xr, w, g, D, &ss, &dot);
      else
        for (int64_t i = 0; i < D; ++i) {
          ss += static_cast<double>(xr[i]) * xr[i];
          dot += static_cast<double>(w[i]) * g[i] * xr[i];
        }
      // r exactly as the forward computes it (fp32 var from the double mean).
      const float var = static_cast<float>(ss / static_cast<double>(D));
      const float r = 1.0f / std::sqrt(var + eps);
      const float c = static_cast<float>(dot / static_cast<double>(D)) * r * r * r;
      for (int64_t i = 0; i < D; ++i) o[i] = r * (w[i] * g[i]) - c * xr[i];
    }
  });
}

// The forward maps (x1, x2) -> (x1 c - x2 s, x2 c + x1 s), an orthogonal rotation; its
// transpose (rotation by -angle) maps the output gradient to the input gradient.
void rope_backward(int64_t M, int64_t n_heads, int64_t head_dim, float* dx, int64_t ldx, const int32_t* pos,
                   const float* inv_freq) {
  rope_rotate(M, n_heads, head_dim, dx, ldx, pos, inv_freq, /*inverse=*/true);
}

// out = silu(g) u: dup = dout silu(g), dgate = dout u s(g) (1 + g (1 - s(g))).
void swiglu_backward(SimdLevel level, int64_t M, int64_t N, const float* gate, int64_t ldg, const float* up,
                     int64_t ldu, const float* dout, int64_t ldd, float* dgate, int64_t lddg, float* dup, int64_t lddu) {
  const rowk::Kernels* kr = rowk::for_level(level);  // SIMD exp (within 2 ulp), IEEE division
  parallel_range(M, row_grain(N), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float* g = gate + m * ldg;
      const float* u = up + m * ldu;
      const float* d = dout + m * ldd;
      float* dg = dgate + m * lddg;
      float* du = dup + m * lddu;
      if (kr) {
        kr->swiglu_bwd(N, g, u, d, dg, du);
        continue;
      }
      for (int64_t i = 0; i < N; ++i) {
        // All reads of element i happen before its writes, so outputs may alias inputs.
        const float gi = g[i], ui = u[i], di = d[i];
        const float s = 1.0f / (1.0f + std::exp(-gi));
        du[i] = di * (gi * s);
        dg[i] = di * ui * (s * (1.0f + gi * (1.0f - s)));
      }
    }
  });
}

}  // namespace qlora::cpu::ops
