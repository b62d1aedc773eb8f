// bf16-compute NF4 GEMV for decode (compute_dtype="bfloat16", M <= kNf4GemvBf16MaxM) on
// AVX512-BF16: the contract of cpu::nf4_gemm_nt_bf16 (cpu/gemm_bf16.hpp), Y = alpha * sum_k
// r(X[i,k]) * r(nf4_element(W, n, k)) + beta * Y with r = bf16 round-to-nearest-even and fp32
// accumulation, without the GEMM driver's decode-to-fp32 / round / pack panels: per block a
// 32-entry bf16 table of r(code * absmax), vpermw looks 32 nibbles up straight into vdpbf16ps
// pair order. Products of bf16 values are exact in fp32; only the summation order differs from
// the GEMM path. The summation order of a row depends on K and M only (never on the thread count).
// At M = 1 on AMX-BF16 CPUs the same contract runs on fp32 FMAs instead (nf4_gemv_nt_many_bf16_fp32;
// QLORA_BF16_GEMV_FP32=0 / 1 picks one kernel at every M: nf4_gemv_bf16.cpp).
#pragma once
#include <cstdint>

#include "cpu/features.hpp"
#include "cpu/nf4_gemv.hpp"
#include "tensor_types.hpp"

namespace qlora::cpu {

constexpr int64_t kNf4GemvBf16MaxM = 8;

// True when nf4_gemv_bf16 takes this call: AVX-512 level on a CPU with AVX512-BF16, 1 <= M <=
// kNf4GemvBf16MaxM, K % 64 == 0 and blocksize >= 64 (every 64-weight step inside one block), and
// not switched off by the environment (QLORA_BF16_GEMV=0: the GEMM driver, for A/B runs).
bool nf4_gemv_bf16_applies(SimdLevel level, int64_t M, const Nf4Ref& W);

// Y[M, W.rows] = alpha * r(X) · r(deq(W))ᵀ + beta * Y (beta == 0: Y is not read). Requires
// nf4_gemv_bf16_applies (the caller checked shapes and leading dimensions).
void nf4_gemv_bf16(int64_t M, float alpha, const float* X, int64_t ldx, const Nf4Ref& W, float beta, float* Y,
                   int64_t ldy);

// Y_i[M, W_i->rows] = r(X) · r(deq(W_i))ᵀ (alpha 1, beta 0) for n weights with the same K (q/k/v,
// gate/up), X rounded and regrouped once, all rows in ONE thread-pool job that also runs `tail`'s
// work (cpu/nf4_gemv.hpp's GemvTail: pre tasks first, post(w, r0, r1) after each GEMV task,
// after tasks last, prefetch of the tail's bytes spread over the GEMV rows). Each output row is
// exactly nf4_gemv_bf16's (same pair, same summation order; a row's result depends on K and M
// only). Requires nf4_gemv_bf16_applies for every W_i (the caller checked shapes and leading
// dimensions); tail may be null.
void nf4_gemv_bf16_many(int64_t M, const float* X, int64_t ldx, int64_t n, const Nf4Ref* const* W, float* const* Y,
                        const int64_t* ldy, const GemvTail* tail);

}  // namespace qlora::cpu
