// AVX2+FMA GEMM building blocks: a 6x16 register-tiled micro-kernel (12 ymm accumulators) and an
// NF4 nibble decoder (two 8-entry vpermps tables blended on bit 3). Rules: cpu/README.md.
#include <immintrin.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "cpu/gemm_kernels.hpp"
#include "cpu/transpose8_avx2.hpp"

namespace qlora::cpu::gemm_k {

namespace {
constexpr int MR = kAvx2MR, NR = kAvx2NR;
static_assert(NR == 16, "the AVX2 kernel holds two ymm columns per row");

// Direct: A read in place, element (i, k) at Ap[i * rs + k * cs] (ukernel_direct); else the
// packed panel Ap[k * MR + i].
template <int R, bool Direct = false>
void ukr(int64_t kc, const float* Ap, const float* Bp, float* C, int64_t ldc, float alpha, float beta, int nr,
         int64_t rs = 1, int64_t cs = MR) {
  __m256 c0[R], c1[R];
#pragma GCC unroll 6
  for (int i = 0; i < R; ++i) {
    // C rows into L1 while the k loop runs (they are read at the end; a miss there stalls every FMA chain).
    _mm_prefetch(reinterpret_cast<const char*>(C + i * ldc), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(C + i * ldc + NR - 1), _MM_HINT_T0);
    c0[i] = c1[i] = _mm256_setzero_ps();
  }
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 b0 = _mm256_load_ps(Bp), b1 = _mm256_load_ps(Bp + 8);
#pragma GCC unroll 6
    for (int i = 0; i < R; ++i) {
      const __m256 a = _mm256_broadcast_ss(Ap + (Direct ? i * rs : i));
      c0[i] = _mm256_fmadd_ps(a, b0, c0[i]);
      c1[i] = _mm256_fmadd_ps(a, b1, c1[i]);
    }
    Ap += Direct ? cs : MR;
    Bp += NR;
  }
  const __m256 va = _mm256_set1_ps(alpha), vb = _mm256_set1_ps(beta);
  if (nr == NR) {
#pragma GCC unroll 6
    for (int i = 0; i < R; ++i) {
      float* c = C + i * ldc;
      __m256 r0 = _mm256_mul_ps(va, c0[i]), r1 = _mm256_mul_ps(va, c1[i]);
      if (beta != 0.0f) {
        r0 = _mm256_fmadd_ps(vb, _mm256_loadu_ps(c), r0);
        r1 = _mm256_fmadd_ps(vb, _mm256_loadu_ps(c + 8), r1);
      }
      _mm256_storeu_ps(c, r0);
      _mm256_storeu_ps(c + 8, r1);
    }
    return;
  }
  alignas(32) float tile[NR];  // ragged right edge: spill a row, store the valid part
#pragma GCC unroll 6  // constant indices keep c0/c1 in registers (no stack copy in the k loop)
  for (int i = 0; i < R; ++i) {
    float* c = C + i * ldc;
    _mm256_store_ps(tile, _mm256_mul_ps(va, c0[i]));
    _mm256_store_ps(tile + 8, _mm256_mul_ps(va, c1[i]));
    if (beta == 0.0f) {
      for (int j = 0; j < nr; ++j) c[j] = tile[j];
    } else {
      for (int j = 0; j < nr; ++j) c[j] = tile[j] + beta * c[j];
    }
  }
}
}  // namespace

void ukernel_avx2(int64_t kc, const float* Ap, const float* Bp, float* C, int64_t ldc, float alpha, float beta, int mr,
                  int nr) {
  switch (mr) {
    case 6: return ukr<6>(kc, Ap, Bp, C, ldc, alpha, beta, nr);
    case 5: return ukr<5>(kc, Ap, Bp, C, ldc, alpha, beta, nr);
    case 4: return ukr<4>(kc, Ap, Bp, C, ldc, alpha, beta, nr);
    case 3: return ukr<3>(kc, Ap, Bp, C, ldc, alpha, beta, nr);
    case 2: return ukr<2>(kc, Ap, Bp, C, ldc, alpha, beta, nr);
    case 1: return ukr<1>(kc, Ap, Bp, C, ldc, alpha, beta, nr);
    default: return;
  }
}

