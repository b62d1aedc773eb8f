// AVX-512 GEMM building blocks: a 14x32 register-tiled FMA micro-kernel (28 zmm accumulators),
// 16x16 in-register transposes for packing [N, K] weights, and an NF4 nibble decoder (vpermps on
// the 16-entry code table). Rules: cpu/README.md (plain functions on raw pointers only).
#include <immintrin.h>

#include <cstddef>
#include <cstdint>

#include "cpu/gemm_kernels.hpp"
#include "cpu/transpose16_avx512.hpp"

// GCC 12 reports the intrinsics' internal _mm512_undefined_ps() operands as uninitialized.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

namespace qlora::cpu::gemm_k {

namespace {
constexpr int MR = kAvx512MR, NR = kAvx512NR;
static_assert(NR == 32, "the AVX-512 kernel holds two zmm columns per row");

__mmask16 lane_mask(int n) {  // first n of 16 lanes (n clamped to [0, 16])
  if (n >= 16) return 0xFFFF;
  if (n <= 0) return 0;
  return static_cast<__mmask16>((1u << n) - 1u);
}

// Direct: A read in place, element (i, k) at Ap[i * rs + k * cs] (ukernel_direct); else the
// packed panel Ap[k * MR + i].
template <int R, bool Direct = false>
void ukr_half(int64_t kc, const float* Ap, const float* Bp, float* C, int64_t ldc, float alpha, float beta, int nr,
              int64_t rs, int64_t cs) {
  __m512 c0[R];
#pragma GCC unroll 14
  for (int i = 0; i < R; ++i) c0[i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    const __m512 b0 = _mm512_load_ps(Bp);
#pragma GCC unroll 14
    for (int i = 0; i < R; ++i) c0[i] = _mm512_fmadd_ps(_mm512_set1_ps(Direct ? Ap[i * rs] : Ap[i]), b0, c0[i]);
    Ap += Direct ? cs : MR;
    Bp += NR;
  }
  const __mmask16 m0 = lane_mask(nr);
  const __m512 va = _mm512_set1_ps(alpha);
  if (beta == 0.0f) {
#pragma GCC unroll 14
    for (int i = 0; i < R; ++i) _mm512_mask_storeu_ps(C + i * ldc, m0, _mm512_mul_ps(va, c0[i]));
  } else {
    const __m512 vb = _mm512_set1_ps(beta);
#pragma GCC unroll 14
    for (int i = 0; i < R; ++i) {
      float* c = C + i * ldc;
      _mm512_mask_storeu_ps(c, m0, _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(m0, c), _mm512_mul_ps(va, c0[i])));
    }
  }
}

template <int R, bool Direct = false>
void ukr(int64_t kc, const float* Ap, const float* Bp, float* C, int64_t ldc, float alpha, float beta, int nr,
         int64_t rs = 1, int64_t cs = MR) {
  if (nr <= 16) return ukr_half<R, Direct>(kc, Ap, Bp, C, ldc, alpha, beta, nr, rs, cs);
  __m512 c0[R], c1[R];
#pragma GCC unroll 14
  for (int i = 0; i < R; ++i) {
    c0[i] = c1[i] = _mm512_setzero_ps();
    // C is touched only at the end: start fetching it now (it is often in L3 between depth blocks).
    _mm_prefetch(reinterpret_cast<const char*>(C + i * ldc), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(C + i * ldc + 31), _MM_HINT_T0);
  }
  for (int64_t k = 0; k < kc; ++k) {
    const __m512 b0 = _mm512_load_ps(Bp), b1 = _mm512_load_ps(Bp + 16);
#pragma GCC unroll 14
    for (int i = 0; i < R; ++i) {
      const __m512 a = _mm512_set1_ps(Direct ? Ap[i * rs] : Ap[i]);
      c0[i] = _mm512_fmadd_ps(a, b0, c0[i]);
      c1[i] = _mm512_fmadd_ps(a, b1, c1[i]);
    }
    Ap += Direct ? cs : MR;
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

}  // namespace

namespace {
// ukr<mr, Direct> for a run-time mr = 1..14 (others: nothing).
template <bool Direct>
void ukr_rows(int64_t kc, const float* Ap, const float* Bp, float* C, int64_t ldc, float alpha, float beta, int mr,
              int nr, int64_t rs, int64_t cs) {
  switch (mr) {
    case 14: return ukr<14, Direct>(kc, Ap, Bp, C, ldc, alpha, beta, nr, rs, cs);
    case 13: return ukr<13, Direct>(kc, Ap, Bp, C, ldc, alpha, beta, nr, rs, cs);
    case 12: return ukr<12, Direct>(kc, Ap, Bp, C, ldc, alpha, beta, nr, rs, cs);
    case 11: return ukr<11, Direct>(kc, Ap, Bp, C, ldc, alpha, beta, nr, rs, cs);
    case 10: return ukr<10, Direct>(kc, Ap, Bp, C, ldc, alpha, beta, nr, rs, cs);
    case 9: return ukr<9, Direct>(kc, Ap, Bp, C, ldc, alpha, beta, nr, rs, cs);
    case 8: return ukr<8, Direct>(kc, Ap, Bp, C, ldc, alpha, beta, nr, rs, cs);
    case 7: return ukr<7, Direct>(kc, Ap, Bp, C, ldc, alpha, beta, nr, rs, cs);
    case 6: return ukr<6, Direct>(kc, Ap, Bp, C, ldc, alpha, beta, nr, rs, cs);
    case 5: return ukr<5, Direct>(kc, Ap, Bp, C, ldc, alpha, beta, nr, rs, cs);
    case 4: return ukr<4, Direct>(kc, Ap, Bp, C, ldc, alpha, beta, nr, rs, cs);
    case 3: return ukr<3, Direct>(kc, Ap, Bp, C, ldc, alpha, beta, nr, rs, cs);
    case 2: return ukr<2, Direct>(kc, Ap, Bp, C, ldc, alpha, beta, nr, rs, cs);
    case 1: return ukr<1, Direct>(kc, Ap, Bp, C, ldc, alpha, beta, nr, rs, cs);
    default: return;
  }
}
}  // namespace

void ukernel_avx512(int64_t kc, const float* Ap, const float* Bp, float* C, int64_t ldc, float alpha, float beta,
                    int mr, int nr) {
  ukr_rows<false>(kc, Ap, Bp, C, ldc, alpha, beta, mr, nr, 1, MR);
}

void ukernel_direct_avx512(int64_t kc, const float* A, int64_t rs, int64_t cs, const float* Bp, float* C, int64_t ldc,
                           float alpha, float beta, int mr, int nr) {
  ukr_rows<true>(kc, A, Bp, C, ldc, alpha, beta, mr, nr, rs, cs);
}

namespace {
// 8 rows x 32 columns: each broadcast of A feeds two FMAs (one per 16-column half), as in ukr.
// acc [R][32]: the running sums between k chunks (first: start from 0; not last: store them and
// return); storing and reloading a float sum is exact, so the FMA chain is that of one pass.
// InPlace: B is the wide operand itself (prefetched a few rows ahead), else a contiguous copy.
template <int R, bool InPlace>
void tn_small(int64_t kc, const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc, float alpha,
              float beta, int nr, bool trans, float* acc, bool first, bool last) {
  __m512 c0[8], c1[8];
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i) {
    c0[i] = first ? _mm512_setzero_ps() : _mm512_load_ps(acc + i * 32);
    c1[i] = first ? _mm512_setzero_ps() : _mm512_load_ps(acc + i * 32 + 16);
  }
  const __mmask16 m0 = lane_mask(nr), m1 = lane_mask(nr - 16);
  for (int64_t k = 0; k < kc; ++k) {
    if constexpr (InPlace) {
      // B's rows are far apart (a wide matrix read 128 bytes per row): fetch them a few rows ahead.
      _mm_prefetch(reinterpret_cast<const char*>(B + (k + 16) * ldb), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(B + (k + 16) * ldb + 16), _MM_HINT_T0);
    }
    const __m512 b0 = _mm512_maskz_loadu_ps(m0, B + k * ldb), b1 = _mm512_maskz_loadu_ps(m1, B + k * ldb + 16);
    const float* a = A + k * lda;
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      const __m512 ai = _mm512_set1_ps(a[i]);
      c0[i] = _mm512_fmadd_ps(ai, b0, c0[i]);
      c1[i] = _mm512_fmadd_ps(ai, b1, c1[i]);
    }
  }
  if (!last) {
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      _mm512_store_ps(acc + i * 32, c0[i]);
      _mm512_store_ps(acc + i * 32 + 16, c1[i]);
    }
    return;
  }
  const __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);
  if (!trans) {
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      float* c = C + i * ldc;
      const __m512 x0 = _mm512_mul_ps(va, c0[i]), x1 = _mm512_mul_ps(va, c1[i]);
      _mm512_mask_storeu_ps(c, m0, beta == 0.0f ? x0 : _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(m0, c), x0));
      _mm512_mask_storeu_ps(c + 16, m1, beta == 0.0f ? x1 : _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(m1, c + 16), x1));
    }
    return;
  }
  // C[j * ldc + i]: transpose each 16-column half (rows i >= R zero); row j then holds column j.
  const __mmask16 mi = lane_mask(R);
  for (int h = 0; h < 2; ++h) {
    __m512 r[16];
    for (int i = 0; i < 16; ++i) r[i] = i < R ? _mm512_mul_ps(va, h == 0 ? c0[i] : c1[i]) : _mm512_setzero_ps();
    transpose16(r);
    for (int j = 0; j < 16 && h * 16 + j < nr; ++j) {
      float* c = C + (h * 16 + j) * ldc;
      _mm512_mask_storeu_ps(c, mi, beta == 0.0f ? r[j] : _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(mi, c), r[j]));
    }
  }
}

