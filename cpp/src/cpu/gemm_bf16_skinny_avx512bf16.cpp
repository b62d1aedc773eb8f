// AVX512-BF16 28x16 micro-kernel of the few-column bf16 GEMM (cpu/gemm_bf16_skinny.hpp): one zmm
// of 16 fp32 columns per row, 28 rows, one broadcast A pair per vdpbf16ps. Compiled with
// -mavx512bf16 (CMake: *_avx512bf16.cpp); called only after cpu_has_avx512_bf16().
#include <immintrin.h>

#include <cstdint>

#include "cpu/gemm_bf16_skinny_kernels.hpp"
#include "cpu/simd_reduce_avx512.hpp"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

namespace qlora::cpu::bf16_k {

namespace {
constexpr int MR = kSkinnyMR;
// Software prefetch distance of the streamed rows of A, in floats (2 KiB ahead: the training
// pass's A is cold in cache and the hardware prefetcher alone left the row-dot at ~60% of the
// fp32 kernel's stream rate). Past a row's end it fetches the next row's start (no fault).
constexpr int64_t kPrefetch = 512;

__mmask16 lane_mask(int64_t n) {  // first n of 16 lanes, n clamped to [0, 16]
  if (n >= 16) return 0xFFFF;
  if (n <= 0) return 0;
  return static_cast<__mmask16>((1u << n) - 1u);
}

// 32 k of a row (rem valid floats, the rest zero) as 16 bf16 pairs (RNE).
__m512bh pairs32(const float* s, int64_t rem) {
  if (rem >= 32) return _mm512_cvtne2ps_pbh(_mm512_loadu_ps(s + 16), _mm512_loadu_ps(s));
  return _mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(lane_mask(rem - 16), s + 16), _mm512_maskz_loadu_ps(lane_mask(rem), s));
}

template <int R>
void ukr(int64_t kp, const uint32_t* Ap, const uint32_t* Bp, float* C, int64_t ldc, float alpha, float beta, int nr) {
  __m512 c[R];
#pragma GCC unroll 28
  for (int i = 0; i < R; ++i) c[i] = _mm512_setzero_ps();
  for (int64_t p = 0; p < kp; ++p) {
    const __m512bh b = (__m512bh)_mm512_load_si512(Bp);
#pragma GCC unroll 28
    for (int i = 0; i < R; ++i)
      c[i] = _mm512_dpbf16_ps(c[i], (__m512bh)_mm512_set1_epi32(static_cast<int>(Ap[i])), b);
    Ap += MR;
    Bp += 16;
  }
  const __mmask16 m = lane_mask(nr);
  const __m512 va = _mm512_set1_ps(alpha);
  if (beta == 0.0f) {
#pragma GCC unroll 28
    for (int i = 0; i < R; ++i) _mm512_mask_storeu_ps(C + i * ldc, m, _mm512_mul_ps(va, c[i]));
  } else {
    const __m512 vb = _mm512_set1_ps(beta);
#pragma GCC unroll 28
    for (int i = 0; i < R; ++i) {
      float* ci = C + i * ldc;
      _mm512_mask_storeu_ps(ci, m, _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(m, ci), _mm512_mul_ps(va, c[i])));
    }
  }
}

using Fn = void (*)(int64_t, const uint32_t*, const uint32_t*, float*, int64_t, float, float, int);
template <int... R>
struct Table {
  static constexpr Fn fn[sizeof...(R)] = {&ukr<R + 1>...};
};
template <int... R>
constexpr Fn Table<R...>::fn[sizeof...(R)];
using Kernels = Table<0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25,
                      26, 27>;
static_assert(sizeof(Kernels::fn) / sizeof(Fn) == MR, "one kernel per row count");
}  // namespace

void pack_w16_avx512bf16(const float* src, int64_t ld, int n, int64_t K, int64_t kq, uint32_t* W) {
  for (int j = 0; j < 16; ++j)
    for (int64_t k = 0, q = 0; q < kq; k += 32, q += 16) {
      const __m512i v = j < n && k < K ? (__m512i)pairs32(src + j * ld + k, K - k) : _mm512_setzero_si512();
      _mm512_store_si512(W + j * kq + q, v);
    }
}

