// AVX-512 (F/BW/VL/DQ) NF4 block kernels. Compiled with the AVX-512 flags only; called by
// nf4_codec.cpp after the level check. Rules: cpp/src/cpu/README.md; semantics: nf4_kernels.hpp.
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12 false positive inside its own AVX-512 headers (_mm512_undefined_*; GCC bug 105593).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "nf4/nf4_kernels.hpp"  // declarations only

namespace qlora::nf4::kernels {

namespace {

constexpr float kFltMax = 0x1.fffffep127f;

template <int K>
__m512 load16(const void* x, int64_t i) {
  if constexpr (K == kSrcF32) {
    return _mm512_loadu_ps(static_cast<const float*>(x) + i);
  } else {
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(x) + i));
    if constexpr (K == kSrcF16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}

template <int K>
float load1(const void* x, int64_t i) {
  if constexpr (K == kSrcF32) {
    return static_cast<const float*>(x)[i];
  } else {
    const uint16_t h = static_cast<const uint16_t*>(x)[i];
    if constexpr (K == kSrcF16) return _cvtsh_ss(h);
    uint32_t bits = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  }
}

// NF4 codes of 16 scaled values as bytes: #{k : y > thr[k]} (ties to the lower code).
__m128i codes16(__m512 y, const __m512* t) {
  const __m512i one = _mm512_set1_epi32(1);
  __m512i c = _mm512_setzero_si512();
  for (int k = 0; k < 15; ++k) c = _mm512_mask_add_epi32(c, _mm512_cmp_ps_mask(y, t[k], _CMP_GT_OQ), c, one);
  return _mm512_cvtepi32_epi8(c);
}

int code1(float y, const float* thr) {
  int q = 0;
  for (int k = 0; k < 15; ++k) q += y > thr[k];
  return q;
}

template <int K>
int64_t quantize_blocks(const void* x, int64_t n, int64_t bs, int64_t b0, int64_t b1, const float* thr,
                        uint8_t* packed, float* absmax) {
  __m512 t[15];
  for (int k = 0; k < 15; ++k) t[k] = _mm512_set1_ps(thr[k]);
  const __m512 fmax = _mm512_set1_ps(kFltMax);
  const __m256i low_byte = _mm256_set1_epi16(0x00FF);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = b * bs, len = n - start < bs ? n - start : bs;
    // absmax and the finiteness check (NaN and inf fail `a <= FLT_MAX`)
    __m512 vm = _mm512_setzero_ps();
    __mmask16 bad_mask = 0;
    int64_t i = 0;
    for (; i + 16 <= len; i += 16) {
      __m512 a = _mm512_abs_ps(load16<K>(x, start + i));
      vm = _mm512_max_ps(vm, a);
      bad_mask |= _mm512_cmp_ps_mask(a, fmax, _CMP_NLE_UQ);
    }
    float m = _mm512_reduce_max_ps(vm);
    bool bad = bad_mask != 0;
    for (; i < len; ++i) {
      float a = __builtin_fabsf(load1<K>(x, start + i));
      bad |= !(a <= kFltMax);
      m = a > m ? a : m;
    }
    if (bad) return b;
    absmax[b] = m;
    uint8_t* out = packed + start / 2;
    if (m == 0.0f) {  // all zero: nibble 7 (exact 0.0)
      std::memset(out, 0x77, static_cast<size_t>((len + 1) / 2));
      continue;
    }
    float pre = 1.0f, r = 1.0f / m;
    if (r > kFltMax) {  // subnormal absmax (see nf4_kernels.hpp)
      pre = 0x1p64f;
      r = 1.0f / (m * pre);
    }
    const __m512 vpre = _mm512_set1_ps(pre), vr = _mm512_set1_ps(r);
    i = 0;
    for (; i + 32 <= len; i += 32) {
      __m128i c0 = codes16(_mm512_mul_ps(_mm512_mul_ps(load16<K>(x, start + i), vpre), vr), t);
      __m128i c1 = codes16(_mm512_mul_ps(_mm512_mul_ps(load16<K>(x, start + i + 16), vpre), vr), t);
      __m256i p = _mm256_inserti128_si256(_mm256_castsi128_si256(c0), c1, 1);  // 32 codes in order
      // byte pairs (lo, hi) -> (lo << 4) | hi
      __m256i w = _mm256_and_si256(_mm256_or_si256(_mm256_slli_epi16(p, 4), _mm256_srli_epi16(p, 8)), low_byte);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i / 2), _mm256_cvtepi16_epi8(w));
    }
    for (; i + 1 < len; i += 2) {
      int hi = code1((load1<K>(x, start + i) * pre) * r, thr);
      int lo = code1((load1<K>(x, start + i + 1) * pre) * r, thr);
      out[i / 2] = static_cast<uint8_t>((hi << 4) | lo);
    }
    if (i < len) out[i / 2] = static_cast<uint8_t>((code1((load1<K>(x, start + i) * pre) * r, thr) << 4) | 7);
  }
  return -1;
}

}  // namespace

int64_t quantize_blocks_avx512(const void* x, int kind, int64_t n, int64_t bs, int64_t b0, int64_t b1,
                               const float* thr, uint8_t* packed, float* absmax) {
  if (kind == kSrcF16) return quantize_blocks<kSrcF16>(x, n, bs, b0, b1, thr, packed, absmax);
  if (kind == kSrcBF16) return quantize_blocks<kSrcBF16>(x, n, bs, b0, b1, thr, packed, absmax);
  return quantize_blocks<kSrcF32>(x, n, bs, b0, b1, thr, packed, absmax);
}

void dequantize_blocks_avx512(const uint8_t* packed, const float* absmax, int64_t n, int64_t bs, int64_t b0,
                              int64_t b1, const float* codes, float* out) {
  const __m512 tab = _mm512_loadu_ps(codes);
  const __m128i dup = _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
  const __m512i shifts = _mm512_setr_epi32(4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0);  // first: high nibble
  const __m512i nib = _mm512_set1_epi32(0x0F);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = b * bs, len = n - start < bs ? n - start : bs;
    const float a = absmax[b];
    const __m512 va = _mm512_set1_ps(a);
    const uint8_t* p = packed + start / 2;
    float* o = out + start;
    int64_t i = 0;
    for (; i + 16 <= len; i += 16) {
      __m128i d = _mm_shuffle_epi8(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + i / 2)), dup);
      __m512i q = _mm512_and_si512(_mm512_srlv_epi32(_mm512_cvtepu8_epi32(d), shifts), nib);
      _mm512_storeu_ps(o + i, _mm512_mul_ps(_mm512_permutexvar_ps(q, tab), va));
    }
    for (; i + 1 < len; i += 2) {
      o[i] = codes[p[i / 2] >> 4] * a;
      o[i + 1] = codes[p[i / 2] & 0x0F] * a;
    }
    if (i < len) o[i] = codes[p[i / 2] >> 4] * a;
  }
}

}  // namespace qlora::nf4::kernels