void ukernel_direct_avx2(int64_t kc, const float* A, int64_t rs, int64_t cs, const float* Bp, float* C, int64_t ldc,
                         float alpha, float beta, int mr, int nr) {
  switch (mr) {
    case 6: return ukr<6, true>(kc, A, Bp, C, ldc, alpha, beta, nr, rs, cs);
    case 5: return ukr<5, true>(kc, A, Bp, C, ldc, alpha, beta, nr, rs, cs);
    case 4: return ukr<4, true>(kc, A, Bp, C, ldc, alpha, beta, nr, rs, cs);
    case 3: return ukr<3, true>(kc, A, Bp, C, ldc, alpha, beta, nr, rs, cs);
    case 2: return ukr<2, true>(kc, A, Bp, C, ldc, alpha, beta, nr, rs, cs);
    case 1: return ukr<1, true>(kc, A, Bp, C, ldc, alpha, beta, nr, rs, cs);
    default: return;
  }
}

namespace {
// tn_small_avx2: 6 rows x 16 columns; each broadcast of A feeds two FMAs, as in ukr.
// acc [R][16]: the running sums between k chunks (first: start from 0; not last: store them and
// return). Storing and reloading a float sum is exact, so the FMA chain is that of one pass.
template <int R>
void tn_small(int64_t kc, const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc, float alpha,
              float beta, int nr, bool trans, float* acc, bool first, bool last) {
  static_assert(R <= 6 && kTnSmallColsAvx2 % 16 == 0, "two ymm columns per row of a half");
  __m256 c0[R], c1[R];
#pragma GCC unroll 6
  for (int i = 0; i < R; ++i) {
    c0[i] = first ? _mm256_setzero_ps() : _mm256_load_ps(acc + i * 16);
    c1[i] = first ? _mm256_setzero_ps() : _mm256_load_ps(acc + i * 16 + 8);
  }
  // Lanes j < nr of the two halves (maskload reads nothing past the valid columns).
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i m0 = _mm256_cmpgt_epi32(_mm256_set1_epi32(nr), lane),
                m1 = _mm256_cmpgt_epi32(_mm256_set1_epi32(nr - 8), lane);
  const bool full = nr == 16;
  for (int64_t k = 0; k < kc; ++k) {
    // B's rows are far apart (a wide matrix read 64 bytes per row): fetch them a few rows ahead.
    _mm_prefetch(reinterpret_cast<const char*>(B + (k + 16) * ldb), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(B + (k + 16) * ldb + 15), _MM_HINT_T0);
    const float* b = B + k * ldb;
    const __m256 b0 = full ? _mm256_loadu_ps(b) : _mm256_maskload_ps(b, m0);
    const __m256 b1 = full ? _mm256_loadu_ps(b + 8) : _mm256_maskload_ps(b + 8, m1);
    const float* a = A + k * lda;
#pragma GCC unroll 6
    for (int i = 0; i < R; ++i) {
      const __m256 ai = _mm256_broadcast_ss(a + i);
      c0[i] = _mm256_fmadd_ps(ai, b0, c0[i]);
      c1[i] = _mm256_fmadd_ps(ai, b1, c1[i]);
    }
  }
  if (!last) {
#pragma GCC unroll 6
    for (int i = 0; i < R; ++i) {
      _mm256_store_ps(acc + i * 16, c0[i]);
      _mm256_store_ps(acc + i * 16 + 8, c1[i]);
    }
    return;
  }
  // Epilogue of ukr: alpha * acc, or fma(beta, C, alpha * acc) (ukr's ragged edge compiles to the
  // same single-rounded fma), element by element.
  alignas(32) float tile[R][16];
  const __m256 va = _mm256_set1_ps(alpha);
#pragma GCC unroll 6
  for (int i = 0; i < R; ++i) {
    _mm256_store_ps(tile[i], _mm256_mul_ps(va, c0[i]));
    _mm256_store_ps(tile[i] + 8, _mm256_mul_ps(va, c1[i]));
  }
  if (!trans) {
    const __m256 vb = _mm256_set1_ps(beta);
    for (int i = 0; i < R; ++i) {
      float* c = C + i * ldc;
      if (full) {
        __m256 x0 = _mm256_load_ps(tile[i]), x1 = _mm256_load_ps(tile[i] + 8);
        if (beta != 0.0f) {
          x0 = _mm256_fmadd_ps(vb, _mm256_loadu_ps(c), x0);
          x1 = _mm256_fmadd_ps(vb, _mm256_loadu_ps(c + 8), x1);
        }
        _mm256_storeu_ps(c, x0);
        _mm256_storeu_ps(c + 8, x1);
      } else {
        for (int j = 0; j < nr; ++j) c[j] = beta == 0.0f ? tile[i][j] : std::fma(beta, c[j], tile[i][j]);
      }
    }
    return;
  }
  for (int j = 0; j < nr; ++j) {  // C[j * ldc + i]
    float* c = C + j * ldc;
    for (int i = 0; i < R; ++i) c[i] = beta == 0.0f ? tile[i][j] : std::fma(beta, c[i], tile[i][j]);
  }
}
}  // namespace

