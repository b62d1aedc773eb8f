// AVX2 NF4 GEMV kernel. Per 8 packed bytes (16 weights): a 64-bit broadcast load (no shuffle
// uop) and a variable shift by 8*(q/2) put byte 4*(q%2) + q/2 into bits 0..7 of dword q; the
// low nibble (odd column) is then index bits 0..3, the high one (even column) after 4 more bits
// of shift (higher bits are ignored by the lookup). The 16 codes pre-scaled by the block's absmax live in two 8-entry register tables
// (vpermps reads index bits 0..2), and index bit 3, shifted into the sign bit, blends the two.
// X comes regrouped in that order (nf4_gemv.cpp): per group, 8 even then 8 odd columns. Whole
// blocks may instead go through byte-table lookups (decode32, Args::avx2_lookup: the same
// weights in the same registers, so the same bits; which is faster is measured per machine, see
// cpu/tuning.hpp). Rules: cpp/src/cpu/README.md.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "cpu/nf4_gemv_kernels.hpp"
#include "cpu/simd_reduce_avx2.hpp"

namespace qlora::cpu::nf4_gemv_detail {

namespace {

// Decodes 8 of the 16 nibbles of bytes p[0..8) (sh selects which: sh_lo or sh_hi); index bit
// 3, shifted to the sign bit, picks the table half.
inline __m256 decode(const uint8_t* p, __m256i sh, __m256 t_lo, __m256 t_hi) {
  long long q;
  std::memcpy(&q, p, 8);
  const __m256i idx = _mm256_srlv_epi32(_mm256_set1_epi64x(q), sh);
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(t_lo, idx), _mm256_permutevar8x32_ps(t_hi, idx),
                          _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

#define QLORA_AI inline __attribute__((always_inline))
#define QLORA_AI_LAMBDA __attribute__((always_inline))

// The byte-table decode (Args::avx2_lookup): the 16 unscaled codes as four 16-entry byte tables
// (table j: byte j of every code, in both 128-bit lanes), so one in-lane vpshufb looks up one byte
// of 32 weights. Per 32 weights: a pshufb, a shift and an and build the indices, four pshufb look
// up, eight unpacks assemble the fp32 codes, four multiplies scale them (fl(code * absmax), the
// bits of the register tables above): 19 vector ops where two vpermps, a blend and two shifts per
// 8 weights took 24-28 (vblendvps is 2-3 uops on Intel cores), and the shuffles spread over two
// ports where vpermps has one.
struct ByteTables {
  __m256i t[4];  // [byte j][32]: byte j of code i at i and 16 + i
};

inline ByteTables byte_tables(const float* codes) {
  alignas(32) uint8_t b[4][32];
  for (int i = 0; i < 16; ++i) {
    uint32_t u;
    std::memcpy(&u, codes + i, 4);
    for (int j = 0; j < 4; ++j) b[j][i] = b[j][16 + i] = static_cast<uint8_t>(u >> (8 * j));
  }
  ByteTables t;
  for (int j = 0; j < 4; ++j) t.t[j] = _mm256_load_si256(reinterpret_cast<const __m256i*>(b[j]));
  return t;
}

// 32 columns (16 packed bytes at p, two groups g0, g1 of 16) decoded and scaled into the
// registers decode() gives: w[0] = even columns of g0, w[1] its odd ones, w[2] / w[3] those of g1,
// lane q holding byte 4*(q%2) + q/2 of its group (the regrouped X's order). The index of lane
// 4L + j of w[v] sits in byte 4v + j of the index register's lane L: after the unpacks below a
// lane L byte i ends in w[i/4] lane 4L + i%4.
QLORA_AI void decode32(const uint8_t* p, const ByteTables& bt, __m256 scale, __m256 (&w)[4]) {
  // Lane 0 takes bytes 0,4,1,5 of a group, lane 1 bytes 2,6,3,7; dwords 0 / 2 the even column
  // (high nibble, shifted down by 4 below), dwords 1 / 3 the odd one (low nibble).
  const __m256i pick = _mm256_setr_epi8(0, 4, 1, 5, 0, 4, 1, 5, 8, 12, 9, 13, 8, 12, 9, 13,  //
                                        2, 6, 3, 7, 2, 6, 3, 7, 10, 14, 11, 15, 10, 14, 11, 15);
  const __m256i sh = _mm256_setr_epi32(4, 0, 4, 0, 4, 0, 4, 0);
  const __m256i bytes = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(_mm256_shuffle_epi8(bytes, pick), sh),
                                       _mm256_set1_epi8(0x0f));  // bit 7 clear: pshufb looks up
  const __m256i b0 = _mm256_shuffle_epi8(bt.t[0], idx), b1 = _mm256_shuffle_epi8(bt.t[1], idx);
  const __m256i b2 = _mm256_shuffle_epi8(bt.t[2], idx), b3 = _mm256_shuffle_epi8(bt.t[3], idx);
  const __m256i l01 = _mm256_unpacklo_epi8(b0, b1), h01 = _mm256_unpackhi_epi8(b0, b1);  // low halves
  const __m256i l23 = _mm256_unpacklo_epi8(b2, b3), h23 = _mm256_unpackhi_epi8(b2, b3);  // high halves
  w[0] = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_unpacklo_epi16(l01, l23)), scale);
  w[1] = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_unpackhi_epi16(l01, l23)), scale);
  w[2] = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_unpacklo_epi16(h01, h23)), scale);
  w[3] = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_unpackhi_epi16(h01, h23)), scale);
}

