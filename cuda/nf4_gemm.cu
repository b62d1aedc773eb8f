// Tiled NF4 GEMM: tile_gemm.cuh's kernel with an Nf4Src as B (dequantized per element on load).
#include "cuda_check.hpp"
#include "nf4_gemm.cuh"
#include "tile_gemm.cuh"

namespace qlora::cuda {

void nf4_gemm_nt_tiled(cudaStream_t stream, int sm_count, int64_t M, float alpha, const float* X, int64_t ldx,
                       const Nf4Ref& W, float beta, float* Y, int64_t ldy) {
  // C = Y [M, rows]: a(m,k) = X[m, k], b(n,k) = W[n, k]; the reduction runs over W.cols.
  tile::Nf4Src<true> b{make_nf4_dev(W), nullptr};
  tile::launch(stream, sm_count, M, W.rows, W.cols, alpha, tile::F32Src<true>{X, ldx}, b, beta, Y, ldy);
  QLORA_CUDA_CHECK_LAUNCH("nf4_gemm_nt");
}

void nf4_gemm_nn_tiled(cudaStream_t stream, int sm_count, int64_t M, float alpha, const float* dY, int64_t lddy,
                       const Nf4Ref& W, float beta, float* dX, int64_t lddx) {
  // C = dX [M, cols]: a(m,k) = dY[m, k], b(n,k) = W[k, n]; the reduction runs over W.rows.
  tile::Nf4Src<false> b{make_nf4_dev(W), nullptr};
  tile::launch(stream, sm_count, M, W.cols, W.rows, alpha, tile::F32Src<true>{dY, lddy}, b, beta, dX, lddx);
  QLORA_CUDA_CHECK_LAUNCH("nf4_gemm_nn");
}

}  // namespace qlora::cuda
