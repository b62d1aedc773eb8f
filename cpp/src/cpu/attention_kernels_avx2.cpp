// AVX2+FMA KV-cache attention block (contract in cpu/attention_kernels.hpp): 8 keys' scores per
// step (8 ymm dot accumulators reduced with hadd), polynomial exp2, and V rows
// broadcast-accumulated into 4 rows x 16 columns of ymm accumulators over 64-key blocks.
// Rules: cpu/README.md (plain functions on raw pointers only).
#include <immintrin.h>

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "cpu/attention_kernels.hpp"

namespace qlora::cpu::attn_k {

namespace {
constexpr int64_t kKeyBlock = 64;  // keys per V pass: a 64 x hd slab of V stays in L1 across row groups
constexpr int64_t kPrefetchMaxFloats = 65536;  // V slabs up to 256 KB are prefetched during step 1

alignas(32) constexpr int32_t kMaskTable[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};

__m256i lane_mask(int64_t n) {  // first n of 8 lanes all-ones (n clamped to [0, 8])
  n = n < 0 ? 0 : (n > 8 ? 8 : n);
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kMaskTable + 8 - n));
}

__m256 neg_inf() { return _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int>(0xFF800000u))); }

// 8 K/V elements as fp32: fp32 rows as they are, bf16 rows (uint16 bit patterns) widened exactly
// (the bf16 bits are the high half of the fp32). ldm: only the lanes of m (a lane_mask prefix),
// nothing read past them (AVX2 has no 16-bit masked load: a tail goes through a zeroed buffer).
__m256 ld(const float* p) { return _mm256_loadu_ps(p); }
__m256 ld(const uint16_t* p) {
  return _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}
__m256 ldm(__m256i m, const float* p) { return _mm256_maskload_ps(p, m); }
__m256 ldm(__m256i m, const uint16_t* p) {
  alignas(16) uint16_t buf[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  std::memcpy(buf, p, sizeof(uint16_t) * __builtin_popcount(_mm256_movemask_ps(_mm256_castsi256_ps(m))));
  return ld(buf);
}

// 2^x for x <= 0: same method and error as the AVX-512 exp2_nonpos (< 1 ulp; lanes below -126 give
// 2^-126, callers zero the lanes of invisible keys).
__m256 exp2_nonpos(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-126.0f));
  const __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(x, n);
  __m256 p = _mm256_set1_ps(1.5252733646775596e-05f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.0001540352968731895f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.0013333557872101665f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.009618128649890423f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.05550410971045494f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.24022650718688965f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.6931471824645996f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

// Lane j = q · K[j] (rows of hd floats) for j < nk (kFull: nk = 8); other lanes 0.
template <bool kFull, class T>
__m256 dot8(const float* q, const T* K, int64_t hd, int nk) {
  __m256 a[8];
#pragma GCC unroll 8
  for (int j = 0; j < 8; ++j) a[j] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= hd; i += 8) {
    const __m256 qv = _mm256_loadu_ps(q + i);
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j)
      if (kFull || j < nk) a[j] = _mm256_fmadd_ps(qv, ld(K + j * hd + i), a[j]);
  }
  if (i < hd) {  // head_dim tail: masked loads (no fault past the row)
    const __m256i m = lane_mask(hd - i);
    const __m256 qv = _mm256_maskload_ps(q + i, m);
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j)
      if (kFull || j < nk) a[j] = _mm256_fmadd_ps(qv, ldm(m, K + j * hd + i), a[j]);
  }
  // hadd tree: t0 = [a0..a3 sums of the low 128 bits | same of the high 128 bits], t1 for a4..a7.
  const __m256 t0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 t1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31));
}

