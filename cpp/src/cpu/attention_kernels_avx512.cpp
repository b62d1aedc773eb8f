// AVX-512 KV-cache attention block (contract in cpu/attention_kernels.hpp): 16 keys' scores per
// step (16 zmm dot accumulators tree-reduced into one vector), polynomial exp2, and V rows
// broadcast-accumulated into 4 rows x 64 columns of zmm accumulators over 64-key blocks.
// Rules: cpu/README.md (plain functions on raw pointers only).
#include <immintrin.h>

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "cpu/attention_kernels.hpp"

// GCC 12 reports the intrinsics' internal _mm512_undefined_ps() operands as uninitialized.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

namespace qlora::cpu::attn_k {

namespace {
constexpr int64_t kKeyBlock = 64;  // keys per V pass: a 64 x hd slab of V stays in L1 across row groups
constexpr int64_t kPrefetchMaxFloats = 65536;  // V slabs up to 256 KB are prefetched during step 1

__mmask16 lane_mask(int64_t n) {  // first n of 16 lanes (n clamped to [0, 16])
  if (n >= 16) return 0xFFFF;
  if (n <= 0) return 0;
  return static_cast<__mmask16>((1u << n) - 1u);
}

__m512 neg_inf() { return _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int>(0xFF800000u))); }

// 16 K/V elements as fp32: fp32 rows as they are, bf16 rows (uint16 bit patterns) widened exactly
// (the bf16 bits are the high half of the fp32). ldm: the first lanes of m only, no fault past them.
__m512 ld(const float* p) { return _mm512_loadu_ps(p); }
__m512 ld(const uint16_t* p) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
__m512 ldm(__mmask16 m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
__m512 ldm(__mmask16 m, const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

// 2^x for x <= 0; lanes below -126 give 2^-126 (callers zero the lanes of invisible keys).
// x = n + f with n = round(x), |f| <= 1/2 (f exact); 2^f = exp(f ln2) by its degree-7 Taylor
// polynomial (truncation < 8e-9 relative, < 0.1 ulp), Horner with FMA (fp32 coefficients);
// 2^n is exact (exponent bits). Max error, checked exhaustively over every fp32 x in [-126, 0]
// against double exp2: 0.87 ulp.
__m512 exp2_nonpos(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-126.0f));
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(1.5252733646775596e-05f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.0001540352968731895f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.0013333557872101665f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.009618128649890423f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.05550410971045494f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.24022650718688965f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6931471824645996f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

// Horizontal sums of 16 vectors: lane j of the result = sum of the 16 lanes of a[j].
__m512 reduce16(const __m512* a) {
  __m512 v[8];  // v[j]: 128-bit lanes 0,1 hold partial sums of a[j], lanes 2,3 of a[j + 8]
#pragma GCC unroll 8
  for (int j = 0; j < 8; ++j)
    v[j] = _mm512_add_ps(_mm512_shuffle_f32x4(a[j], a[j + 8], 0x44), _mm512_shuffle_f32x4(a[j], a[j + 8], 0xEE));
  // Pairwise sums within 128-bit lanes: [a0+a1, a2+a3, b0+b1, b2+b3] per lane.
  auto hadd = [](__m512 x, __m512 y) {
    return _mm512_add_ps(_mm512_shuffle_ps(x, y, 0x88), _mm512_shuffle_ps(x, y, 0xDD));
  };
  const __m512 u0 = hadd(v[0], v[1]), u1 = hadd(v[2], v[3]), u2 = hadd(v[4], v[5]), u3 = hadd(v[6], v[7]);
  // w0 lane L = [v0, v1, v2, v3] summed over lane L; w1 likewise for v4..v7.
  const __m512 w0 = hadd(u0, u1), w1 = hadd(u2, u3);
  // c = [keys 0-3, keys 8-11, keys 4-7, keys 12-15]; then put the 128-bit lanes in order.
  const __m512 c = _mm512_add_ps(_mm512_shuffle_f32x4(w0, w1, 0x88), _mm512_shuffle_f32x4(w0, w1, 0xDD));
  return _mm512_shuffle_f32x4(c, c, 0xD8);
}

// Lane j = q · K[j] (rows of hd floats) for j < nk (kFull: nk = 16); other lanes 0.
template <bool kFull, class T>
__m512 dot16(const float* q, const T* K, int64_t hd, int nk) {
  __m512 a[16];
#pragma GCC unroll 16
  for (int j = 0; j < 16; ++j) a[j] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= hd; i += 16) {
    const __m512 qv = _mm512_loadu_ps(q + i);
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j)
      if (kFull || j < nk) a[j] = _mm512_fmadd_ps(qv, ld(K + j * hd + i), a[j]);
  }
  if (i < hd) {  // head_dim tail: masked loads (no fault past the row)
    const __mmask16 m = lane_mask(hd - i);
    const __m512 qv = _mm512_maskz_loadu_ps(m, q + i);
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j)
      if (kFull || j < nk) a[j] = _mm512_fmadd_ps(qv, ldm(m, K + j * hd + i), a[j]);
  }
  return reduce16(a);
}

