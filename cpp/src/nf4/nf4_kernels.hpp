// Per-SIMD-level NF4 block kernels behind nf4::quantize / nf4::dequantize. Declarations only
// (no inline code), so the *_avx2.cpp / *_avx512.cpp files may include this header; allocation,
// threading, dispatch and double quantization live in nf4_codec.cpp.
#pragma once
#include <cstdint>

namespace qlora::nf4::kernels {

// Source element types (x is contiguous, n elements).
enum SrcKind : int { kSrcF32 = 0, kSrcF16 = 1, kSrcBF16 = 2 };

// Level-1 quantization of the blocks [b0, b1) of x[n] cut into blocks of bs elements:
//   absmax[b] = max |x| over block b (float32, exact);
//   packed[b*bs/2 ...]: NF4 nibbles of the block, first element in the high nibble; an odd final
//   element pads the low nibble with 7 (the code of 0.0, as bitsandbytes does).
// thr[15] are the float32 midpoints of the NF4 codes; code = #{k : y > thr[k]} (ties go to the
// lower code) with y = (x * pre) * (1/(absmax * pre)) in float32, pre = 1 unless 1/absmax
// overflows (absmax < ~2.9e-39), then pre = 2^64 (exact: as if the exponent range were unbounded).
// An all-zero block emits nibble 7 (0.0). Returns the first block holding NaN/inf, else -1
// (that block's outputs are then unspecified).
int64_t quantize_blocks_generic(const void* x, int kind, int64_t n, int64_t bs, int64_t b0, int64_t b1,
                                const float* thr, uint8_t* packed, float* absmax);
int64_t quantize_blocks_avx2(const void* x, int kind, int64_t n, int64_t bs, int64_t b0, int64_t b1,
                             const float* thr, uint8_t* packed, float* absmax);
int64_t quantize_blocks_avx512(const void* x, int kind, int64_t n, int64_t bs, int64_t b0, int64_t b1,
                               const float* thr, uint8_t* packed, float* absmax);

// out[j] = codes[nibble j] * absmax[j / bs] (float32) for the elements of blocks [b0, b1).
// absmax is the decoded float32 absmax [n_blocks]; codes the 16 NF4 values.
void dequantize_blocks_generic(const uint8_t* packed, const float* absmax, int64_t n, int64_t bs, int64_t b0,
                               int64_t b1, const float* codes, float* out);
void dequantize_blocks_avx2(const uint8_t* packed, const float* absmax, int64_t n, int64_t bs, int64_t b0,
                            int64_t b1, const float* codes, float* out);
void dequantize_blocks_avx512(const uint8_t* packed, const float* absmax, int64_t n, int64_t bs, int64_t b0,
                              int64_t b1, const float* codes, float* out);

}  // namespace qlora::nf4::kernels
