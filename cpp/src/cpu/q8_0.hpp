// GGUF Q8_0 weights kept as stored (e.g. a GGUF's token embedding used as the tied lm_head): a row
// of K weights (K % 32 == 0) is K/32 blocks of 34 bytes {fp16 d little-endian, int8 q[32]}, weight
// j of a block = float(d) * float(q[j]) (exact in fp32, as gguf's dequantize computes it).
// Semantics are those of Backend::q8_0_gemm_nt / q8_0_rows (backend.hpp).
#pragma once
#include <cstdint>

#include "cpu/features.hpp"

namespace qlora::cpu {

constexpr int64_t kQ8_0Block = 32;       // weights per block
constexpr int64_t kQ8_0BlockBytes = 34;  // fp16 scale + 32 int8

// Y[M, N] = X[M, K] · deq(W)ᵀ, W = N rows of K/32 blocks. Scalar: a plain reference loop. Otherwise
// 1 <= M <= 16 streams W once per row group (GEMV); M > 16 dequantizes W a chunk of rows at a time
// into fp32 scratch and runs the fp32 gemm_nt on it (never a full fp32 copy of W).
// Throws ValueError unless K % 32 == 0, K >= 32, N >= 1, M >= 0, ldx >= K, ldy >= N.
void q8_0_gemm_nt(SimdLevel level, int64_t M, int64_t N, int64_t K, const float* X, int64_t ldx, const void* W,
                  float* Y, int64_t ldy);

// out[M, K] = deq(W)[ids[m], :] (ids already checked to lie in [0, N)).
void q8_0_rows(SimdLevel level, int64_t M, int64_t K, const void* W, const int32_t* ids, float* out);

// fp16 bits -> fp32, exact (as F16C's vcvtph2ps and numpy's float16 -> float32).
float q8_0_half_to_float(uint16_t h);
// fp32 -> fp16 bits, round to nearest even (as numpy's float32 -> float16), inf beyond the range.
uint16_t q8_0_float_to_half(float f);
// GGUF's Q8_0 quantization of rows x[rows, K] (K % 32 == 0) into out[rows, K/32 * 34]: per block of
// 32, d = max|x| / 127, q = round-half-away(x / d) (as x * (1/d)), d stored as fp16: the same bytes
// as gguf-py's quants.quantize(..., Q8_0) and ggml's quantize_row_q8_0_ref.
void q8_0_quantize_rows(const float* x, int64_t rows, int64_t K, uint8_t* out);

}  // namespace qlora::cpu
