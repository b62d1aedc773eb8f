// bf16 tensor-core GEMM on fp32 operands (Backend::gemm_nt_bf16 / gemm_nn_bf16 / gemm_tn_bf16:
// fp32 weights, LoRA factors): mma_tile.cuh's kernel with fp32 sources rounded to bf16 as they
// are stored into shared memory. k-contiguous operands with 16-byte alignment take the float4
// loader, everything else the element loader.
#include "cuda_check.hpp"
#include "gemm_tc.cuh"
#include "mma_tile.cuh"

namespace qlora::cuda {

namespace {
using mma::ElemSrc;
using mma::F32VecSrc;
using KSrc = ElemSrc<tile::F32Src<true>>;   // element (r, k) at p[r*ld + k]
using RSrc = ElemSrc<tile::F32Src<false>>;  // element (r, k) at p[k*ld + r]

// a(m, k) k-contiguous: float4 loader when aligned; then launch with b.
template <class BSrc>
void launch_a_kcontig(cudaStream_t stream, int sm_count, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                      int64_t lda, BSrc b, float beta, float* C, int64_t ldc) {
  if (mma::f32_vec_ok(A, lda, K))
    mma::launch(stream, sm_count, M, N, K, alpha, F32VecSrc{A, lda}, b, beta, C, ldc);
  else
    mma::launch(stream, sm_count, M, N, K, alpha, KSrc{{A, lda}}, b, beta, C, ldc);
}
}  // namespace

bool gemm_bf16_tc_fits(int64_t M, int64_t N) { return mma::grid_ok(M, N); }

void gemm_bf16_tc(cudaStream_t stream, int sm_count, GemmLayout layout, int64_t M, int64_t N, int64_t K, float alpha,
                  const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  switch (layout) {
    case GemmLayout::NT:  // a(m,k) = A[m*lda + k], b(n,k) = B[n*ldb + k]
      if (mma::f32_vec_ok(B, ldb, K))
        launch_a_kcontig(stream, sm_count, M, N, K, alpha, A, lda, F32VecSrc{B, ldb}, beta, C, ldc);
      else
        launch_a_kcontig(stream, sm_count, M, N, K, alpha, A, lda, KSrc{{B, ldb}}, beta, C, ldc);
      break;
    case GemmLayout::NN:  // a(m,k) = A[m*lda + k], b(n,k) = B[k*ldb + n]
      launch_a_kcontig(stream, sm_count, M, N, K, alpha, A, lda, RSrc{{B, ldb}}, beta, C, ldc);
      break;
    case GemmLayout::TN:  // a(m,k) = A[k*lda + m], b(n,k) = B[k*ldb + n]
      mma::launch(stream, sm_count, M, N, K, alpha, RSrc{{A, lda}}, RSrc{{B, ldb}}, beta, C, ldc);
      break;
  }
  QLORA_CUDA_CHECK_LAUNCH("gemm_bf16");
}

}  // namespace qlora::cuda
