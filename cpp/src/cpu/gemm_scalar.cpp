#include "cpu/gemm_scalar.hpp"

namespace qlora::cpu::scalar {

namespace {
// beta == 0 must not read C (it may hold garbage or NaN), as in BLAS.
inline void store(float* c, double acc, float alpha, float beta) {
  *c = beta == 0.0f ? static_cast<float>(alpha * acc) : static_cast<float>(alpha * acc + beta * static_cast<double>(*c));
}
}  // namespace

void gemm_nt(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda, const float* B,
             int64_t ldb, float beta, float* C, int64_t ldc) {
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      double acc = 0.0;
      for (int64_t k = 0; k < K; ++k) acc += static_cast<double>(A[i * lda + k]) * B[j * ldb + k];
      store(&C[i * ldc + j], acc, alpha, beta);
    }
}

void gemm_nn(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda, const float* B,
             int64_t ldb, float beta, float* C, int64_t ldc) {
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      double acc = 0.0;
      for (int64_t k = 0; k < K; ++k) acc += static_cast<double>(A[i * lda + k]) * B[k * ldb + j];
      store(&C[i * ldc + j], acc, alpha, beta);
    }
}

void gemm_tn(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda, const float* B,
             int64_t ldb, float beta, float* C, int64_t ldc) {
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      double acc = 0.0;
      for (int64_t k = 0; k < K; ++k) acc += static_cast<double>(A[k * lda + i]) * B[k * ldb + j];
      store(&C[i * ldc + j], acc, alpha, beta);
    }
}

float nf4_block_absmax(const Nf4Ref& W, int64_t b) {
  if (!W.double_quant) return static_cast<const float*>(W.absmax)[b];
  uint8_t code = static_cast<const uint8_t*>(W.absmax)[b];
  return W.nested_map[code] * W.nested_absmax[b / 256] + W.offset;
}

float nf4_element(const Nf4Ref& W, int64_t j) {
  uint8_t byte = W.packed[j / 2];
  uint8_t q = (j % 2 == 0) ? (byte >> 4) : (byte & 0x0F);
  return kNf4Codes[q] * nf4_block_absmax(W, j / W.blocksize);
}

void nf4_gemm_nt(int64_t M, float alpha, const float* X, int64_t ldx, const Nf4Ref& W, float beta, float* Y,
                 int64_t ldy) {
  const int64_t N = W.rows, K = W.cols;
  for (int64_t i = 0; i < M; ++i)
    for (int64_t n = 0; n < N; ++n) {
      double acc = 0.0;
      for (int64_t k = 0; k < K; ++k) acc += static_cast<double>(X[i * ldx + k]) * nf4_element(W, n * K + k);
      store(&Y[i * ldy + n], acc, alpha, beta);
    }
}

void nf4_gemm_nn(int64_t M, float alpha, const float* dY, int64_t lddy, const Nf4Ref& W, float beta, float* dX,
                 int64_t lddx) {
  const int64_t N = W.rows, K = W.cols;  // dX[M, K] = dY[M, N] · W[N, K]
  for (int64_t i = 0; i < M; ++i)
    for (int64_t k = 0; k < K; ++k) {
      double acc = 0.0;
      for (int64_t n = 0; n < N; ++n) acc += static_cast<double>(dY[i * lddy + n]) * nf4_element(W, n * K + k);
      store(&dX[i * lddx + k], acc, alpha, beta);
    }
}

}  // namespace qlora::cpu::scalar