void tn_small_avx2(int64_t kc, const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
                   float alpha, float beta, int mr, int nr, bool trans) {
  // All mr <= 48 rows of a strip of nr <= kTnSmallColsAvx2 columns (16-column halves, 6-row tiles),
  // k in chunks of kChunk rows. Each chunk of B's strip is first copied contiguous (it then stays
  // in L1 for every tile). A wide B's rows are KiBs apart (6 KiB at 1536 columns: a new 4 KiB page
  // and TLB entry every row, the 64-byte runs in 2 L1 sets), so reading it in place cost a row
  // visit per tile and 16 columns; the copy visits each row once per kTnSmallColsAvx2 columns.
  constexpr int kHalves = kTnSmallColsAvx2 / 16;
  constexpr int64_t kChunk = 64;  // 64 rows x 64 columns: 16 KiB of B
  alignas(32) float acc[kHalves][8][6 * 16];
  alignas(64) float bbuf[kHalves][kChunk * 16];
  const int tiles = (mr + 5) / 6;
  for (int64_t k0 = 0; k0 < kc; k0 += kChunk) {
    const int64_t kn = kc - k0 < kChunk ? kc - k0 : kChunk;
    const bool first = k0 == 0, last = k0 + kn == kc;
    const float* bsrc = B + k0 * ldb;
    if (nr == kTnSmallColsAvx2) {
      for (int64_t k = 0; k < kn; ++k) {
        const float* row = bsrc + k * ldb;
        _mm_prefetch(reinterpret_cast<const char*>(row + 8 * ldb), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(row + 8 * ldb + kTnSmallColsAvx2 - 1), _MM_HINT_T0);
#pragma GCC unroll 4
        for (int h = 0; h < kHalves; ++h) {
          _mm256_store_ps(bbuf[h] + k * 16, _mm256_loadu_ps(row + 16 * h));
          _mm256_store_ps(bbuf[h] + k * 16 + 8, _mm256_loadu_ps(row + 16 * h + 8));
        }
      }
    }
    for (int h = 0; h < kHalves && 16 * h < nr; ++h) {
      const int nh = nr - 16 * h < 16 ? nr - 16 * h : 16;
      const bool copied = nr == kTnSmallColsAvx2;
      const float* b = copied ? bbuf[h] : bsrc + 16 * h;
      const int64_t ldbb = copied ? 16 : ldb;
      for (int t = 0; t < tiles; ++t) {
        const int i0 = 6 * t, r = mr - i0 < 6 ? mr - i0 : 6;
        const float* a = A + k0 * lda + i0;
        float* c = trans ? C + 16 * h * ldc + i0 : C + i0 * ldc + 16 * h;
        float* ac = acc[h][t];
        switch (r) {
          case 6: tn_small<6>(kn, a, lda, b, ldbb, c, ldc, alpha, beta, nh, trans, ac, first, last); break;
          case 5: tn_small<5>(kn, a, lda, b, ldbb, c, ldc, alpha, beta, nh, trans, ac, first, last); break;
          case 4: tn_small<4>(kn, a, lda, b, ldbb, c, ldc, alpha, beta, nh, trans, ac, first, last); break;
          case 3: tn_small<3>(kn, a, lda, b, ldbb, c, ldc, alpha, beta, nh, trans, ac, first, last); break;
          case 2: tn_small<2>(kn, a, lda, b, ldbb, c, ldc, alpha, beta, nh, trans, ac, first, last); break;
          case 1: tn_small<1>(kn, a, lda, b, ldbb, c, ldc, alpha, beta, nh, trans, ac, first, last); break;
          default: break;
        }
      }
    }
  }
}

