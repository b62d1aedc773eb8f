// fp32 GEMM: the tiled kernel of tile_gemm.cuh with fp32 sources.
#include "cuda_check.hpp"
#include "gemm.cuh"
#include "tile_gemm.cuh"

namespace qlora::cuda {

bool gemm_f32_fits(int64_t M, int64_t N) { return tile::grid_ok(M, N); }

void gemm_f32(cudaStream_t stream, int sm_count, GemmLayout layout, int64_t M, int64_t N, int64_t K, float alpha,
              const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  using tile::F32Src;
  switch (layout) {
    case GemmLayout::NT:  // a(m,k) = A[m*lda + k], b(n,k) = B[n*ldb + k]
      tile::launch(stream, sm_count, M, N, K, alpha, F32Src<true>{A, lda}, F32Src<true>{B, ldb}, beta, C, ldc);
      break;
    case GemmLayout::NN:  // a(m,k) = A[m*lda + k], b(n,k) = B[k*ldb + n]
      tile::launch(stream, sm_count, M, N, K, alpha, F32Src<true>{A, lda}, F32Src<false>{B, ldb}, beta, C, ldc);
      break;
    case GemmLayout::TN:  // a(m,k) = A[k*lda + m], b(n,k) = B[k*ldb + n]
      tile::launch(stream, sm_count, M, N, K, alpha, F32Src<false>{A, lda}, F32Src<false>{B, ldb}, beta, C, ldc);
      break;
  }
  QLORA_CUDA_CHECK_LAUNCH("gemm");
}

}  // namespace qlora::cuda
