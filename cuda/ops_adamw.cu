// AdamW: a grid-stride loop, one element per thread per step. The scalars arrive as kernel
// arguments (formed on the host in double and rounded once, as on the CPU).
#include "cuda_check.hpp"
#include "ieee_ops.cuh"
#include "ops_adamw.cuh"
#include "ops_common.cuh"

namespace qlora::cuda {
namespace {

struct Scalars {
  float decay, w1, b2, w2, bc2s, eps, ns;
};

__global__ void adamw_kernel(int64_t n, float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m,
                             float* __restrict__ v, Scalars s) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float gi = g[i], m0 = m[i], v0 = v[i];
    // train::adamw_update, term by term:
    const float mi = ieee_add(m0, ieee_mul(s.w1, ieee_sub(gi, m0)));             // m + w1 * (g - m)
    const float vi = ieee_add(ieee_mul(v0, s.b2), ieee_mul(ieee_mul(s.w2, gi), gi));  // v*b2 + w2*g*g
    const float denom = ieee_add(ieee_div(ieee_sqrt(vi), s.bc2s), s.eps);         // sqrt(v)/bc2s + eps
    m[i] = mi;
    v[i] = vi;
    p[i] = ieee_add(ieee_mul(p[i], s.decay), ieee_div(ieee_mul(s.ns, mi), denom));  // p*decay + ns*m/denom
  }
}

}  // namespace

void adamw_update(cudaStream_t stream, int64_t n, float* p, const float* g, float* m, float* v,
                  const train::AdamWScalars& s) {
  if (n <= 0) return;
  // As the CPU loop: without weight decay the factor is 1 (x * 1 is exact).
  const Scalars k{s.apply_decay ? s.decay : 1.0f, s.one_minus_b1, s.beta2, s.one_minus_b2, s.bc2_sqrt, s.eps, s.neg_step};
  adamw_kernel<<<grid_for(n), kOpThreads, 0, stream>>>(n, p, g, m, v, k);
  QLORA_CUDA_CHECK_LAUNCH("adamw_update");
}

}  // namespace qlora::cuda