// O[r, 0 : 16*NV] (row stride ldo; last vector masked by `last`) += sum_{s0 <= s < s1} P[r, s] V[s, :]
// for NR rows; P row stride lds, V row stride ldv.
template <int NR, int NV, class T>
void vacc(const float* P, int64_t lds, const T* V, int64_t ldv, int64_t s0, int64_t s1, float* O, int64_t ldo,
          __mmask16 last) {
  __m512 acc[NR][NV];
#pragma GCC unroll 4
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c)
      acc[r][c] = c == NV - 1 ? _mm512_maskz_loadu_ps(last, O + r * ldo + 16 * c)
                              : _mm512_loadu_ps(O + r * ldo + 16 * c);
  for (int64_t s = s0; s < s1; ++s) {
    const T* vs = V + s * ldv;
    __m512 vv[NV];
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) vv[c] = c == NV - 1 ? ldm(last, vs + 16 * c) : ld(vs + 16 * c);
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r) {
      const __m512 w = _mm512_set1_ps(P[r * lds + s]);
#pragma GCC unroll 4
      for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_fmadd_ps(w, vv[c], acc[r][c]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) {
      if (c == NV - 1)
        _mm512_mask_storeu_ps(O + r * ldo + 16 * c, last, acc[r][c]);
      else
        _mm512_storeu_ps(O + r * ldo + 16 * c, acc[r][c]);
    }
}

template <class T>
using VaccFn = void (*)(const float*, int64_t, const T*, int64_t, int64_t, int64_t, float*, int64_t, __mmask16);
template <class T>
constexpr VaccFn<T> kVacc[4][4] = {{vacc<1, 1, T>, vacc<1, 2, T>, vacc<1, 3, T>, vacc<1, 4, T>},
                                   {vacc<2, 1, T>, vacc<2, 2, T>, vacc<2, 3, T>, vacc<2, 4, T>},
                                   {vacc<3, 1, T>, vacc<3, 2, T>, vacc<3, 3, T>, vacc<3, 4, T>},
                                   {vacc<4, 1, T>, vacc<4, 2, T>, vacc<4, 3, T>, vacc<4, 4, T>}};

