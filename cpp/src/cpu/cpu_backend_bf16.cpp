// CpuBackend's bf16-compute GEMMs (backend.hpp, cpu/gemm_bf16.hpp), kept apart from
// cpu_backend.cpp. Times go to the same profile parts as the fp32 ops, under op names with "_bf16".
#include <cstdint>

#include "cpu/cpu_backend.hpp"
#include "cpu/gemm_bf16.hpp"

#if __has_include("cpu/profile.hpp")
#include "cpu/profile.hpp"
#define QLORA_BF16_SCOPE(part, op, flops, bytes, a, b, c) \
  prof::Scope bf16_scope_(prof::Part::part, op, flops, bytes, a, b, c)
#else
#define QLORA_BF16_SCOPE(part, op, flops, bytes, a, b, c) (void)0
#endif

namespace qlora::cpu {

namespace {
double d(int64_t v) { return static_cast<double>(v); }
double gemm_bytes(int64_t M, int64_t N, int64_t K) { return 2.0 * (d(M) * d(K) + d(N) * d(K)) + 4.0 * d(M) * d(N); }
double nf4_bytes(int64_t M, const Nf4Ref& W) { return d(W.rows) * d(W.cols) / 2 + 4.0 * d(M) * (d(W.rows) + d(W.cols)); }
}  // namespace

bool CpuBackend::has_bf16_compute() const { return bf16_compute_available(level()); }

void CpuBackend::gemm_nt_bf16(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                              const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  QLORA_BF16_SCOPE(GemmOther, "gemm_nt_bf16", 2 * d(M) * d(N) * d(K), gemm_bytes(M, N, K), M, N, K);
  cpu::gemm_nt_bf16(level(), M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}
void CpuBackend::gemm_nn_bf16(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                              const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  QLORA_BF16_SCOPE(GemmOther, "gemm_nn_bf16", 2 * d(M) * d(N) * d(K), gemm_bytes(M, N, K), M, N, K);
  cpu::gemm_nn_bf16(level(), M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}
void CpuBackend::gemm_tn_bf16(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                              const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  QLORA_BF16_SCOPE(GemmOther, "gemm_tn_bf16", 2 * d(M) * d(N) * d(K), gemm_bytes(M, N, K), M, N, K);
  cpu::gemm_tn_bf16(level(), M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}
void CpuBackend::nf4_gemm_nt_bf16(int64_t M, float alpha, const float* X, int64_t ldx, const Nf4Ref& W, float beta,
                                  float* Y, int64_t ldy) {
  QLORA_BF16_SCOPE(Nf4Fwd, "nf4_gemm_nt_bf16", 2 * d(M) * d(W.rows) * d(W.cols), nf4_bytes(M, W), M, W.rows, W.cols);
  cpu::nf4_gemm_nt_bf16(level(), M, alpha, X, ldx, W, beta, Y, ldy);
}
void CpuBackend::nf4_gemm_nn_bf16(int64_t M, float alpha, const float* dY, int64_t lddy, const Nf4Ref& W, float beta,
                                  float* dX, int64_t lddx) {
  QLORA_BF16_SCOPE(Nf4Bwd, "nf4_gemm_nn_bf16", 2 * d(M) * d(W.rows) * d(W.cols), nf4_bytes(M, W), M, W.cols, W.rows);
  cpu::nf4_gemm_nn_bf16(level(), M, alpha, dY, lddy, W, beta, dX, lddx);
}

}  // namespace qlora::cpu
