// Portable NF4 GEMV kernel: the Generic level, and the path for shapes the SIMD kernels do not
// take (K not a multiple of their group: odd K, rows starting mid-byte, blocks cutting groups).
// Per block the 16 codes are scaled by its absmax into a small table (the same fp32 product as
// dequantization), then each byte yields two weights by table lookup.
#include <cstdint>

#include "cpu/nf4_gemv_kernels.hpp"

namespace qlora::cpu::nf4_gemv_detail {

namespace {

constexpr int kMaxM = 8;  // >= kNf4GemvMaxM (checked by the dispatcher's range check)

}  // namespace

void rows_generic(const Args& a, int64_t r0, int64_t r1) {
  const int64_t K = a.K, M = a.M;
  const int s = a.bs_shift;
  for (int64_t n = r0; n < r1; ++n) {
    const int64_t j0 = n * K;  // flat index of W[n, 0]
    float acc_e[kMaxM] = {}, acc_o[kMaxM] = {};  // [m]: two chains (pairs' first / second weight)
    int64_t k = 0;
    while (k < K) {
      const int64_t b = (j0 + k) >> s;
      int64_t end = ((b + 1) << s) - j0;  // the block's part of this row: [k, end)
      if (end > K) end = K;
      const float scale = a.absmax[b - a.block0];
      float t[16];  // scaled codes
      for (int i = 0; i < 16; ++i) t[i] = a.codes[i] * scale;
      if ((j0 + k) & 1) {  // starts on a low nibble (odd K only)
        const float w = t[a.packed[(j0 + k) >> 1] & 0x0F];
        for (int64_t m = 0; m < M; ++m) acc_o[m] += a.x[m * a.ldx + k] * w;
        ++k;
      }
      for (; k + 2 <= end; k += 2) {  // whole bytes
        const uint8_t byte = a.packed[(j0 + k) >> 1];
        const float w0 = t[byte >> 4], w1 = t[byte & 0x0F];
        for (int64_t m = 0; m < M; ++m) {
          const float* x = a.x + m * a.ldx + k;
          acc_e[m] += x[0] * w0;
          acc_o[m] += x[1] * w1;
        }
      }
      if (k < end) {  // ends on a high nibble
        const float w = t[a.packed[(j0 + k) >> 1] >> 4];
        for (int64_t m = 0; m < M; ++m) acc_e[m] += a.x[m * a.ldx + k] * w;
        ++k;
      }
    }
    for (int64_t m = 0; m < M; ++m) {
      const float dot = acc_e[m] + acc_o[m];
      float* y = a.y + m * a.ldy + n;
      *y = a.beta == 0.0f ? a.alpha * dot : a.alpha * dot + a.beta * *y;  // beta == 0: Y not read
    }
  }
}

}  // namespace qlora::cpu::nf4_gemv_detail
