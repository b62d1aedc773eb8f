// NF4 GEMV for small M (decode): streams the packed weight once, decoding nibbles in registers.
#pragma once
#include <cstdint>

#include "cpu/features.hpp"
#include "tensor_types.hpp"

namespace qlora::cpu {

// Largest M of one GEMV call; nf4_gemm_nt routes M <= 2 * this here in row groups. The AVX-512
// kernel streams W once for up to 8 rows; AVX2 and generic run groups of 4 (register budget).
constexpr int64_t kNf4GemvMaxM = 8;

// Y[M, W.rows] = alpha * X[M, W.cols] · deq(W)ᵀ + beta * Y, for 1 <= M <= kNf4GemvMaxM.
void nf4_gemv_nt(SimdLevel level, int64_t M, float alpha, const float* X, int64_t ldx, const Nf4Ref& W, float beta,
                 float* Y, int64_t ldy);

// Y_i[M, W_i->rows] = X[M, K] · deq(W_i)ᵀ for n weights with the same K (q/k/v, or gate/up, of
// a layer): one regroup of X and one thread-pool job for all of them; each output row is computed
// exactly as nf4_gemv_nt computes it.
void nf4_gemv_nt_many(SimdLevel level, int64_t M, const float* X, int64_t ldx, int64_t n, const Nf4Ref* const* W,
                      float* const* Y, const int64_t* ldy);

// Work riding nf4_gemv_nt_many's thread-pool job (the fused LoRA terms, cpu/lora_sgmv.hpp):
// pre(i) for i < n_pre run as the job's first tasks; after the GEMV task that computed rows
// [r0, r1) of weight w (columns [r0, r1) of Y_w), post(w, r0, r1) runs in the same task; after(i)
// for i < n_after run as the job's last tasks (claimed after every GEMV task). prefetch, if set
// (AVX-512 level only), gives the byte ranges (at most max; returns how many) of the tail's data
// that go with the fraction [f0, f1) of all the job's weight rows (in task order): the AVX-512
// kernels prefetch them to L2 spread over those rows, while the GEMV, bound by decoding, leaves
// memory idle. Neither changes a result.
struct GemvTail {
  int64_t n_pre = 0;
  void (*pre)(const void* ctx, int64_t i) = nullptr;
  void (*post)(const void* ctx, int64_t w, int64_t r0, int64_t r1) = nullptr;
  int64_t n_after = 0;
  void (*after)(const void* ctx, int64_t i) = nullptr;
  int (*prefetch)(const void* ctx, double f0, double f1, const char** lo, const char** hi, int max) = nullptr;
  const void* ctx = nullptr;
};
// nf4_gemv_nt_many with a tail (level != Scalar).
void nf4_gemv_nt_many_tail(SimdLevel level, int64_t M, const float* X, int64_t ldx, int64_t n, const Nf4Ref* const* W,
                           float* const* Y, const int64_t* ldy, const GemvTail& tail);

// The bf16-compute GEMV contract (cpu/nf4_gemv_bf16.hpp: Y = alpha * r(X) · r(deq(W))ᵀ + beta * Y,
// r = bf16 RNE, fp32 sums) on the AVX-512 fp32 kernels: X rounded once per call, each block's
// scaled code table rounded to bf16, so every product is exact in fp32 and fp32 FMAs sum them (at
// M = 1 the row pairs round the tables with vcvtne2ps2bf16: nf4_gemv_bf16_m1_avx512bf16.cpp).
// nf4_gemv_bf16 runs it at M = 1 on AMX-BF16 CPUs and under QLORA_BF16_GEMV_FP32=1 (see there).
// Requires AVX512-BF16, 1 <= M <= kNf4GemvMaxM, K % 32 == 0 (the caller checked the rest); tail may be null.
void nf4_gemv_nt_many_bf16_fp32(int64_t M, float alpha, const float* X, int64_t ldx, int64_t n,
                                 const Nf4Ref* const* W, float beta, float* const* Y, const int64_t* ldy,
                                 const GemvTail* tail);

}  // namespace qlora::cpu