template <bool InPlace>
void tn_small_rows(int64_t kc, const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
                   float alpha, float beta, int mr, int nr, bool trans, float* acc, bool first, bool last) {
  switch (mr) {
    case 8: return tn_small<8, InPlace>(kc, A, lda, B, ldb, C, ldc, alpha, beta, nr, trans, acc, first, last);
    case 7: return tn_small<7, InPlace>(kc, A, lda, B, ldb, C, ldc, alpha, beta, nr, trans, acc, first, last);
    case 6: return tn_small<6, InPlace>(kc, A, lda, B, ldb, C, ldc, alpha, beta, nr, trans, acc, first, last);
    case 5: return tn_small<5, InPlace>(kc, A, lda, B, ldb, C, ldc, alpha, beta, nr, trans, acc, first, last);
    case 4: return tn_small<4, InPlace>(kc, A, lda, B, ldb, C, ldc, alpha, beta, nr, trans, acc, first, last);
    case 3: return tn_small<3, InPlace>(kc, A, lda, B, ldb, C, ldc, alpha, beta, nr, trans, acc, first, last);
    case 2: return tn_small<2, InPlace>(kc, A, lda, B, ldb, C, ldc, alpha, beta, nr, trans, acc, first, last);
    case 1: return tn_small<1, InPlace>(kc, A, lda, B, ldb, C, ldc, alpha, beta, nr, trans, acc, first, last);
    default: return;
  }
}
}  // namespace