void pack_b_t_avx2(const float* B, int64_t ldb, int nr, int64_t kc, float* Bp) {
  // 8 columns of op(B) (rows of B) at a time: 8x8 transposes.
  int64_t k0 = 0;
  for (; k0 + 8 <= kc; k0 += 8) {
    for (int g = 0; g < NR / 8; ++g) {
      __m256 r[8];
      for (int i = 0; i < 8; ++i) {
        const int row = g * 8 + i;
        r[i] = row < nr ? _mm256_loadu_ps(B + row * ldb + k0) : _mm256_setzero_ps();
      }
      transpose8(r);
      float* d = Bp + k0 * NR + g * 8;
      for (int i = 0; i < 8; ++i) _mm256_store_ps(d + i * NR, r[i]);
    }
  }
  for (; k0 < kc; ++k0) {
    float* dst = Bp + k0 * NR;
    for (int j = 0; j < NR; ++j) dst[j] = j < nr ? B[j * ldb + k0] : 0.0f;
  }
}

void pack_a_t_avx2(const float* A, int64_t lda, int mr, int64_t kc, float* Ap) {
  static_assert(MR == 6, "6 of the 8 transposed lanes are stored");
  // 8 k at a time: load the mr row runs (rows mr..7 zero), 8x8 transpose, store 6 lanes of each
  // k (the first 7 as whole vectors, each overwritten in its last 2 lanes by the next; the last masked).
  const __m256i keep = _mm256_setr_epi32(-1, -1, -1, -1, -1, -1, 0, 0);
  int64_t k0 = 0;
  for (; k0 + 8 <= kc; k0 += 8) {
    __m256 r[8];
    for (int i = 0; i < 8; ++i) r[i] = i < mr ? _mm256_loadu_ps(A + i * lda + k0) : _mm256_setzero_ps();
    transpose8(r);
    float* d = Ap + k0 * MR;
    for (int i = 0; i < 7; ++i) _mm256_storeu_ps(d + i * MR, r[i]);
    // The last k's 2 spare lanes land on the first 2 slots of k0 + 8, which the next step or the
    // tail writes afterwards; only a last step stores masked (vmaskmovps to memory is slow on AMD).
    if (k0 + 8 < kc) _mm256_storeu_ps(d + 7 * MR, r[7]);
    else _mm256_maskstore_ps(d + 7 * MR, keep, r[7]);
  }
  for (; k0 < kc; ++k0)
    for (int i = 0; i < MR; ++i) Ap[k0 * MR + i] = i < mr ? A[i * lda + k0] : 0.0f;
}

void pack_b_n_avx2(const float* B, int64_t ldb, int nr, int64_t kc, float* Bp) {
  for (int64_t k = 0; k < kc; ++k) {
    float* dst = Bp + k * NR;
    const float* src = B + k * ldb;
    if (nr == NR) {
      _mm256_store_ps(dst, _mm256_loadu_ps(src));
      _mm256_store_ps(dst + 8, _mm256_loadu_ps(src + 8));
    } else {
      std::memcpy(dst, src, sizeof(float) * nr);
      for (int j = nr; j < NR; ++j) dst[j] = 0.0f;
    }
  }
}

