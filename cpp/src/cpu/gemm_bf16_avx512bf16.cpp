// AVX512-BF16 building blocks of the bf16-compute GEMM: a 14x32 register-tiled vdpbf16ps
// micro-kernel (28 zmm fp32 accumulators, two k per instruction: twice the fp32 FMA rate) and the
// packers that round fp32 operands to bf16 pairs (vcvtne2ps2bf16: round-to-nearest-even).
// Compiled with -mavx512bf16 (CMake: *_avx512bf16.cpp); called only after cpu_has_avx512_bf16().
// Rules: cpu/README.md (plain functions on raw pointers only).
#include <immintrin.h>

#include <cstddef>
#include <cstdint>

#include "cpu/gemm_bf16_kernels.hpp"
#include "cpu/transpose16_avx512.hpp"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

namespace qlora::cpu::bf16_k {

namespace {
constexpr int MR = kMR, NR = kNR;
static_assert(NR == 32, "two zmm of 16 fp32 columns per row");

__mmask16 lane_mask(int64_t n) {  // first n of 16 lanes (n clamped to [0, 16])
  if (n >= 16) return 0xFFFF;
  if (n <= 0) return 0;
  return static_cast<__mmask16>((1u << n) - 1u);
}

__m512bh as_bh(__m512i v) { return (__m512bh)v; }

template <int R>
void ukr(int64_t kp, const uint32_t* Ap, const uint32_t* Bp, float* C, int64_t ldc, float alpha, float beta, int nr) {
  __m512 c0[R], c1[R];
#pragma GCC unroll 14
  for (int i = 0; i < R; ++i) {
    c0[i] = c1[i] = _mm512_setzero_ps();
    _mm_prefetch(reinterpret_cast<const char*>(C + i * ldc), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(C + i * ldc + 31), _MM_HINT_T0);
  }
  for (int64_t p = 0; p < kp; ++p) {
    const __m512bh b0 = as_bh(_mm512_load_si512(Bp)), b1 = as_bh(_mm512_load_si512(Bp + 16));
#pragma GCC unroll 14
    for (int i = 0; i < R; ++i) {
      const __m512bh a = as_bh(_mm512_set1_epi32(static_cast<int>(Ap[i])));
      c0[i] = _mm512_dpbf16_ps(c0[i], a, b0);
      c1[i] = _mm512_dpbf16_ps(c1[i], a, b1);
    }
    Ap += MR;
    Bp += NR;
  }
  const __mmask16 m0 = lane_mask(nr), m1 = lane_mask(nr - 16);
  const __m512 va = _mm512_set1_ps(alpha);
  if (beta == 0.0f) {
#pragma GCC unroll 14
    for (int i = 0; i < R; ++i) {
      _mm512_mask_storeu_ps(C + i * ldc, m0, _mm512_mul_ps(va, c0[i]));
      _mm512_mask_storeu_ps(C + i * ldc + 16, m1, _mm512_mul_ps(va, c1[i]));
    }
  } else {
    const __m512 vb = _mm512_set1_ps(beta);
#pragma GCC unroll 14
    for (int i = 0; i < R; ++i) {
      float* c = C + i * ldc;
      _mm512_mask_storeu_ps(c, m0, _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(m0, c), _mm512_mul_ps(va, c0[i])));
      _mm512_mask_storeu_ps(c + 16, m1,
                            _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(m1, c + 16), _mm512_mul_ps(va, c1[i])));
    }
  }
}


// 32 k of one row (rem <= 32 valid floats, the rest zero) -> 16 bf16 pairs as 32-bit lanes.
__m512 row_pairs(const float* s, int64_t rem) {
  const __m512 lo = _mm512_maskz_loadu_ps(lane_mask(rem), s), hi = _mm512_maskz_loadu_ps(lane_mask(rem - 16), s + 16);
  return _mm512_castsi512_ps((__m512i)_mm512_cvtne2ps_pbh(hi, lo));  // elements 0..15 from lo, 16..31 from hi
}
}  // namespace