void rowdot16x1_avx512bf16(int64_t m, int64_t K, const float* X, int64_t ldx, const uint32_t* W, int64_t kq, float* C,
                           int64_t ldc, float alpha, float beta, int n) {
  // One row x 16 columns: 16 W loads per 16 vdpbf16ps, from L1: for K > 1024 the k range runs in
  // blocks of 512 (a 16 KiB W block) over 8 rows at a time, the rows' accumulators parked in buf
  // between blocks (stored and reloaded exactly: the sums are those of one unblocked pass).
  const __mmask16 mask = lane_mask(n);
  const __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);
  const int64_t kb = K <= 1024 ? K : 512;
  alignas(64) float buf[8 * 16 * 16];
  for (int64_t i0 = 0; i0 < m; i0 += 8) {
    const int64_t rows = m - i0 < 8 ? m - i0 : 8;
    for (int64_t k0 = 0; k0 < K; k0 += kb) {
      const int64_t k1 = K - k0 < kb ? K : k0 + kb;
      for (int64_t r = 0; r < rows; ++r) {
        const float* x = X + (i0 + r) * ldx;
        float* park = buf + r * 256;
        __m512 acc[16];
#pragma GCC unroll 16
        for (int j = 0; j < 16; ++j) acc[j] = k0 == 0 ? _mm512_setzero_ps() : _mm512_load_ps(park + 16 * j);
        for (int64_t k = k0, q = k0 / 2; k < k1; k += 32, q += 16) {
          _mm_prefetch(reinterpret_cast<const char*>(x + k + kPrefetch), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(x + k + kPrefetch + 16), _MM_HINT_T0);
          const __m512bh xp = pairs32(x + k, K - k);
#pragma GCC unroll 16
          for (int j = 0; j < 16; ++j)
            acc[j] = _mm512_dpbf16_ps(acc[j], xp, (__m512bh)_mm512_load_si512(W + j * kq + q));
        }
        if (k1 < K) {
#pragma GCC unroll 16
          for (int j = 0; j < 16; ++j) _mm512_store_ps(park + 16 * j, acc[j]);
          continue;
        }
        const __m512 s = _mm512_mul_ps(va, hsum16(acc));
        float* c = C + (i0 + r) * ldc;
        if (beta == 0.0f) _mm512_mask_storeu_ps(c, mask, s);
        else _mm512_mask_storeu_ps(c, mask, _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(mask, c), s));
      }
    }
  }
}

void rowdot16_avx512bf16(int64_t m, int64_t K, const float* X, int64_t ldx, const uint32_t* W, int64_t kq, float* C,
                         int64_t ldc, float alpha, float beta, int n) {
  // Two rows x 8 columns per pass (16 accumulators: one hsum16 tree; each W load feeds two
  // vdpbf16ps, so a W panel that does not fit L1 (K > ~1000) streams from L2 at half the rate).
  const __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);
  for (int64_t i = 0; i < m; i += 2) {
    const bool two = i + 1 < m;
    const float* x0 = X + i * ldx;
    const float* x1 = two ? x0 + ldx : x0;
    for (int h = 0; h * 8 < n; ++h) {
      const uint32_t* w = W + h * 8 * kq;
      __m512 acc[16];
#pragma GCC unroll 16
      for (int j = 0; j < 16; ++j) acc[j] = _mm512_setzero_ps();
      for (int64_t k = 0, q = 0; k < K; k += 32, q += 16) {
        _mm_prefetch(reinterpret_cast<const char*>(x0 + k + kPrefetch), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(x0 + k + kPrefetch + 16), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(x1 + k + kPrefetch), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(x1 + k + kPrefetch + 16), _MM_HINT_T0);
        const __m512bh p0 = pairs32(x0 + k, K - k), p1 = pairs32(x1 + k, K - k);
#pragma GCC unroll 8
        for (int j = 0; j < 8; ++j) {
          const __m512bh wj = (__m512bh)_mm512_load_si512(w + j * kq + q);
          acc[j] = _mm512_dpbf16_ps(acc[j], p0, wj);
          acc[8 + j] = _mm512_dpbf16_ps(acc[8 + j], p1, wj);
        }
      }
      const __m512 s = _mm512_mul_ps(va, hsum16(acc));  // lanes 0..7: row i, 8..15: row i + 1
      const __mmask16 mk = lane_mask(n - h * 8 < 8 ? n - h * 8 : 8);
      float* c0 = C + i * ldc + h * 8;
      const __m512 s1 = _mm512_shuffle_f32x4(s, s, _MM_SHUFFLE(3, 2, 3, 2));
      if (beta == 0.0f) {
        _mm512_mask_storeu_ps(c0, mk, s);
        if (two) _mm512_mask_storeu_ps(c0 + ldc, mk, s1);
      } else {
        _mm512_mask_storeu_ps(c0, mk, _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(mk, c0), s));
        if (two) _mm512_mask_storeu_ps(c0 + ldc, mk, _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(mk, c0 + ldc), s1));
      }
    }
  }
}

void ukernel16_avx512bf16(int64_t kp, const uint32_t* Ap, const uint32_t* Bp, float* C, int64_t ldc, float alpha,
                          float beta, int mr, int nr) {
  if (mr >= 1 && mr <= MR && nr >= 1) Kernels::fn[mr - 1](kp, Ap, Bp, C, ldc, alpha, beta, nr);
}

}  // namespace qlora::cpu::bf16_k