// Accumulates 16 columns (8 packed bytes at p) into acc[u] (even) and acc[u+1] (odd) per row of X.
template <int M, int NA>
QLORA_AI void group16(__m256 (&acc)[NA][M], int u, const uint8_t* p, const float* x, int64_t ldx, __m256 t_lo,
                      __m256 t_hi, __m256i sh_lo, __m256i sh_hi) {
  const __m256 we = decode(p, sh_hi, t_lo, t_hi);
  const __m256 wo = decode(p, sh_lo, t_lo, t_hi);
  for (int m = 0; m < M; ++m) {  // x regrouped: [8 even | 8 odd]
    acc[u][m] = _mm256_fmadd_ps(we, _mm256_loadu_ps(x + m * ldx), acc[u][m]);
    acc[u + 1][m] = _mm256_fmadd_ps(wo, _mm256_loadu_ps(x + m * ldx + 8), acc[u + 1][m]);
  }
}

// U groups of 16 columns per step in whole blocks (2*U accumulators per row of X). L: whole
// blocks through decode32 (the FMAs in the same order), heads and tails through decode.
template <int M, int U, bool L>
void rows_m(const Args& a, int64_t r0, int64_t r1) {
  const int64_t K = a.K, ldx = a.ldx;
  const int s = a.bs_shift;
  const int64_t bs = int64_t{1} << s;
  const float* x = a.x;  // [M, ldx] regrouped
  const __m256i sh_lo = _mm256_set_epi32(24, 24, 16, 16, 8, 8, 0, 0);  // dword q: 8*(q/2)
  const __m256i sh_hi = _mm256_add_epi32(sh_lo, _mm256_set1_epi32(4));
  const ByteTables bt = byte_tables(a.codes);
  for (int64_t n = r0; n < r1; ++n) {
    const int64_t j0 = n * K;              // flat index of W[n, 0] (even: K % 16 == 0)
    const uint8_t* p = a.packed + j0 / 2;  // [K/2] bytes of row n
    const float* am = a.absmax + ((j0 >> s) - a.block0);  // scale of the block holding W[n, 0]
    __m256 acc[2 * U][M];                  // [group-in-step x (even, odd)][m]
    for (int u = 0; u < 2 * U; ++u)
      for (int m = 0; m < M; ++m) acc[u][m] = _mm256_setzero_ps();
    // 32 columns (16 bytes at pb, X at xb) of a whole block: g0 into acc[0], acc[1], then g1 into
    // acc[2], acc[3] (U == 2) or after g0 into acc[0], acc[1] (U == 1), as group16 below.
    const auto step32 = [&](const uint8_t* pb, const float* xb, __m256 scale) QLORA_AI_LAMBDA {
      __m256 w[4];
      decode32(pb, bt, scale, w);
      for (int g = 0; g < 2; ++g)
        for (int m = 0; m < M; ++m) {
          const int u = U == 2 ? 2 * g : 0;
          acc[u][m] = _mm256_fmadd_ps(w[2 * g], _mm256_loadu_ps(xb + m * ldx + 16 * g), acc[u][m]);
          acc[u + 1][m] = _mm256_fmadd_ps(w[2 * g + 1], _mm256_loadu_ps(xb + m * ldx + 16 * g + 8), acc[u + 1][m]);
        }
    };
    // Block edges fall on 16-column groups: a head up to the first edge, whole blocks, a tail.
    int64_t k = 0;
    const int64_t head = (j0 & (bs - 1)) ? bs - (j0 & (bs - 1)) : 0;
    for (int part = 0; part < 2; ++part) {  // 0: head, 1: tail (partial blocks, 16 columns a step)
      if (part == 1) {
        for (; k + bs <= K; k += bs) {  // whole blocks (bs is a multiple of 32 >= 16 * U)
          const __m256 scale = _mm256_set1_ps(*am++);
          // W ahead, once per 64-byte line (rows are contiguous: this runs through the task's
          // range): from DRAM the decode loop otherwise waited on the hardware prefetcher alone
          // (M = 1 on a Zen 4: +15-30% per CPU second). pf_l2 == 0: off (QLORA_NF4_GEMV_PF=0,0).
          if ((k & 127) == 0 && a.pf_l2 > 0) {
            _mm_prefetch(reinterpret_cast<const char*>(p + k / 2 + a.pf_l1), _MM_HINT_T0);
            _mm_prefetch(reinterpret_cast<const char*>(p + k / 2 + a.pf_l2), _MM_HINT_T1);
          }
          if constexpr (L) {
            const uint8_t* pb = p + k / 2;
            const float* xb = x + k;
            if (bs == 64) {  // bitsandbytes' default: both steps in straight-line code
              step32(pb, xb, scale);
              step32(pb + 16, xb + 32, scale);
            } else {
              for (int64_t i = 0; i < bs; i += 32) step32(pb + i / 2, xb + i, scale);
            }
          } else {
            const __m256 t_lo = _mm256_mul_ps(_mm256_loadu_ps(a.codes), scale);
            const __m256 t_hi = _mm256_mul_ps(_mm256_loadu_ps(a.codes + 8), scale);
            for (int64_t i = 0; i < bs; i += 16 * U)
              for (int u = 0; u < U; ++u)
                group16<M, 2 * U>(acc, 2 * u, p + (k + i + 16 * u) / 2, x + k + i + 16 * u, ldx, t_lo, t_hi, sh_lo, sh_hi);
          }
        }
      }
      const int64_t end = part == 0 ? (head < K ? head : K) : K;
      if (k < end) {
        const __m256 scale = _mm256_set1_ps(part == 0 ? *am++ : *am);
        const __m256 t_lo = _mm256_mul_ps(_mm256_loadu_ps(a.codes), scale);
        const __m256 t_hi = _mm256_mul_ps(_mm256_loadu_ps(a.codes + 8), scale);
        for (; k < end; k += 16) group16<M, 2 * U>(acc, 0, p + k / 2, x + k, ldx, t_lo, t_hi, sh_lo, sh_hi);
      }
    }
    for (int m = 0; m < M; ++m) {
      __m256 sum = acc[0][m];
      for (int u = 1; u < 2 * U; ++u) sum = _mm256_add_ps(sum, acc[u][m]);
      __m128 h = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
      h = _mm_add_ps(h, _mm_movehl_ps(h, h));
      h = _mm_add_ss(h, _mm_movehdup_ps(h));
      const float dot = _mm_cvtss_f32(h);
      float* y = a.y + m * a.ldy + n;
      *y = a.beta == 0.0f ? a.alpha * dot : a.alpha * dot + a.beta * *y;  // beta == 0: Y not read
    }
  }
}