void tn_small_avx512(int64_t kc, const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
                     float alpha, float beta, int mr, int nr, bool trans) {
  alignas(64) float acc[8 * 32];  // never read or written (one pass: first and last); a null pointer
                                  // here made GCC 12 warn -Warray-bounds on the unreached loads
  tn_small_rows<true>(kc, A, lda, B, ldb, C, ldc, alpha, beta, mr, nr, trans, acc, true, true);
}

void tn_small_copy_avx512(int64_t kc, const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
                          float alpha, float beta, int mr, int nr, bool trans) {
  // All mr <= kTnSmallRowsCopy rows of a strip of nr <= kTnSmallColsCopy columns, k in chunks of
  // kChunk rows of B's strip copied contiguous first (tn_small_avx2's scheme): the in-place kernel
  // visits each wide B row once per 8-row tile and 32 columns, a page and TLB entry per row at
  // 6 KiB rows (1536 columns); the copy visits it once per strip, then every tile reads L1.
  constexpr int kHalves = kTnSmallColsCopy / 32;
  constexpr int64_t kChunk = 64;  // 64 rows x 64 columns: 16 KiB of B
  alignas(64) float acc[kHalves][kTnSmallRowsCopy / 8][8 * 32];
  alignas(64) float bbuf[kHalves][kChunk * 32];
  const int tiles = (mr + 7) / 8;
  for (int64_t k0 = 0; k0 < kc; k0 += kChunk) {
    const int64_t kn = kc - k0 < kChunk ? kc - k0 : kChunk;
    const bool first = k0 == 0, last = k0 + kn == kc;
    const float* bsrc = B + k0 * ldb;
    for (int64_t k = 0; k < kn; ++k) {
      const float* row = bsrc + k * ldb;
      _mm_prefetch(reinterpret_cast<const char*>(row + 8 * ldb), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(row + 8 * ldb + kTnSmallColsCopy - 1), _MM_HINT_T0);
#pragma GCC unroll 2
      for (int h = 0; h < kHalves; ++h) {
        const __mmask16 m0 = lane_mask(nr - 32 * h), m1 = lane_mask(nr - 32 * h - 16);
        _mm512_store_ps(bbuf[h] + k * 32, _mm512_maskz_loadu_ps(m0, row + 32 * h));
        _mm512_store_ps(bbuf[h] + k * 32 + 16, _mm512_maskz_loadu_ps(m1, row + 32 * h + 16));
      }
    }
    for (int h = 0; h < kHalves && 32 * h < nr; ++h) {
      const int nh = nr - 32 * h < 32 ? nr - 32 * h : 32;
      for (int t = 0; t < tiles; ++t) {
        const int i0 = 8 * t, r = mr - i0 < 8 ? mr - i0 : 8;
        float* c = trans ? C + 32 * h * ldc + i0 : C + i0 * ldc + 32 * h;
        tn_small_rows<false>(kn, A + k0 * lda + i0, lda, bbuf[h], 32, c, ldc, alpha, beta, r, nh, trans, acc[h][t],
                             first, last);
      }
    }
  }
}

