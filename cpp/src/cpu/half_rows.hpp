// 16-bit float rows (head_format "f16" / "bf16": the embedding and lm_head as IEEE fp16 or bf16,
// 2 bytes per weight): the CPU side of Backend::half_gemm_nt / half_rows (backend.hpp). Each
// weight widens exactly to fp32; products accumulate in fp32.
#pragma once
#include <cstdint>

#include "cpu/features.hpp"

namespace qlora::cpu {

// bf16: W holds bf16 values, else IEEE fp16.
// Y[M, N] = X[M, K] · wide(W)ᵀ, W = N rows of K values. Scalar: a plain reference loop (k order).
// Otherwise 1 <= M <= 16 streams W once per row group (GEMV); M > 16 widens W a chunk of rows at a
// time into fp32 scratch and runs the fp32 gemm_nt on it (never a full fp32 copy of W).
// Throws ValueError unless K >= 1, N >= 1, M >= 0, ldx >= K, ldy >= N.
void half_gemm_nt(SimdLevel level, bool bf16, int64_t M, int64_t N, int64_t K, const float* X, int64_t ldx,
                  const void* W, float* Y, int64_t ldy);

// out[M, K] = wide(W)[ids[m], :] (ids already checked to lie in [0, N)).
void half_rows(SimdLevel level, bool bf16, int64_t M, int64_t K, const void* W, const int32_t* ids, float* out);

// One value: bf16 or fp16 bits -> fp32 (exact), and fp32 -> bits, round to nearest even (fp16:
// inf beyond its range, as numpy; bf16: as torch's .to(bfloat16)); NaN stays NaN.
float half_to_f32(bool bf16, uint16_t h);
uint16_t f32_to_half(bool bf16, float f);
// out[n] = f32_to_half(x[n]) for n values.
void f32_to_half_rows(bool bf16, const float* x, int64_t n, uint16_t* out);

}  // namespace qlora::cpu