// T = float (fp32 cache) or uint16_t (bf16 cache, widened on load).
template <class T>
void attn_block(int64_t R, int64_t hd, const float* Qp, const T* K, const T* V, const int32_t* km,
                const int64_t* n_vis, float* S, int64_t lds, float* O) {
  int64_t n_max = 0;
  for (int64_t r = 0; r < R; ++r) n_max = n_vis[r] > n_max ? n_vis[r] : n_max;
  const int64_t n_pad = (n_max + 15) / 16 * 16;
  const __m512 ninf = neg_inf();
  const bool pf_v = n_max * hd <= kPrefetchMaxFloats;

  // 1) Scores (log2 units), -inf for masked keys; each 16-key slab of K is reused from L1 by all rows.
  for (int64_t s0 = 0; s0 < n_max; s0 += 16) {
    const __mmask16 in = lane_mask(n_max - s0);
    const __mmask16 kon =
        _mm512_mask_cmpneq_epi32_mask(in, _mm512_maskz_loadu_epi32(in, km + s0), _mm512_setzero_si512());
    const T* Kb = K + s0 * hd;
    // Decode streams K and V from DRAM: fetching this slab's V rows (read in step 3) now keeps
    // more misses in flight (~10% per decode step); skipped when V would not stay in L2 meanwhile.
    if (pf_v)
      for (int64_t i = s0 * hd; i < (s0 + 16) * hd && i < n_max * hd; i += 64 / sizeof(T))
        _mm_prefetch(reinterpret_cast<const char*>(V + i), _MM_HINT_T1);
    for (int64_t r = 0; r < R; ++r) {
      const int64_t nr = n_vis[r] - s0;
      if (nr <= 0) continue;
      const float* qr = Qp + r * hd;
      const __m512 sc = nr >= 16 ? dot16<true>(qr, Kb, hd, 16) : dot16<false>(qr, Kb, hd, static_cast<int>(nr));
      _mm512_storeu_ps(S + r * lds + s0, _mm512_mask_blend_ps(kon & lane_mask(nr), ninf, sc));
    }
  }

  // 2) Weights 2^(score - max), 0 for invisible keys and up to n_pad; fp32 16-lane denominator.
  float inv[kMaxRows];  // [R] 1 / denominator, 0 for a row that sees no key
  for (int64_t r = 0; r < R; ++r) {
    float* Sr = S + r * lds;
    const int64_t nr = n_vis[r];
    __m512 mv = ninf;
    for (int64_t s0 = 0; s0 < nr; s0 += 16)
      mv = _mm512_mask_max_ps(mv, lane_mask(nr - s0), mv, _mm512_loadu_ps(Sr + s0));
    const float m = _mm512_reduce_max_ps(mv);
    if (!(m >= -__FLT_MAX__)) {  // m == -inf: no visible key
      std::memset(Sr, 0, sizeof(float) * n_pad);
      inv[r] = 0.0f;
      continue;
    }
    const __m512 mb = _mm512_set1_ps(m);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t s0 = 0; s0 < n_pad; s0 += 16) {
      if (s0 >= nr) {
        _mm512_storeu_ps(Sr + s0, _mm512_setzero_ps());
        continue;
      }
      const __m512 x = _mm512_loadu_ps(Sr + s0);
      const __mmask16 ok = _mm512_cmp_ps_mask(x, ninf, _CMP_NEQ_OQ) & lane_mask(nr - s0);
      const __m512 p = _mm512_maskz_mov_ps(ok, exp2_nonpos(_mm512_sub_ps(x, mb)));
      _mm512_storeu_ps(Sr + s0, p);
      sum = _mm512_add_ps(sum, p);
    }
    inv[r] = 1.0f / _mm512_reduce_add_ps(sum);  // >= 1: the max key has weight exactly 1
  }

  // 3) O = P · V over 64-key slabs, 4 rows x 64 columns of accumulators per pass; then normalize.
  std::memset(O, 0, sizeof(float) * R * hd);
  for (int64_t kb = 0; kb < n_max; kb += kKeyBlock) {
    for (int64_t r0 = 0; r0 < R; r0 += 4) {
      const int64_t nrw = R - r0 < 4 ? R - r0 : 4;
      int64_t ng = 0;
      for (int64_t r = r0; r < r0 + nrw; ++r) ng = n_vis[r] > ng ? n_vis[r] : ng;
      const int64_t ke = kb + kKeyBlock < ng ? kb + kKeyBlock : ng;
      if (ke <= kb) continue;
      for (int64_t c0 = 0; c0 < hd; c0 += 64) {
        const int64_t nc = hd - c0 < 64 ? hd - c0 : 64, nv = (nc + 15) / 16;
        kVacc<T>[nrw - 1][nv - 1](S + r0 * lds, lds, V + c0, hd, kb, ke, O + r0 * hd + c0, hd,
                               lane_mask(nc - 16 * (nv - 1)));
      }
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    const __m512 iv = _mm512_set1_ps(inv[r]);
    float* o = O + r * hd;
    for (int64_t i = 0; i < hd; i += 16) {
      const __mmask16 m = lane_mask(hd - i);
      _mm512_mask_storeu_ps(o + i, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, o + i), iv));
    }
  }
}
}  // namespace

void attn_block_avx512(int64_t R, int64_t hd, const float* Qp, const float* K, const float* V, const int32_t* km,
                       const int64_t* n_vis, float* S, int64_t lds, float* O) {
  attn_block<float>(R, hd, Qp, K, V, km, n_vis, S, lds, O);
}
void attn_block_avx512_bf16(int64_t R, int64_t hd, const float* Qp, const uint16_t* K, const uint16_t* V,
                            const int32_t* km, const int64_t* n_vis, float* S, int64_t lds, float* O) {
  attn_block<uint16_t>(R, hd, Qp, K, V, km, n_vis, S, lds, O);
}

}  // namespace qlora::cpu::attn_k
