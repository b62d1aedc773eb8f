// AMX-BF16 tiles for the training attention's bf16 products (cpu/ops_attention_train_bf16.cpp):
// declarations only. The kernels (attention_amx_body.hpp) are one source compiled twice, as the bf16
// GEMM's (cpu/gemm_bf16_amx.hpp): on the real tiles (attention_amx.cpp, AMX flags, only where the
// compiler has them: QLORA_AMX_KERNEL) and on emulated tiles (attention_amx_select.cpp, plain C++
// following the Intel SDM), so the attention's AMX path runs and is tested on CPUs without AMX.
// Per element tdpbf16ps semantics (cpu/amx_tiles.hpp): per 32 k, even and odd products in two fp32
// sums (DAZ, FTZ, RNE), then added to C; only that k order differs from the AVX512-BF16 tiles.
#pragma once
#include <cstdint>

#include "cpu/gemm_bf16_amx.hpp"

namespace qlora::cpu::attn_amx {

using bf16_amx::Kernel;

// The tiles the bf16 attention runs: QLORA_ATTN_AMX=0 (read per call) -> Kernel::Avx512Bf16, else
// bf16_amx::kernel_choice() (QLORA_AMX=0 / emulate / real AMX where usable, as the bf16 GEMM).
Kernel choice();

// C[mr, ncols] (ld ldc) = A·B over kp pairs of k (C written, not read; alpha 1, beta 0). mr <= 32:
// rows 0..15 one A tile, 16..mr-1 a second. A read in place: pair (i, p) at A[i * lda + p] (a row of
// pairs is an A tile row). B: packed B panels of 32 columns (bf16_k layout, Bp[q * bstride + p * 32 + c]
// for panel q; 16 pair rows of 16 columns are a B tile), zero-padded past ncols. A ragged last 16-pair
// chunk and a ragged last panel go through zero-padded stack copies.
void rows(Kernel k, int64_t kp, const uint32_t* A, int64_t lda, int mr, const uint32_t* Bp, int64_t bstride,
          int64_t ncols, float* C, int64_t ldc);

// Ct[m, ncols] (ld ldc) += At·Bk, accumulated in place (tileloadd of Ct, tdpbf16ps, tilestored): At
// [m][kp] pairs (ld lda), Bk [kp pair rows][ncols] (ld ldb), m, ncols multiples of 32, kp of 16, all
// of it readable (callers zero-pad). Causal skip: column block j (32 columns = keys t0' + j) starts at
// pair (max(0, j - q0) / 2) & ~15, where q0 = the first column's query offset (columns before a query
// pair's first key add only zeros there, which the caller guarantees: dS and P are +0 past n_vis).
void acc_t(Kernel k, int64_t kp, const uint32_t* At, int64_t lda, int64_t m, const uint32_t* Bk, int64_t ldb,
           int64_t ncols, float* Ct, int64_t ldc, int64_t q0);

// The two compilations (called through rows() / acc_t()).
void rows_amx(int64_t kp, const uint32_t* A, int64_t lda, int mr, const uint32_t* Bp, int64_t bstride, int64_t ncols,
              float* C, int64_t ldc);
void rows_amx_emulated(int64_t kp, const uint32_t* A, int64_t lda, int mr, const uint32_t* Bp, int64_t bstride,
                       int64_t ncols, float* C, int64_t ldc);
void acc_t_amx(int64_t kp, const uint32_t* At, int64_t lda, int64_t m, const uint32_t* Bk, int64_t ldb, int64_t ncols,
               float* Ct, int64_t ldc, int64_t q0);
void acc_t_amx_emulated(int64_t kp, const uint32_t* At, int64_t lda, int64_t m, const uint32_t* Bk, int64_t ldb,
                        int64_t ncols, float* Ct, int64_t ldc, int64_t q0);

}  // namespace qlora::cpu::attn_amx