// 16 columns (8 packed bytes at p) for all M rows of X; even and odd columns share row m's
// accumulator, so 8 rows of X take 8 of the 16 ymm registers. xk: the group's [M, 16] X tile.
template <int M>
QLORA_AI void group16_wide(__m256 (&acc)[8], const uint8_t* p, const float* xk, __m256 t_lo, __m256 t_hi,
                           __m256i sh_lo, __m256i sh_hi) {
  const __m256 we = decode(p, sh_hi, t_lo, t_hi);
  const __m256 wo = decode(p, sh_lo, t_lo, t_hi);
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m)  // x regrouped: [8 even | 8 odd]
    acc[m] = _mm256_fmadd_ps(wo, _mm256_loadu_ps(xk + 16 * m + 8),
                             _mm256_fmadd_ps(we, _mm256_loadu_ps(xk + 16 * m), acc[m]));
}

// 5 <= M <= 8 in one pass: one row of W at a time (two rows x 8 rows of X would need 16
// accumulators, all of AVX2's registers), decoded once for all M rows of X (M <= 4 kernels
// in two passes decoded and streamed W twice). Any row start (head, whole blocks, tail as rows_m).
// X comes as [K/16][M][16] (regroup_x_avx2): one base pointer and constant offsets per group
// (M row pointers or strides took most general registers, and GCC spilled them in the loop).
// L: whole blocks through decode32 (the same weight registers, so the same bits).
template <int M, bool L>
void rows_wide(const Args& a, int64_t r0, int64_t r1) {
  static_assert(M > 4 && M <= 8, "rows_wide is for 5..8 rows of X");
  const int64_t K = a.K;
  const int s = a.bs_shift;
  const int64_t bs = int64_t{1} << s;
  const float* x = a.x;  // [K/16][M][16] regrouped
  const __m256i sh_lo = _mm256_set_epi32(24, 24, 16, 16, 8, 8, 0, 0);  // dword q: 8*(q/2)
  const __m256i sh_hi = _mm256_add_epi32(sh_lo, _mm256_set1_epi32(4));
  const ByteTables bt = byte_tables(a.codes);
  alignas(32) float dots[8];  // [m]
  for (int64_t n = r0; n < r1; ++n) {
    const int64_t j0 = n * K;              // flat index of W[n, 0] (even: K % 16 == 0)
    const uint8_t* p = a.packed + j0 / 2;  // [K/2] bytes of row n
    const float* am = a.absmax + ((j0 >> s) - a.block0);  // scale of the block holding W[n, 0]
    __m256 acc[8];                         // [m]; m >= M stay zero
    for (int m = 0; m < 8; ++m) acc[m] = _mm256_setzero_ps();
    int64_t k = 0;
    const int64_t head = (j0 & (bs - 1)) ? bs - (j0 & (bs - 1)) : 0;
    for (int part = 0; part < 2; ++part) {  // 0: head, 1: tail (partial blocks)
      if (part == 1) {
        for (; k + bs <= K; k += bs) {  // whole blocks
          const __m256 scale = _mm256_set1_ps(*am++);
          // W ahead into L1 and L2 (Args::pf_l1 / pf_l2, as nf4_gemv_avx512.cpp): from DRAM, the
          // slow decode loop otherwise waits on every row.
          _mm_prefetch(reinterpret_cast<const char*>(p + k / 2 + a.pf_l1), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(p + k / 2 + a.pf_l2), _MM_HINT_T1);
          if constexpr (L) {
            for (int64_t i = 0; i < bs; i += 32) {
              __m256 w[4];
              decode32(p + (k + i) / 2, bt, scale, w);
              const float* xk = x + (k + i) * M;  // group g at xk + 16 * M * g
#pragma GCC unroll 8
              for (int m = 0; m < M; ++m)
                acc[m] = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xk + 16 * m + 8),
                                         _mm256_fmadd_ps(w[0], _mm256_loadu_ps(xk + 16 * m), acc[m]));
#pragma GCC unroll 8
              for (int m = 0; m < M; ++m)
                acc[m] = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xk + 16 * M + 16 * m + 8),
                                         _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xk + 16 * M + 16 * m), acc[m]));
            }
          } else {
            const __m256 t_lo = _mm256_mul_ps(_mm256_loadu_ps(a.codes), scale);
            const __m256 t_hi = _mm256_mul_ps(_mm256_loadu_ps(a.codes + 8), scale);
            for (int64_t i = 0; i < bs; i += 16)
              group16_wide<M>(acc, p + (k + i) / 2, x + (k + i) * M, t_lo, t_hi, sh_lo, sh_hi);
          }
        }
      }
      const int64_t end = part == 0 ? (head < K ? head : K) : K;
      if (k < end) {
        const __m256 scale = _mm256_set1_ps(part == 0 ? *am++ : *am);
        const __m256 t_lo = _mm256_mul_ps(_mm256_loadu_ps(a.codes), scale);
        const __m256 t_hi = _mm256_mul_ps(_mm256_loadu_ps(a.codes + 8), scale);
        for (; k < end; k += 16) group16_wide<M>(acc, p + k / 2, x + k * M, t_lo, t_hi, sh_lo, sh_hi);
      }
    }
    _mm256_store_ps(dots, hsum8(acc));
    for (int m = 0; m < M; ++m) {
      float* y = a.y + m * a.ldy + n;
      *y = a.beta == 0.0f ? a.alpha * dots[m] : a.alpha * dots[m] + a.beta * *y;  // beta == 0: Y not read
    }
  }
}

}  // namespace

