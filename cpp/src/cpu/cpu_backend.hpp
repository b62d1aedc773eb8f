#pragma once
#include "backend.hpp"
#include "cpu/features.hpp"

namespace qlora::cpu {

class CpuBackend final : public Backend {
 public:
  // follow_active: use whatever active_simd_level() is at call time (the "cpu" backend).
  CpuBackend(SimdLevel level, bool follow_active);
  SimdLevel level() const;

  std::string name() const override;
  bool host_memory() const override { return true; }
  void* alloc(size_t bytes) override;
  void free(void* p) override;
  void upload(void* dst, const void* src_host, size_t bytes) override;
  void download(void* dst_host, const void* src, size_t bytes) override;
  void synchronize() override {}

  void gemm_nt(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda, const float* B,
               int64_t ldb, float beta, float* C, int64_t ldc) override;
  void gemm_nn(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda, const float* B,
               int64_t ldb, float beta, float* C, int64_t ldc) override;
  void gemm_tn(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda, const float* B,
               int64_t ldb, float beta, float* C, int64_t ldc) override;
  void nf4_gemm_nt(int64_t M, float alpha, const float* X, int64_t ldx, const Nf4Ref& W, float beta, float* Y,
                   int64_t ldy) override;
  void nf4_gemm_nn(int64_t M, float alpha, const float* dY, int64_t lddy, const Nf4Ref& W, float beta, float* dX,
                   int64_t lddx) override;
  void nf4_dequantize(const Nf4Ref& W, float* out) override;

 private:
  SimdLevel level_;
  bool follow_active_;
};

}  // namespace qlora::cpu