void ukernel_avx512bf16(int64_t kp, const uint32_t* Ap, const uint32_t* Bp, float* C, int64_t ldc, float alpha,
                        float beta, int mr, int nr) {
  switch (mr) {
    case 14: return ukr<14>(kp, Ap, Bp, C, ldc, alpha, beta, nr);
    case 13: return ukr<13>(kp, Ap, Bp, C, ldc, alpha, beta, nr);
    case 12: return ukr<12>(kp, Ap, Bp, C, ldc, alpha, beta, nr);
    case 11: return ukr<11>(kp, Ap, Bp, C, ldc, alpha, beta, nr);
    case 10: return ukr<10>(kp, Ap, Bp, C, ldc, alpha, beta, nr);
    case 9: return ukr<9>(kp, Ap, Bp, C, ldc, alpha, beta, nr);
    case 8: return ukr<8>(kp, Ap, Bp, C, ldc, alpha, beta, nr);
    case 7: return ukr<7>(kp, Ap, Bp, C, ldc, alpha, beta, nr);
    case 6: return ukr<6>(kp, Ap, Bp, C, ldc, alpha, beta, nr);
    case 5: return ukr<5>(kp, Ap, Bp, C, ldc, alpha, beta, nr);
    case 4: return ukr<4>(kp, Ap, Bp, C, ldc, alpha, beta, nr);
    case 3: return ukr<3>(kp, Ap, Bp, C, ldc, alpha, beta, nr);
    case 2: return ukr<2>(kp, Ap, Bp, C, ldc, alpha, beta, nr);
    case 1: return ukr<1>(kp, Ap, Bp, C, ldc, alpha, beta, nr);
    default: return;
  }
}

namespace {
// vpermt2d indices that join the 14-lane pair rows r[p] (p < 16) of an A panel's 32-k step into the
// 14 whole vectors of its 224 contiguous uint32: vector q, lane l = element e = 16q + l, i.e. lane
// e % 14 of r[e / 14], where e / 14 is (16q) / 14 or the next one (16 < 2 * 14).
struct Join14 {
  alignas(64) int32_t idx[14][16];
  constexpr Join14() : idx{} {
    for (int q = 0; q < 14; ++q)
      for (int l = 0; l < 16; ++l) {
        const int e = 16 * q + l;
        idx[q][l] = (e / 14 == (16 * q) / 14 ? 0 : 16) + e % 14;
      }
  }
};
constexpr Join14 kJoin14{};
}  // namespace

void pack_a_panel_avx512bf16(const float* src, int64_t ld, int n, int64_t kc, uint32_t* P) {
  static_assert(MR == 14, "Join14 is for 14-row panels");
  // Whole 32-k steps: the same 224 values as pack_rows' 16 masked 14-lane stores, as 14
  // whole-vector stores (the masked stores straddled cache lines every other row: 1 thread, a
  // 1024 x 576 A packed ~30% faster in a loop on Zen 4); the tail as pack_rows.
  const int64_t k32 = kc / 32 * 32;
  for (int64_t k0 = 0; k0 < k32; k0 += 32) {
    __m512 r[16];
    for (int i = 0; i < 16; ++i) r[i] = i < n ? row_pairs(src + i * ld + k0, 32) : _mm512_setzero_ps();
    transpose16(r);
    uint32_t* d = P + (k0 / 2) * MR;
    for (int q = 0; q < 14; ++q) {
      const int p0 = (16 * q) / 14;
      const __m512i ix = _mm512_load_si512(kJoin14.idx[q]);
      _mm512_storeu_si512(d + 16 * q,
                          _mm512_permutex2var_epi32(_mm512_castps_si512(r[p0]), ix, _mm512_castps_si512(r[p0 + 1])));
    }
  }
  if (k32 < kc) pack_rows_avx512bf16(src + k32, ld, n, kc - k32, MR, P + (k32 / 2) * MR);
}

void pack_rows_avx512bf16(const float* src, int64_t ld, int n, int64_t kc, int W, uint32_t* P) {
  // 32 k (16 pairs) at a time: convert each row's run to pairs, transpose 16 rows x 16 pairs.
  for (int64_t k0 = 0; k0 < kc; k0 += 32) {
    const int64_t rem = kc - k0, np = rem >= 32 ? 16 : (rem + 1) / 2;
    for (int g = 0; g * 16 < W; ++g) {
      const int w = W - g * 16 < 16 ? W - g * 16 : 16;  // lanes of this group inside the panel
      __m512 r[16];
      for (int i = 0; i < 16; ++i) {
        const int row = g * 16 + i;
        r[i] = row < n ? row_pairs(src + row * ld + k0, rem) : _mm512_setzero_ps();
      }
      transpose16(r);
      uint32_t* d = P + (k0 / 2) * W + g * 16;
      const __mmask16 keep = lane_mask(w);
      for (int p = 0; p < np; ++p) _mm512_mask_storeu_ps(reinterpret_cast<float*>(d + p * W), keep, r[p]);
    }
  }
}