int64_t regroup_x_avx2(int64_t M, int64_t K, const float* X, int64_t ldx, float* Xg) {
  // Per 16 columns lo = x[0..8), hi = x[8..16): even slots [lo0 hi0 lo2 hi2 lo4 hi4 lo6 hi6],
  // odd slots the next columns (regroup_x in nf4_gemv.cpp with G = 16).
  const int64_t tile = M > 4 ? 16 * M : 16;  // distance between one row's groups
  const int64_t row = M > 4 ? 16 : K;        // between two rows' copies of a group
  for (int64_t m = 0; m < M; ++m) {
    const float* x = X + m * ldx;
    float* xg = Xg + m * row;
    for (int64_t g = 0; g < K; g += 16, xg += tile) {
      const __m256 lo = _mm256_loadu_ps(x + g), hi = _mm256_loadu_ps(x + g + 8);
      const __m256 ul = _mm256_unpacklo_ps(lo, hi), uh = _mm256_unpackhi_ps(lo, hi);
      _mm256_storeu_ps(xg, _mm256_shuffle_ps(ul, uh, _MM_SHUFFLE(1, 0, 1, 0)));
      _mm256_storeu_ps(xg + 8, _mm256_shuffle_ps(ul, uh, _MM_SHUFFLE(3, 2, 3, 2)));
    }
  }
  return row;
}

