// The CPU backend: host memory, kernels at one SIMD level.
#include "cpu/cpu_backend.hpp"

#include <cstdlib>
#include <cstring>
#include <new>

#include "cpu/gemm.hpp"
#include "nf4/nf4_codec.hpp"

namespace qlora::cpu {

namespace {
constexpr size_t kAlign = 64;
}

CpuBackend::CpuBackend(SimdLevel level, bool follow_active) : level_(level), follow_active_(follow_active) {}

SimdLevel CpuBackend::level() const { return follow_active_ ? active_simd_level() : level_; }

std::string CpuBackend::name() const {
  return follow_active_ ? std::string("cpu") : std::string("cpu:") + simd_level_name(level_);
}

void* CpuBackend::alloc(size_t bytes) {
  void* p = std::aligned_alloc(kAlign, ((bytes + kAlign - 1) / kAlign) * kAlign);
  if (!p && bytes) throw std::bad_alloc();
  return p;
}
void CpuBackend::free(void* p) { std::free(p); }
void CpuBackend::upload(void* dst, const void* src, size_t bytes) { std::memcpy(dst, src, bytes); }
void CpuBackend::download(void* dst, const void* src, size_t bytes) { std::memcpy(dst, src, bytes); }

void CpuBackend::gemm_nt(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                         const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  cpu::gemm_nt(level(), M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}
void CpuBackend::gemm_nn(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                         const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  cpu::gemm_nn(level(), M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}
void CpuBackend::gemm_tn(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                         const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  cpu::gemm_tn(level(), M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}
void CpuBackend::nf4_gemm_nt(int64_t M, float alpha, const float* X, int64_t ldx, const Nf4Ref& W, float beta,
                             float* Y, int64_t ldy) {
  cpu::nf4_gemm_nt(level(), M, alpha, X, ldx, W, beta, Y, ldy);
}
void CpuBackend::nf4_gemm_nn(int64_t M, float alpha, const float* dY, int64_t lddy, const Nf4Ref& W, float beta,
                             float* dX, int64_t lddx) {
  cpu::nf4_gemm_nn(level(), M, alpha, dY, lddy, W, beta, dX, lddx);
}
void CpuBackend::nf4_dequantize(const Nf4Ref& W, float* out) { nf4::dequantize(level(), W, out); }

}  // namespace qlora::cpu
