// CPU GEMM kernels (fp32 and fused NF4), one entry per layout, dispatched on a SIMD level.
// Semantics are those of the matching Backend methods in backend.hpp.
#pragma once
#include <cstdint>

#include "cpu/cache_info.hpp"
#include "cpu/features.hpp"
#include "tensor_types.hpp"

namespace qlora::cpu {

// Cache blocking of the packed GEMM driver: KC (depth), MC (rows of the A block), NC (columns of
// the B block); upper bounds, the driver balances the actual sizes.
struct GemmBlocking {
  int64_t kc = 0, mc = 0, nc = 0;
};
// Derived from cache sizes for a micro-tile MR x NR; l2_panel: the B micro-panel streams from L2
// (the AVX-512 kernel) rather than living in L1. Rules in gemm.cpp.
GemmBlocking gemm_blocking(int mr, int nr, bool l2_panel, const CacheSizes& caches);
GemmBlocking gemm_blocking_in_use(SimdLevel level);  // what the kernels of `level` run with here

// The fp32 micro-kernel and packers of the blocked driver at `level` (not Scalar), for callers that
// pack an operand once and reuse it over many small products (the training attention). Per output
// element the micro-kernel runs the same FMA chain over a depth block as gemm_nt / gemm_nn / gemm_tn
// of that level, so a caller that splits the depth at gemm_depth_block(level, K) gets their results
// bit for bit. Layouts: cpu/gemm_kernels.hpp (A panel [kc][MR], B panel [kc][NR], zero-padded).
struct GemmPanels {
  int mr = 0, nr = 0;
  // C[mr, nr] (ld ldc) = alpha * Ap·Bp + beta * C over kc; beta == 0 never reads C.
  void (*ukernel)(int64_t kc, const float* Ap, const float* Bp, float* C, int64_t ldc, float alpha, float beta, int mr,
                  int nr) = nullptr;
  void (*pack_b_t)(const float* B, int64_t ldb, int nr, int64_t kc, float* Bp) = nullptr;  // Bp[k][j] = B[j * ldb + k]
  void (*pack_b_n)(const float* B, int64_t ldb, int nr, int64_t kc, float* Bp) = nullptr;  // Bp[k][j] = B[k * ldb + j]
  const void* kern = nullptr;  // the level's kernel table (pack_a_rows / pack_a_cols)
  // Ap[k][i] = A[i * lda + k] (rows of a row-major A), and Ap[k][i] = A[k * lda + i] (its columns).
  void pack_a_rows(const float* A, int64_t lda, int mr, int64_t kc, float* Ap) const;
  void pack_a_cols(const float* A, int64_t lda, int mr, int64_t kc, float* Ap) const;
};
const GemmPanels& gemm_panels(SimdLevel level);
// The depth block the blocked driver of `level` uses for a depth of K (balanced blocks).
int64_t gemm_depth_block(SimdLevel level, int64_t K);

void gemm_nt(SimdLevel level, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
             const float* B, int64_t ldb, float beta, float* C, int64_t ldc);
void gemm_nn(SimdLevel level, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
             const float* B, int64_t ldb, float beta, float* C, int64_t ldc);
void gemm_tn(SimdLevel level, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
             const float* B, int64_t ldb, float beta, float* C, int64_t ldc);

// C[M, N] = alpha * A[M, K] · B[K, N] + beta * C with B's [kc, NR] panels made by the caller (fused
// decoders of other formats: cpu/q8_0_head.cpp): pack(ctx, j0, nr, p0, kc, Bp) writes
// Bp[k * NR + j] = B[p0 + k, j0 + j] for k < kc, j < nr and 0 for nr <= j < NR (NR: gemm_panels(level).nr).
// The blocked driver with A read as gemm_nt / gemm_nn read it: the bits of gemm_nn over that B, and
// of gemm_nt over Bᵀ where it takes the blocked route (M > kGemvF32MaxM). level != Scalar.
struct GemmPackB {
  void (*fn)(const void* ctx, int64_t j0, int nr, int64_t p0, int64_t kc, float* Bp) = nullptr;
  const void* ctx = nullptr;
};
void gemm_packed_b(SimdLevel level, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                   const GemmPackB& pack, float beta, float* C, int64_t ldc);

void nf4_gemm_nt(SimdLevel level, int64_t M, float alpha, const float* X, int64_t ldx, const Nf4Ref& W,
                 float beta, float* Y, int64_t ldy);
// Y_i = X · deq(W_i)ᵀ for n weights sharing X (same cols): one GEMV job for small M, else one
// nf4_gemm_nt per weight.
void nf4_gemm_nt_many(SimdLevel level, int64_t M, const float* X, int64_t ldx, int64_t n, const Nf4Ref* const* W,
                      float* const* Y, const int64_t* ldy);
void nf4_gemm_nn(SimdLevel level, int64_t M, float alpha, const float* dY, int64_t lddy, const Nf4Ref& W,
                 float beta, float* dX, int64_t lddx);

}  // namespace qlora::cpu
