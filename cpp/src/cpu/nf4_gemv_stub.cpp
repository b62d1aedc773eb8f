// Placeholder until the GEMV kernels land (the GEMV work replaces this file).
#include "cpu/gemm_scalar.hpp"
#include "cpu/nf4_gemv.hpp"

namespace qlora::cpu {
void nf4_gemv_nt(SimdLevel, int64_t M, float alpha, const float* X, int64_t ldx, const Nf4Ref& W, float beta, float* Y,
                 int64_t ldy) {
  scalar::nf4_gemm_nt(M, alpha, X, ldx, W, beta, Y, ldy);
}
}  // namespace qlora::cpu