namespace {
// R rows x 48 columns: each broadcast of A (read in place) feeds three FMAs; 3R + 3 + 1 zmm live.
template <int R>
void ukr48(int64_t kc, const float* A, int64_t lda, const float* Bp, float* C, int64_t ldc, float alpha, float beta,
           int nr) {
  __m512 c0[R], c1[R], c2[R];
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i) c0[i] = c1[i] = c2[i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    const __m512 b0 = _mm512_load_ps(Bp), b1 = _mm512_load_ps(Bp + 16), b2 = _mm512_load_ps(Bp + 32);
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      const __m512 a = _mm512_set1_ps(A[i * lda + k]);
      c0[i] = _mm512_fmadd_ps(a, b0, c0[i]);
      c1[i] = _mm512_fmadd_ps(a, b1, c1[i]);
      c2[i] = _mm512_fmadd_ps(a, b2, c2[i]);
    }
    Bp += 48;
  }
  const __mmask16 m0 = lane_mask(nr), m1 = lane_mask(nr - 16), m2 = lane_mask(nr - 32);
  const __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i) {  // ukr's epilogue per 16-lane group
    float* c = C + i * ldc;
    const __m512 x0 = _mm512_mul_ps(va, c0[i]), x1 = _mm512_mul_ps(va, c1[i]), x2 = _mm512_mul_ps(va, c2[i]);
    if (beta == 0.0f) {
      _mm512_mask_storeu_ps(c, m0, x0);
      _mm512_mask_storeu_ps(c + 16, m1, x1);
      _mm512_mask_storeu_ps(c + 32, m2, x2);
    } else {
      _mm512_mask_storeu_ps(c, m0, _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(m0, c), x0));
      _mm512_mask_storeu_ps(c + 16, m1, _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(m1, c + 16), x1));
      _mm512_mask_storeu_ps(c + 32, m2, _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(m2, c + 32), x2));
    }
  }
}
}  // namespace

void pack_b_t48_avx512(const float* B, int64_t ldb, int nr, int64_t kc, float* Bp) {
  // pack_b_t_avx512 with 48-float rows: 16 x 16 transposes of B's [nr, kc] row runs.
  int64_t k0 = 0;
  for (; k0 + 16 <= kc; k0 += 16) {
    for (int g = 0; g < 3; ++g) {
      __m512 r[16];
      for (int i = 0; i < 16; ++i) {
        const int row = g * 16 + i;
        r[i] = row < nr ? _mm512_loadu_ps(B + row * ldb + k0) : _mm512_setzero_ps();
      }
      transpose16(r);
      for (int i = 0; i < 16; ++i) _mm512_store_ps(Bp + (k0 + i) * 48 + g * 16, r[i]);
    }
  }
  for (; k0 < kc; ++k0)
    for (int j = 0; j < 48; ++j) Bp[k0 * 48 + j] = j < nr ? B[j * ldb + k0] : 0.0f;
}

void skinny48_avx512(int64_t kc, const float* A, int64_t lda, const float* Bp, float* C, int64_t ldc, float alpha,
                     float beta, int mr, int nr) {
  switch (mr) {
    case 8: return ukr48<8>(kc, A, lda, Bp, C, ldc, alpha, beta, nr);
    case 7: return ukr48<7>(kc, A, lda, Bp, C, ldc, alpha, beta, nr);
    case 6: return ukr48<6>(kc, A, lda, Bp, C, ldc, alpha, beta, nr);
    case 5: return ukr48<5>(kc, A, lda, Bp, C, ldc, alpha, beta, nr);
    case 4: return ukr48<4>(kc, A, lda, Bp, C, ldc, alpha, beta, nr);
    case 3: return ukr48<3>(kc, A, lda, Bp, C, ldc, alpha, beta, nr);
    case 2: return ukr48<2>(kc, A, lda, Bp, C, ldc, alpha, beta, nr);
    case 1: return ukr48<1>(kc, A, lda, Bp, C, ldc, alpha, beta, nr);
    default: return;
  }
}

