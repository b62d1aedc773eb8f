// Portable NF4 GEMV kernel: the Generic level, and the path for shapes the SIMD kernels do not
// take (K not a multiple of their group: odd K, rows starting mid-byte, blocks cutting groups).
// Per block the 16 codes are scaled by its absmax into a small table (the same fp32 product as
// dequantization), then each byte yields two weights by table lookup.
#include <cstdint>

#include "cpu/nf4_gemv_kernels.hpp"

namespace qlora::cpu::nf4_gemv_detail {

namespace {

// M rows of X at once (compile-time, so the accumulators stay in registers); four chains per row.
template <int M>
void rows_m(const Args& a, int64_t r0, int64_t r1) {
  const int64_t K = a.K, ldx = a.ldx;
  const int s = a.bs_shift;
  const float* x = a.x;  // [M, ldx], natural layout
  for (int64_t n = r0; n < r1; ++n) {
    const int64_t j0 = n * K;  // flat index of W[n, 0]
    float acc[4][M] = {};      // [chain][m]
    int64_t k = 0;
    while (k < K) {
      const int64_t b = (j0 + k) >> s;
      int64_t end = ((b + 1) << s) - j0;  // the block's part of this row: [k, end)
      if (end > K) end = K;
      const float scale = a.absmax[b - a.block0];
      float t[16];  // codes * absmax: the same fp32 product as dequantization
      for (int i = 0; i < 16; ++i) t[i] = a.codes[i] * scale;
      if ((j0 + k) & 1) {  // starts on a low nibble (odd K only)
        const float w = t[a.packed[(j0 + k) >> 1] & 0x0F];
        for (int m = 0; m < M; ++m) acc[0][m] += x[m * ldx + k] * w;
        ++k;
      }
      const uint8_t* p = a.packed + ((j0 + k) >> 1);  // k is now at a byte boundary
      for (; k + 4 <= end; k += 4, p += 2) {          // two bytes a step
        const float w0 = t[p[0] >> 4], w1 = t[p[0] & 0x0F], w2 = t[p[1] >> 4], w3 = t[p[1] & 0x0F];
        for (int m = 0; m < M; ++m) {
          const float* xm = x + m * ldx + k;
          acc[0][m] += xm[0] * w0;
          acc[1][m] += xm[1] * w1;
          acc[2][m] += xm[2] * w2;
          acc[3][m] += xm[3] * w3;
        }
      }
      for (; k < end; ++k) {  // up to 3 columns left in this block
        const int64_t j = j0 + k;
        const float w = t[(j & 1) ? (a.packed[j >> 1] & 0x0F) : (a.packed[j >> 1] >> 4)];
        for (int m = 0; m < M; ++m) acc[1][m] += x[m * ldx + k] * w;
      }
    }
    for (int m = 0; m < M; ++m) {
      const float dot = (acc[0][m] + acc[1][m]) + (acc[2][m] + acc[3][m]);
      float* y = a.y + m * a.ldy + n;
      *y = a.beta == 0.0f ? a.alpha * dot : a.alpha * dot + a.beta * *y;  // beta == 0: Y not read
    }
  }
}

}  // namespace

void rows_generic(const Args& a, int64_t r0, int64_t r1) {
  switch (a.M) {
    case 1: rows_m<1>(a, r0, r1); break;
    case 2: rows_m<2>(a, r0, r1); break;
    case 3: rows_m<3>(a, r0, r1); break;
    default: rows_m<4>(a, r0, r1); break;
  }
}

}  // namespace qlora::cpu::nf4_gemv_detail
