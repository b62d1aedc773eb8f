// Placeholder until the optimized kernels land (the GEMM work replaces this file):
// every level runs the scalar reference.
#include "cpu/gemm.hpp"
#include "cpu/gemm_scalar.hpp"

namespace qlora::cpu {
void gemm_nt(SimdLevel, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) { scalar::gemm_nt(M, N, K, alpha, A, lda, B, ldb, beta, C, ldc); }
void gemm_nn(SimdLevel, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) { scalar::gemm_nn(M, N, K, alpha, A, lda, B, ldb, beta, C, ldc); }
void gemm_tn(SimdLevel, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) { scalar::gemm_tn(M, N, K, alpha, A, lda, B, ldb, beta, C, ldc); }
void nf4_gemm_nt(SimdLevel, int64_t M, float alpha, const float* X, int64_t ldx, const Nf4Ref& W, float beta, float* Y, int64_t ldy) { scalar::nf4_gemm_nt(M, alpha, X, ldx, W, beta, Y, ldy); }
void nf4_gemm_nn(SimdLevel, int64_t M, float alpha, const float* dY, int64_t lddy, const Nf4Ref& W, float beta, float* dX, int64_t lddx) { scalar::nf4_gemm_nn(M, alpha, dY, lddy, W, beta, dX, lddx); }
}  // namespace qlora::cpu
