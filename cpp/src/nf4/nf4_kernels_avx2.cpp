// AVX2 (+F16C) NF4 block kernels. Compiled with -mavx2 -mfma -mf16c only; called by
// nf4_codec.cpp after the level check. Rules: cpp/src/cpu/README.md; semantics: nf4_kernels.hpp.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "nf4/nf4_kernels.hpp"  // declarations only

namespace qlora::nf4::kernels {

namespace {

constexpr float kFltMax = 0x1.fffffep127f;

template <int K>
__m256 load8(const void* x, int64_t i) {
  if constexpr (K == kSrcF32) {
    return _mm256_loadu_ps(static_cast<const float*>(x) + i);
  } else {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(x) + i));
    if constexpr (K == kSrcF16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
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

float hmax8(__m256 v) {
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
  return _mm_cvtss_f32(h);
}

// NF4 codes of 8 scaled values: #{k : y > thr[k]} (ties to the lower code).
__m256i codes8(__m256 y, const __m256* t) {
  __m256i c = _mm256_setzero_si256();
  for (int k = 0; k < 15; ++k) c = _mm256_sub_epi32(c, _mm256_castps_si256(_mm256_cmp_ps(y, t[k], _CMP_GT_OQ)));
  return c;
}

int code1(float y, const float* thr) {
  int q = 0;
  for (int k = 0; k < 15; ++k) q += y > thr[k];
  return q;
}

template <int K>
int64_t quantize_blocks(const void* x, int64_t n, int64_t bs, int64_t b0, int64_t b1, const float* thr,
                        uint8_t* packed, float* absmax) {
  __m256 t[15];
  for (int k = 0; k < 15; ++k) t[k] = _mm256_set1_ps(thr[k]);
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256 fmax = _mm256_set1_ps(kFltMax);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  const __m256i low_byte = _mm256_set1_epi16(0x00FF);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = b * bs, len = n - start < bs ? n - start : bs;
    // absmax and the finiteness check (NaN and inf fail `a <= FLT_MAX`)
    __m256 vm = _mm256_setzero_ps(), vbad = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= len; i += 8) {
      __m256 a = _mm256_and_ps(load8<K>(x, start + i), abs_mask);
      vm = _mm256_max_ps(vm, a);
      vbad = _mm256_or_ps(vbad, _mm256_cmp_ps(a, fmax, _CMP_NLE_UQ));
    }
    float m = hmax8(vm);
    bool bad = _mm256_movemask_ps(vbad) != 0;
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
    const __m256 vpre = _mm256_set1_ps(pre), vr = _mm256_set1_ps(r);
    i = 0;
    for (; i + 32 <= len; i += 32) {
      __m256i c[4];
      for (int j = 0; j < 4; ++j)
        c[j] = codes8(_mm256_mul_ps(_mm256_mul_ps(load8<K>(x, start + i + 8 * j), vpre), vr), t);
      // 32 int32 codes -> 32 bytes in element order (packs interleave 128-bit lanes; undo it)
      __m256i p = _mm256_packus_epi16(_mm256_packs_epi32(c[0], c[1]), _mm256_packs_epi32(c[2], c[3]));
      p = _mm256_permutevar8x32_epi32(p, order);
      // byte pairs (lo, hi) -> (lo << 4) | hi
      __m256i w = _mm256_and_si256(_mm256_or_si256(_mm256_slli_epi16(p, 4), _mm256_srli_epi16(p, 8)), low_byte);
      __m128i bytes = _mm_packus_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i / 2), bytes);
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

int64_t quantize_blocks_avx2(const void* x, int kind, int64_t n, int64_t bs, int64_t b0, int64_t b1,
                             const float* thr, uint8_t* packed, float* absmax) {
  if (kind == kSrcF16) return quantize_blocks<kSrcF16>(x, n, bs, b0, b1, thr, packed, absmax);
  if (kind == kSrcBF16) return quantize_blocks<kSrcBF16>(x, n, bs, b0, b1, thr, packed, absmax);
  return quantize_blocks<kSrcF32>(x, n, bs, b0, b1, thr, packed, absmax);
}

void dequantize_blocks_avx2(const uint8_t* packed, const float* absmax, int64_t n, int64_t bs, int64_t b0,
                            int64_t b1, const float* codes, float* out) {
  const __m256 tab_lo = _mm256_loadu_ps(codes), tab_hi = _mm256_loadu_ps(codes + 8);
  const __m128i dup = _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
  const __m256i shifts = _mm256_setr_epi32(4, 0, 4, 0, 4, 0, 4, 0);  // first element: high nibble
  const __m256i nib = _mm256_set1_epi32(0x0F);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = b * bs, len = n - start < bs ? n - start : bs;
    const float a = absmax[b];
    const __m256 va = _mm256_set1_ps(a);
    const uint8_t* p = packed + start / 2;
    float* o = out + start;
    int64_t i = 0;
    for (; i + 16 <= len; i += 16) {
      __m128i d = _mm_shuffle_epi8(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + i / 2)), dup);
      for (int h = 0; h < 2; ++h) {
        __m128i dh = h == 0 ? d : _mm_srli_si128(d, 8);
        __m256i q = _mm256_and_si256(_mm256_srlv_epi32(_mm256_cvtepu8_epi32(dh), shifts), nib);
        __m256 v = _mm256_blendv_ps(_mm256_permutevar8x32_ps(tab_lo, q), _mm256_permutevar8x32_ps(tab_hi, q),
                                    _mm256_castsi256_ps(_mm256_slli_epi32(q, 28)));
        _mm256_storeu_ps(o + i + 8 * h, _mm256_mul_ps(v, va));
      }
    }
    for (; i + 1 < len; i += 2) {
      o[i] = codes[p[i / 2] >> 4] * a;
      o[i + 1] = codes[p[i / 2] & 0x0F] * a;
    }
    if (i < len) o[i] = codes[p[i / 2] >> 4] * a;
  }
}

}  // namespace qlora::nf4::kernels