void pack_cols_avx512bf16(const float* src, int64_t ld, int n, int64_t kc, int W, uint32_t* P) {
  // Interleave rows 2p and 2p+1: [lo0..lo15, hi0..hi15] -> [lo0, hi0, lo1, hi1, ...].
  alignas(64) static const uint16_t kIdx[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                                8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i idx = _mm512_load_si512(kIdx);
  for (int64_t p = 0; 2 * p < kc; ++p) {
    const float* s0 = src + 2 * p * ld;
    const bool has1 = 2 * p + 1 < kc;
    for (int g = 0; g * 16 < W; ++g) {
      const int w = W - g * 16 < 16 ? W - g * 16 : 16;
      const __mmask16 valid = lane_mask(n - g * 16);
      const __m512 lo = _mm512_maskz_loadu_ps(valid, s0 + g * 16);
      const __m512 hi = has1 ? _mm512_maskz_loadu_ps(valid, s0 + ld + g * 16) : _mm512_setzero_ps();
      const __m512i v = _mm512_permutexvar_epi16(idx, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
      _mm512_mask_storeu_epi32(P + p * W + g * 16, lane_mask(w), v);
    }
  }
}

void pack_cols_panels_avx512bf16(const float* src, int64_t ld, int64_t n, int64_t kc, uint32_t* P,
                                 int64_t panel_stride) {
  alignas(64) static const uint16_t kIdx[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                                8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i idx = _mm512_load_si512(kIdx);
  const int64_t kp = (kc + 1) / 2, n16 = (n + 15) / 16 * 16;
  const int64_t wpad = (n + NR - 1) / NR * NR;  // columns incl. the last panel's zero padding
  for (int64_t p = 0; p < kp; ++p) {
    const float* s0 = src + 2 * p * ld;
    const bool has1 = 2 * p + 1 < kc;
    for (int64_t j = 0; j < wpad; j += 16) {
      uint32_t* d = P + (j / NR) * panel_stride + p * NR + (j % NR);
      if (j >= n16) {  // a whole zero half-panel
        _mm512_storeu_si512(d, _mm512_setzero_si512());
        continue;
      }
      const __mmask16 valid = lane_mask(n - j);
      const __m512 lo = _mm512_maskz_loadu_ps(valid, s0 + j);
      const __m512 hi = has1 ? _mm512_maskz_loadu_ps(valid, s0 + ld + j) : _mm512_setzero_ps();
      _mm512_storeu_si512(d, _mm512_permutexvar_epi16(idx, (__m512i)_mm512_cvtne2ps_pbh(hi, lo)));
    }
  }
}

void pack_nf4_nn_pair_avx512bf16(const uint8_t* packed, int64_t f0, int64_t f1, int64_t n, const float* s0,
                                 const float* s1, int bs_log2, const float* codes, uint32_t* P, int64_t panel_stride) {
  // Per 16 columns: each row's 8 bytes decoded as nf4_decode_avx512 does (high nibble first, one
  // vmulps by the block's absmax), the two rows rounded by one vcvtne2ps2bf16 and interleaved into
  // pairs as pack_cols_panels does: the same values without the fp32 tmp rows.
  alignas(64) static const uint16_t kIdx[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                                8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i idx = _mm512_load_si512(kIdx);
  const __m512 lut = _mm512_loadu_ps(codes);
  const __m128i low4 = _mm_set1_epi8(0x0F);
  const int64_t b0 = f0 >> bs_log2, b1 = f1 >> bs_log2;
  const int64_t wpad = (n + NR - 1) / NR * NR;
  auto row16 = [&](int64_t f, int64_t bb, const float* sc) {
    const __m128i x = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(packed + (f >> 1)));
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(x, 4), low4), lo = _mm_and_si128(x, low4);
    const __m512 v = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(hi, lo)), lut);
    return _mm512_mul_ps(v, _mm512_set1_ps(sc[(f >> bs_log2) - bb]));
  };
  for (int64_t j = 0; j < wpad; j += 16) {
    uint32_t* d = P + (j / NR) * panel_stride + (j % NR);
    if (j >= n) {
      _mm512_storeu_si512(d, _mm512_setzero_si512());
      continue;
    }
    const __m512 lo = row16(f0 + j, b0, s0);
    const __m512 hi = s1 ? row16(f1 + j, b1, s1) : _mm512_setzero_ps();
    _mm512_storeu_si512(d, _mm512_permutexvar_epi16(idx, (__m512i)_mm512_cvtne2ps_pbh(hi, lo)));
  }
}

