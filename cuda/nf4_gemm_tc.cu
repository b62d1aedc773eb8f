// bf16 tensor-core NF4 GEMM (Backend::nf4_gemm_nt_bf16 / nf4_gemm_nn_bf16): mma_tile.cuh's kernel
// with W decoded from NF4 in its dequant stage (absmax and the double-quant map folded in), so W
// never exists in memory in any wider type. Y = X·Wᵀ with cols % 8 == 0 and 4-byte aligned packed
// data (every real model) takes the packed-word loader (Nf4RowSrc); other shapes and dX = dY·W
// decode element by element in the load stage (ElemSrc over tile::Nf4Src).
#include "cuda_check.hpp"
#include "gemm_tc.cuh"
#include "mma_tile.cuh"

namespace qlora::cuda {

namespace {
template <class BSrc>
void launch_x(cudaStream_t stream, int sm_count, int64_t M, int64_t N, int64_t K, float alpha, const float* X,
              int64_t ldx, BSrc b, float beta, float* Y, int64_t ldy) {
  if (mma::f32_vec_ok(X, ldx, K))
    mma::launch(stream, sm_count, M, N, K, alpha, mma::F32VecSrc{X, ldx}, b, beta, Y, ldy);
  else
    mma::launch(stream, sm_count, M, N, K, alpha, mma::ElemSrc<tile::F32Src<true>>{{X, ldx}}, b, beta, Y, ldy);
}
}  // namespace

void nf4_gemm_nt_bf16_tc(cudaStream_t stream, int sm_count, int64_t M, float alpha, const float* X, int64_t ldx,
                         const Nf4Ref& W, float beta, float* Y, int64_t ldy) {
  // C = Y [M, rows]: b(n, k) = W[n, k], the reduction runs over W.cols.
  const Nf4Dev w = make_nf4_dev(W);
  if (W.cols % 8 == 0 && (reinterpret_cast<uintptr_t>(W.packed) & 3u) == 0)
    launch_x(stream, sm_count, M, W.rows, W.cols, alpha, X, ldx, mma::Nf4RowSrc{w, nullptr}, beta, Y, ldy);
  else
    launch_x(stream, sm_count, M, W.rows, W.cols, alpha, X, ldx, mma::ElemSrc<tile::Nf4Src<true>>{{w, nullptr}},
             beta, Y, ldy);
  QLORA_CUDA_CHECK_LAUNCH("nf4_gemm_nt_bf16");
}

void nf4_gemm_nn_bf16_tc(cudaStream_t stream, int sm_count, int64_t M, float alpha, const float* dY, int64_t lddy,
                         const Nf4Ref& W, float beta, float* dX, int64_t lddx) {
  // C = dX [M, cols]: b(n, k) = W[k, n], the reduction runs over W.rows.
  launch_x(stream, sm_count, M, W.cols, W.rows, alpha, dY, lddy, mma::ElemSrc<tile::Nf4Src<false>>{{make_nf4_dev(W), nullptr}},
           beta, dX, lddx);
  QLORA_CUDA_CHECK_LAUNCH("nf4_gemm_nn_bf16");
}

}  // namespace qlora::cuda