void pack_b_t_avx512(const float* B, int64_t ldb, int nr, int64_t kc, float* Bp) {
  int64_t k0 = 0;
  for (; k0 + 16 <= kc; k0 += 16) {
    for (int g = 0; g < NR / 16; ++g) {
      __m512 r[16];
      if (g * 16 >= nr) {
        for (int i = 0; i < 16; ++i) _mm512_store_ps(Bp + (k0 + i) * NR + g * 16, _mm512_setzero_ps());
        continue;
      }
      for (int i = 0; i < 16; ++i) {
        const int row = g * 16 + i;
        r[i] = row < nr ? _mm512_loadu_ps(B + row * ldb + k0) : _mm512_setzero_ps();
      }
      transpose16(r);
      for (int i = 0; i < 16; ++i) _mm512_store_ps(Bp + (k0 + i) * NR + g * 16, r[i]);
    }
  }
  for (; k0 < kc; ++k0) {
    float* dst = Bp + k0 * NR;
    for (int j = 0; j < NR; ++j) dst[j] = j < nr ? B[j * ldb + k0] : 0.0f;
  }
}

void pack_a_t_avx512(const float* A, int64_t lda, int mr, int64_t kc, float* Ap) {
  // 16 k at a time: load mr row runs, transpose, store 16 rows of MR (= 14) lanes.
  const __mmask16 keep = lane_mask(MR);
  int64_t k0 = 0;
  for (; k0 + 16 <= kc; k0 += 16) {
    __m512 r[16];
    for (int i = 0; i < 16; ++i) r[i] = i < mr ? _mm512_loadu_ps(A + i * lda + k0) : _mm512_setzero_ps();
    transpose16(r);
    for (int i = 0; i < 16; ++i) _mm512_mask_storeu_ps(Ap + (k0 + i) * MR, keep, r[i]);
  }
  for (; k0 < kc; ++k0)
    for (int i = 0; i < MR; ++i) Ap[k0 * MR + i] = i < mr ? A[i * lda + k0] : 0.0f;
}

void pack_b_n_avx512(const float* B, int64_t ldb, int nr, int64_t kc, float* Bp) {
  const __mmask16 m0 = lane_mask(nr), m1 = lane_mask(nr - 16);
  for (int64_t k = 0; k < kc; ++k) {
    const float* src = B + k * ldb;
    _mm512_store_ps(Bp + k * NR, _mm512_maskz_loadu_ps(m0, src));
    _mm512_store_ps(Bp + k * NR + 16, _mm512_maskz_loadu_ps(m1, src + 16));
  }
}

void nf4_decode_avx512(const uint8_t* packed, int64_t j0, int64_t len, const float* scale, int bs_log2,
                       const float* codes, float* out) {
  const int64_t b0 = j0 >> bs_log2;
  int64_t t = 0;
  if ((j0 & 15) == 0) {  // 16-element chunks start on a byte and never straddle a block (blocksize >= 32)
    const __m512 lut = _mm512_loadu_ps(codes);
    const __m128i low4 = _mm_set1_epi8(0x0F);
    for (; t + 16 <= len; t += 16) {
      const int64_t j = j0 + t;
      const __m128i x = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(packed + (j >> 1)));  // 8 bytes
      const __m128i hi = _mm_and_si128(_mm_srli_epi16(x, 4), low4), lo = _mm_and_si128(x, low4);
      const __m128i q = _mm_unpacklo_epi8(hi, lo);  // element order: high nibble first
      const __m512 v = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(q), lut);
      _mm512_storeu_ps(out + t, _mm512_mul_ps(v, _mm512_set1_ps(scale[(j >> bs_log2) - b0])));
    }
  }
  for (; t < len; ++t) {  // tail, or runs not starting on a 16-element boundary
    const int64_t j = j0 + t;
    const uint8_t byte = packed[j >> 1];
    out[t] = codes[(j & 1) ? (byte & 0x0F) : (byte >> 4)] * scale[(j >> bs_log2) - b0];
  }
}

}  // namespace qlora::cpu::gemm_k