// O[r, 0 : 8*NV] (row stride ldo; last vector masked by `last`) += sum_{s0 <= s < s1} P[r, s] V[s, :]
// for NR rows; P row stride lds, V row stride ldv.
template <int NR, int NV, class T>
void vacc(const float* P, int64_t lds, const T* V, int64_t ldv, int64_t s0, int64_t s1, float* O, int64_t ldo,
          __m256i last) {
  __m256 acc[NR][NV];
#pragma GCC unroll 4
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 2
    for (int c = 0; c < NV; ++c)
      acc[r][c] = c == NV - 1 ? _mm256_maskload_ps(O + r * ldo + 8 * c, last) : _mm256_loadu_ps(O + r * ldo + 8 * c);
  for (int64_t s = s0; s < s1; ++s) {
    const T* vs = V + s * ldv;
    __m256 vv[NV];
#pragma GCC unroll 2
    for (int c = 0; c < NV; ++c) vv[c] = c == NV - 1 ? ldm(last, vs + 8 * c) : ld(vs + 8 * c);
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r) {
      const __m256 w = _mm256_broadcast_ss(P + r * lds + s);
#pragma GCC unroll 2
      for (int c = 0; c < NV; ++c) acc[r][c] = _mm256_fmadd_ps(w, vv[c], acc[r][c]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 2
    for (int c = 0; c < NV; ++c) {
      if (c == NV - 1)
        _mm256_maskstore_ps(O + r * ldo + 8 * c, last, acc[r][c]);
      else
        _mm256_storeu_ps(O + r * ldo + 8 * c, acc[r][c]);
    }
}

template <class T>
using VaccFn = void (*)(const float*, int64_t, const T*, int64_t, int64_t, int64_t, float*, int64_t, __m256i);
template <class T>
constexpr VaccFn<T> kVacc[4][2] = {{vacc<1, 1, T>, vacc<1, 2, T>}, {vacc<2, 1, T>, vacc<2, 2, T>},
                                   {vacc<3, 1, T>, vacc<3, 2, T>}, {vacc<4, 1, T>, vacc<4, 2, T>}};

// T = float (fp32 cache) or uint16_t (bf16 cache, widened on load).
template <class T>
void attn_block(int64_t R, int64_t hd, const float* Qp, const T* K, const T* V, const int32_t* km,
                const int64_t* n_vis, float* S, int64_t lds, float* O) {
  int64_t n_max = 0;
  for (int64_t r = 0; r < R; ++r) n_max = n_vis[r] > n_max ? n_vis[r] : n_max;
  const int64_t n_pad = (n_max + 15) / 16 * 16;
  const __m256 ninf = neg_inf();
  const bool pf_v = n_max * hd <= kPrefetchMaxFloats;

  // 1) Scores (log2 units), -inf for masked keys; each 8-key slab of K is reused from L1 by all rows.
  for (int64_t s0 = 0; s0 < n_max; s0 += 8) {
    const __m256i in = lane_mask(n_max - s0);
    const __m256i koff = _mm256_cmpeq_epi32(_mm256_maskload_epi32(km + s0, in), _mm256_setzero_si256());
    const T* Kb = K + s0 * hd;
    // Decode streams K and V from DRAM: fetching this slab's V rows (read in step 3) now keeps
    // more misses in flight; skipped when V would not stay in L2 meanwhile.
    if (pf_v)
      for (int64_t i = s0 * hd; i < (s0 + 8) * hd && i < n_max * hd; i += 64 / sizeof(T))
        _mm_prefetch(reinterpret_cast<const char*>(V + i), _MM_HINT_T1);
    for (int64_t r = 0; r < R; ++r) {
      const int64_t nr = n_vis[r] - s0;
      if (nr <= 0) continue;
      const float* qr = Qp + r * hd;
      const __m256 sc = nr >= 8 ? dot8<true>(qr, Kb, hd, 8) : dot8<false>(qr, Kb, hd, static_cast<int>(nr));
      const __m256 vis = _mm256_castsi256_ps(_mm256_andnot_si256(koff, lane_mask(nr)));
      _mm256_storeu_ps(S + r * lds + s0, _mm256_blendv_ps(ninf, sc, vis));
    }
  }

  // 2) Weights 2^(score - max), 0 for invisible keys and up to n_pad; fp32 8-lane denominator.
  float inv[kMaxRows];  // [R] 1 / denominator, 0 for a row that sees no key
  for (int64_t r = 0; r < R; ++r) {
    float* Sr = S + r * lds;
    const int64_t nr = n_vis[r];
    __m256 mv = ninf;
    for (int64_t s0 = 0; s0 < nr; s0 += 8)
      mv = _mm256_max_ps(mv, _mm256_blendv_ps(ninf, _mm256_loadu_ps(Sr + s0), _mm256_castsi256_ps(lane_mask(nr - s0))));
    const float m = hmax(mv);
    if (!(m >= -__FLT_MAX__)) {  // m == -inf: no visible key
      std::memset(Sr, 0, sizeof(float) * n_pad);
      inv[r] = 0.0f;
      continue;
    }
    const __m256 mb = _mm256_set1_ps(m);
    __m256 sum = _mm256_setzero_ps();
    for (int64_t s0 = 0; s0 < n_pad; s0 += 8) {
      if (s0 >= nr) {
        _mm256_storeu_ps(Sr + s0, _mm256_setzero_ps());
        continue;
      }
      const __m256 x = _mm256_loadu_ps(Sr + s0);
      const __m256 ok = _mm256_and_ps(_mm256_cmp_ps(x, ninf, _CMP_NEQ_OQ), _mm256_castsi256_ps(lane_mask(nr - s0)));
      const __m256 p = _mm256_and_ps(ok, exp2_nonpos(_mm256_sub_ps(x, mb)));
      _mm256_storeu_ps(Sr + s0, p);
      sum = _mm256_add_ps(sum, p);
    }
    inv[r] = 1.0f / hsum(sum);  // >= 1: the max key has weight exactly 1
  }

  // 3) O = P · V over 64-key slabs, 4 rows x 16 columns of accumulators per pass; then normalize.
  std::memset(O, 0, sizeof(float) * R * hd);
  for (int64_t kb = 0; kb < n_max; kb += kKeyBlock) {
    for (int64_t r0 = 0; r0 < R; r0 += 4) {
      const int64_t nrw = R - r0 < 4 ? R - r0 : 4;
      int64_t ng = 0;
      for (int64_t r = r0; r < r0 + nrw; ++r) ng = n_vis[r] > ng ? n_vis[r] : ng;
      const int64_t ke = kb + kKeyBlock < ng ? kb + kKeyBlock : ng;
      if (ke <= kb) continue;
      for (int64_t c0 = 0; c0 < hd; c0 += 16) {
        const int64_t nc = hd - c0 < 16 ? hd - c0 : 16, nv = (nc + 7) / 8;
        kVacc<T>[nrw - 1][nv - 1](S + r0 * lds, lds, V + c0, hd, kb, ke, O + r0 * hd + c0, hd,
                               lane_mask(nc - 8 * (nv - 1)));
      }
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    const __m256 iv = _mm256_set1_ps(inv[r]);
    float* o = O + r * hd;
    for (int64_t i = 0; i < hd; i += 8) {
      const __m256i m = lane_mask(hd - i);
      _mm256_maskstore_ps(o + i, m, _mm256_mul_ps(_mm256_maskload_ps(o + i, m), iv));
    }
  }
}
}  // namespace

void attn_block_avx2(int64_t R, int64_t hd, const float* Qp, const float* K, const float* V, const int32_t* km,
                     const int64_t* n_vis, float* S, int64_t lds, float* O) {
  attn_block<float>(R, hd, Qp, K, V, km, n_vis, S, lds, O);
}
void attn_block_avx2_bf16(int64_t R, int64_t hd, const float* Qp, const uint16_t* K, const uint16_t* V,
                          const int32_t* km, const int64_t* n_vis, float* S, int64_t lds, float* O) {
  attn_block<uint16_t>(R, hd, Qp, K, V, km, n_vis, S, lds, O);
}

}  // namespace qlora::cpu::attn_k
