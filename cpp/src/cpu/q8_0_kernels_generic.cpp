// Portable Q8_0 GEMV and decode kernels (baseline ISA, compiler-vectorized): the fallback for non-x86 builds
// and the "generic" level.
#include <algorithm>
#include <cstring>

#include "cpu/q8_0.hpp"
#include "cpu/q8_0_kernels.hpp"

namespace qlora::cpu {

void q8_0_gemv_generic(int64_t M, int64_t n0, int64_t n1, int64_t K, const float* X, int64_t ldx,
                       const uint8_t* W, float* Y, int64_t ldy) {
  constexpr int L = 8;  // independent partial sums per row of X (one vector's worth)
  const int64_t nb = K / kQ8_0Block, row_bytes = nb * kQ8_0BlockBytes;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = W + n * row_bytes;
    float acc[4][L] = {};  // M <= 4
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* blk = row + b * kQ8_0BlockBytes;
      uint16_t dh;
      std::memcpy(&dh, blk, 2);
      const float d = q8_0_half_to_float(dh);
      float w[kQ8_0Block];  // [32] the block dequantized
      for (int j = 0; j < kQ8_0Block; ++j) w[j] = d * static_cast<float>(static_cast<int8_t>(blk[2 + j]));
      for (int64_t m = 0; m < M; ++m) {
        const float* x = X + m * ldx + b * kQ8_0Block;  // [32]
        for (int j = 0; j < kQ8_0Block; j += L)
          for (int l = 0; l < L; ++l) acc[m][l] += x[j + l] * w[j + l];
      }
    }
    for (int64_t m = 0; m < M; ++m) {
      float s = 0.0f;
      for (int l = 0; l < L; ++l) s += acc[m][l];
      Y[m * ldy + n] = s;
    }
  }
}

void q8_0_decode_tile_generic(const uint8_t* E, int64_t D, int64_t r0, int64_t rows, int64_t c0, int64_t n,
                              int64_t width, float* out, int64_t ldo) {
  const int64_t row_bytes = D / kQ8_0Block * kQ8_0BlockBytes;
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* row = E + (r0 + r) * row_bytes;
    float* o = out + r * ldo;
    for (int64_t j = 0; j < n;) {  // one block's run of columns at a time
      const int64_t c = c0 + j, off = c % kQ8_0Block, len = std::min(kQ8_0Block - off, n - j);
      const uint8_t* blk = row + c / kQ8_0Block * kQ8_0BlockBytes;
      uint16_t dh;
      std::memcpy(&dh, blk, 2);
      const float d = q8_0_half_to_float(dh);
      for (int64_t t = 0; t < len; ++t) o[j + t] = d * static_cast<float>(static_cast<int8_t>(blk[2 + off + t]));
      j += len;
    }
    for (int64_t j = n; j < width; ++j) o[j] = 0.0f;
  }
}

}  // namespace qlora::cpu