void decode_scales_avx2(const uint8_t* code, const float* map, const float* nested, float offset, int64_t b0,
                        int64_t b1, float* out) {
  const __m256 off = _mm256_set1_ps(offset);
  int64_t b = b0;
  for (; b + 8 <= b1 && (b >> 8) == ((b + 7) >> 8); b += 8) {  // 8 blocks under one nested scale
    const __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(code + b)));
    __m256 v = _mm256_mul_ps(_mm256_i32gather_ps(map, idx, 4), _mm256_set1_ps(nested[b >> 8]));
    asm("" : "+x"(v));  // GCC would contract the multiply and the add into an FMA
    _mm256_storeu_ps(out + (b - b0), _mm256_add_ps(v, off));
  }
  for (; b < b1; ++b) {  // a head or tail not aligned to 8 blocks of one nested scale
    float v = map[code[b]] * nested[b >> 8];
    asm("" : "+x"(v));
    out[b - b0] = v + offset;
  }
}

void rows_avx2(const Args& a, int64_t r0, int64_t r1) {
  switch (a.M) {
    case 1: a.avx2_lookup ? rows_m<1, 2, true>(a, r0, r1) : rows_m<1, 2, false>(a, r0, r1); break;
    case 2: a.avx2_lookup ? rows_m<2, 2, true>(a, r0, r1) : rows_m<2, 2, false>(a, r0, r1); break;
    case 3: a.avx2_lookup ? rows_m<3, 1, true>(a, r0, r1) : rows_m<3, 1, false>(a, r0, r1); break;
    case 4: a.avx2_lookup ? rows_m<4, 1, true>(a, r0, r1) : rows_m<4, 1, false>(a, r0, r1); break;
    case 5: a.avx2_lookup ? rows_wide<5, true>(a, r0, r1) : rows_wide<5, false>(a, r0, r1); break;
    case 6: a.avx2_lookup ? rows_wide<6, true>(a, r0, r1) : rows_wide<6, false>(a, r0, r1); break;
    case 7: a.avx2_lookup ? rows_wide<7, true>(a, r0, r1) : rows_wide<7, false>(a, r0, r1); break;
    default: a.avx2_lookup ? rows_wide<8, true>(a, r0, r1) : rows_wide<8, false>(a, r0, r1); break;
  }
}

}  // namespace qlora::cpu::nf4_gemv_detail
