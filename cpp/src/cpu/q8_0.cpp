#include "cpu/q8_0.hpp"

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "common/error.hpp"
#include "cpu/gemm.hpp"
#include "cpu/q8_0_head.hpp"
#include "cpu/q8_0_kernels.hpp"
#include "cpu/threads.hpp"

namespace qlora::cpu {

float q8_0_half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {  // zero or subnormal: mant * 2^-24, exact in fp32
    float f = static_cast<float>(mant) * 5.9604644775390625e-08f;
    std::memcpy(&bits, &f, 4);
    bits |= sign;
  } else if (exp == 31) {  // inf, or NaN (quieted, as vcvtph2ps does)
    bits = sign | 0x7f800000u | (mant << 13) | (mant ? 0x00400000u : 0u);
  } else {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

namespace {

inline const uint8_t* row_ptr(const void* W, int64_t n, int64_t K) {
  return static_cast<const uint8_t*>(W) + n * (K / kQ8_0Block) * kQ8_0BlockBytes;
}

// out[K] = deq(row), K % 32 == 0: the portable decode kernel over one whole row.
void dequant_row(const uint8_t* row, int64_t K, float* out) {
  q8_0_decode_tile_generic(row, K, 0, 1, 0, K, K, out, K);
}

void validate(int64_t M, int64_t N, int64_t K, int64_t ldx, int64_t ldy) {
  check_arg(K >= kQ8_0Block && K % kQ8_0Block == 0,
            "q8_0_gemm_nt: K must be a positive multiple of 32, got " + std::to_string(K));
  check_arg(N >= 1, "q8_0_gemm_nt: N must be >= 1, got " + std::to_string(N));
  check_arg(M >= 0, "q8_0_gemm_nt: M must be >= 0, got " + std::to_string(M));
  check_arg(ldx >= K, "q8_0_gemm_nt: ldx (" + std::to_string(ldx) + ") < K (" + std::to_string(K) + ")");
  check_arg(ldy >= N, "q8_0_gemm_nt: ldy (" + std::to_string(ldy) + ") < N (" + std::to_string(N) + ")");
}

// The oracle: one fp32 dot product per output, weights dequantized on the fly, in k order.
void gemm_scalar(int64_t M, int64_t N, int64_t K, const float* X, int64_t ldx, const void* W, float* Y,
                 int64_t ldy) {
  std::vector<float> w(static_cast<size_t>(K));  // [K] one dequantized row
  for (int64_t n = 0; n < N; ++n) {
    dequant_row(row_ptr(W, n, K), K, w.data());
    for (int64_t m = 0; m < M; ++m) {
      float s = 0.0f;
      for (int64_t k = 0; k < K; ++k) s += X[m * ldx + k] * w[k];
      Y[m * ldy + n] = s;
    }
  }
}

constexpr int64_t kGemvMaxM = 16;

void gemv(SimdLevel level, int64_t M, int64_t N, int64_t K, const float* X, int64_t ldx, const uint8_t* W,
          float* Y, int64_t ldy) {
#ifdef QLORA_X86  // the AVX files are compiled on x86 only
  auto kern = level == SimdLevel::AVX512 ? q8_0_gemv_avx512
              : level == SimdLevel::AVX2 ? q8_0_gemv_avx2
                                         : q8_0_gemv_generic;
#else
  auto kern = q8_0_gemv_generic;
  (void)level;
#endif
  // Rows of X per pass over W. AVX2 takes 4 although its kernel handles 8: at M = 8 ([49152, 576])
  // two passes of 4 rows (2 rows of W in flight) took 2.45 ms, one pass of 8 (one row) 3.0.
  const int64_t group = kern == q8_0_gemv_generic || kern == q8_0_gemv_avx2 ? 4 : 8;
  // At least ~64 KiB of W per task so small matrices stay on one thread.
  const int64_t row_bytes = K / kQ8_0Block * kQ8_0BlockBytes;
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / row_bytes);
  parallel_range(N, grain, [&](int64_t n0, int64_t n1) {
    for (int64_t m0 = 0; m0 < M; m0 += group)
      kern(std::min(group, M - m0), n0, n1, K, X + m0 * ldx, ldx, W, Y + m0 * ldy, ldy);
  });
}

}  // namespace

void q8_0_gemm_nt(SimdLevel level, int64_t M, int64_t N, int64_t K, const float* X, int64_t ldx, const void* W,
                  float* Y, int64_t ldy) {
  validate(M, N, K, ldx, ldy);
  if (M == 0) return;
  if (level == SimdLevel::Scalar) return gemm_scalar(M, N, K, X, ldx, W, Y, ldy);
  if (M <= kGemvMaxM) return gemv(level, M, N, K, X, ldx, static_cast<const uint8_t*>(W), Y, ldy);
  // M > 16: the rows decoded straight into the fp32 GEMM's B panels (cpu/q8_0_head.hpp), the bits of
  // gemm_nt over the dequantized table, with no [chunk, K] scratch (session 15; before: 512-row chunks
  // decoded into a scratch, one gemm_nt each, the same bits).
  q8_0_head_logits_f32(level, M, N, K, X, ldx, W, Y, ldy);
}

void q8_0_rows(SimdLevel /*level: one simple loop serves every level (M rows only)*/, int64_t M, int64_t K,
               const void* W, const int32_t* ids, float* out) {
  check_arg(K >= kQ8_0Block && K % kQ8_0Block == 0,
            "q8_0_rows: K must be a positive multiple of 32, got " + std::to_string(K));
  check_arg(M >= 0, "q8_0_rows: M must be >= 0, got " + std::to_string(M));
  for (int64_t m = 0; m < M; ++m) dequant_row(row_ptr(W, ids[m], K), K, out + m * K);
}

}  // namespace qlora::cpu
