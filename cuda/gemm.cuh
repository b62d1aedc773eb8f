// fp32 GEMM launchers (host declarations; kernels in gemm.cu). Pointers are device memory; the
// semantics are those of Backend::gemm_nt / gemm_nn / gemm_tn (backend.hpp). Callers validate the
// arguments; M, N >= 1, K >= 0. Asynchronous on `stream`.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace qlora::cuda {

enum class GemmLayout {
  NT,  // C[M,N] = A[M,K] · B[N,K]ᵀ
  NN,  // C[M,N] = A[M,K] · B[K,N]
  TN,  // C[M,N] = A[K,M]ᵀ · B[K,N]
};

// False when M or N is too large for one launch's grid.
bool gemm_f32_fits(int64_t M, int64_t N);

void gemm_f32(cudaStream_t stream, int sm_count, GemmLayout layout, int64_t M, int64_t N, int64_t K, float alpha,
              const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc);

}  // namespace qlora::cuda