void nf4_decode_avx2(const uint8_t* packed, int64_t j0, int64_t len, const float* scale, int bs_log2,
                     const float* codes, float* out) {
  const int64_t b0 = j0 >> bs_log2;
  int64_t t = 0;
  if ((j0 & 15) == 0) {  // 16-element chunks start on a byte and never straddle a block (blocksize >= 32)
    const __m256 lut_lo = _mm256_loadu_ps(codes), lut_hi = _mm256_loadu_ps(codes + 8);
    const __m128i low4 = _mm_set1_epi8(0x0F);
    for (; t + 16 <= len; t += 16) {
      const int64_t j = j0 + t;
      const __m128i x = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(packed + (j >> 1)));  // 8 bytes
      const __m128i hi = _mm_and_si128(_mm_srli_epi16(x, 4), low4), lo = _mm_and_si128(x, low4);
      const __m128i q = _mm_unpacklo_epi8(hi, lo);  // element order: high nibble first
      const __m256 s = _mm256_set1_ps(scale[(j >> bs_log2) - b0]);
      for (int h = 0; h < 2; ++h) {
        const __m256i idx = _mm256_cvtepu8_epi32(h ? _mm_srli_si128(q, 8) : q);
        const __m256 v = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lut_lo, idx), _mm256_permutevar8x32_ps(lut_hi, idx),
                                          _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
        _mm256_storeu_ps(out + t + 8 * h, _mm256_mul_ps(v, s));
      }
    }
  }
  for (; t < len; ++t) {
    const int64_t j = j0 + t;
    const uint8_t byte = packed[j >> 1];
    out[t] = codes[(j & 1) ? (byte & 0x0F) : (byte >> 4)] * scale[(j >> bs_log2) - b0];
  }
}

void nf4_panel_n_avx2(const uint8_t* packed, int64_t f0, int64_t ld, int64_t kc, const float* scale,
                      const float* codes, float* Bp) {
  const __m256 lut_lo = _mm256_loadu_ps(codes), lut_hi = _mm256_loadu_ps(codes + 8);
  const __m128i low4 = _mm_set1_epi8(0x0F);
  // 8 codes (one byte lane group) -> 8 products, stored at dst.
  const auto put8 = [&](__m128i q8, __m256 s, float* dst) {
    const __m256i idx = _mm256_cvtepu8_epi32(q8);
    const __m256 v = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lut_lo, idx), _mm256_permutevar8x32_ps(lut_hi, idx),
                                      _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
    _mm256_store_ps(dst, _mm256_mul_ps(v, s));
  };
  const uint8_t* src = packed + (f0 >> 1);
  const int64_t step = ld >> 1;  // bytes between rows
  int64_t k = 0;
  for (; k + 2 <= kc; k += 2, src += 2 * step) {
    // Rows k and k + 1: 8 bytes each in one xmm, nibbles split once for 32 codes.
    const __m128i x = _mm_unpacklo_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src)),
                                         _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + step)));
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(x, 4), low4), lo = _mm_and_si128(x, low4);
    const __m128i q0 = _mm_unpacklo_epi8(hi, lo), q1 = _mm_unpackhi_epi8(hi, lo);  // high nibble first
    const __m256 s0 = _mm256_set1_ps(scale[k]), s1 = _mm256_set1_ps(scale[k + 1]);
    float* d = Bp + k * NR;
    put8(q0, s0, d);
    put8(_mm_srli_si128(q0, 8), s0, d + 8);
    put8(q1, s1, d + 16);
    put8(_mm_srli_si128(q1, 8), s1, d + 24);
  }
  if (k < kc) {
    const __m128i x = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src));
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(x, 4), low4), lo = _mm_and_si128(x, low4);
    const __m128i q0 = _mm_unpacklo_epi8(hi, lo);
    const __m256 s0 = _mm256_set1_ps(scale[k]);
    put8(q0, s0, Bp + k * NR);
    put8(_mm_srli_si128(q0, 8), s0, Bp + k * NR + 8);
  }
}

}  // namespace qlora::cpu::gemm_k
