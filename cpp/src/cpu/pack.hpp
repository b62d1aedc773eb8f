// Level-neutral packing helpers of the blocked GEMM (cpu/gemm.cpp): A panels (the broadcast
// operand, MR rows) and the decoded absmax of NF4 blocks. Layouts: cpu/gemm_kernels.hpp.
#pragma once
#include <cstdint>

#include "tensor_types.hpp"

namespace qlora::cpu::pack {

// Ap[k * MR + i] = A[i * lda + k] for i < mr (A row-major [M, K]: gemm_nt / gemm_nn); rows
// mr <= i < MR are zero. MR must be one of the kernel tile heights (4, 6, 14).
void a_rows(int MR, const float* A, int64_t lda, int mr, int64_t kc, float* Ap);
// Ap[k * MR + i] = A[k * lda + i] for i < mr (A stored [K, M]: gemm_tn).
void a_cols(int MR, const float* A, int64_t lda, int mr, int64_t kc, float* Ap);

// out[b - b0] = decoded absmax of NF4 block b, for b in [b0, b1).
void nf4_scales(const Nf4Ref& W, int64_t b0, int64_t b1, float* out);
// out[k] = decoded absmax of the block holding flat element f0 + k * stride, for k < n (the rows of
// an NF4 gemm_nn panel); the same values nf4_scales gives.
void nf4_scales_strided(const Nf4Ref& W, int64_t f0, int64_t stride, int64_t n, int bs_log2, float* out);

}  // namespace qlora::cpu::pack