void pack_nf4_nt_avx512bf16(const uint8_t* packed, int64_t f0, int64_t K, int nr, int64_t kc, const float* scl,
                            int bs_log2, const float* codes, uint32_t* P) {
  // Per 32-k step and 16 rows: the 16 bytes of each row (16 pairs: element 2p in the high nibble of
  // byte p, 2p + 1 in the low) transposed as dwords, T[c] lane r = row r's bytes 4c..4c+3, so pair
  // p = 4c + a is byte a of every lane: vpermps reads only an index's low 4 bits, so a shift picks
  // each nibble. Scaled by the rows' absmax (one vmulps, as the decoder), rounded by vcvtne2ps2bf16
  // and interleaved into pairs: no fp32 tmp and no 16x16 transpose of fp32 (about 2.5x fewer
  // instructions per element than decode + pack_rows).
  alignas(64) static const uint16_t kIdx[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                                8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  alignas(64) static const int32_t kT4[16] = {0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15};
  const __m512i inter = _mm512_load_si512(kIdx), t4 = _mm512_load_si512(kT4);
  const __m512 lut = _mm512_loadu_ps(codes);
  const int64_t b0 = f0 >> bs_log2;
  for (int g = 0; g * 16 < NR; ++g) {
    const int rows = nr - g * 16 < 16 ? nr - g * 16 : 16;
    if (rows <= 0) {  // the panel's missing rows: zero, as pack_rows stores them
      for (int64_t p = 0; p < kc / 2; ++p) _mm512_storeu_si512(P + p * NR + g * 16, _mm512_setzero_si512());
      continue;
    }
    const __mmask16 rm = lane_mask(rows);
    const uint8_t* base = packed + ((f0 + (int64_t)g * 16 * K) >> 1);
    const int64_t rb = K >> 1;  // bytes per weight row
    for (int64_t k0 = 0; k0 < kc; k0 += 32) {
      const uint8_t* src = base + (k0 >> 1);
      __m512i z[4];
      for (int q = 0; q < 4; ++q) {
        __m128i l[4];
        for (int i = 0; i < 4; ++i) {
          const int r = 4 * q + i;
          l[i] = r < rows ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + r * rb)) : _mm_setzero_si128();
        }
        __m512i v = _mm512_castsi128_si512(l[0]);
        v = _mm512_inserti32x4(v, l[1], 1);
        v = _mm512_inserti32x4(v, l[2], 2);
        v = _mm512_inserti32x4(v, l[3], 3);
        z[q] = _mm512_permutexvar_epi32(t4, v);  // lane c = rows 4q..4q+3, dword c of each
      }
      const __m512i A = _mm512_shuffle_i32x4(z[0], z[1], _MM_SHUFFLE(1, 0, 1, 0));
      const __m512i B = _mm512_shuffle_i32x4(z[0], z[1], _MM_SHUFFLE(3, 2, 3, 2));
      const __m512i C = _mm512_shuffle_i32x4(z[2], z[3], _MM_SHUFFLE(1, 0, 1, 0));
      const __m512i D = _mm512_shuffle_i32x4(z[2], z[3], _MM_SHUFFLE(3, 2, 3, 2));
      const __m512i T[4] = {_mm512_shuffle_i32x4(A, C, _MM_SHUFFLE(2, 0, 2, 0)),
                            _mm512_shuffle_i32x4(A, C, _MM_SHUFFLE(3, 1, 3, 1)),
                            _mm512_shuffle_i32x4(B, D, _MM_SHUFFLE(2, 0, 2, 0)),
                            _mm512_shuffle_i32x4(B, D, _MM_SHUFFLE(3, 1, 3, 1))};
      uint32_t* d = P + (k0 / 2) * NR + g * 16;
#pragma GCC unroll 16
      for (int p = 0; p < 16; ++p) {
        const __m512i t = T[p / 4];
        const int sh = 8 * (p % 4);
        const __m512 sv = _mm512_loadu_ps(scl + (((f0 + k0 + 2 * p) >> bs_log2) - b0) * NR + g * 16);
        const __m512 ev = _mm512_maskz_mul_ps(rm, _mm512_permutexvar_ps(_mm512_srli_epi32(t, sh + 4), lut), sv);
        const __m512 od = _mm512_maskz_mul_ps(rm, _mm512_permutexvar_ps(_mm512_srli_epi32(t, sh), lut), sv);
        _mm512_storeu_si512(d + p * NR, _mm512_permutexvar_epi16(inter, (__m512i)_mm512_cvtne2ps_pbh(od, ev)));
      }
    }
  }
}

}  // namespace qlora::cpu::bf16_k
