// AVX512-BF16 NF4 GEMV kernel (nf4_gemv_bf16.hpp). Per 64 weights (32 packed bytes, one block
// step: K % 64 == 0 and blocksize >= 64, so a step never straddles a block): vpmovzxbw puts byte j
// in word j, whose bits 0..3 are column 2j + 1 (low nibble) and, after one shift by 4, column 2j.
// vpermw reads index bits 0..4: over the block's table of the 16 values r(code * absmax) stored
// twice (32 words), the stray bit 4 (the high nibble's lowest bit) needs no mask. The two looked-up vectors are already in vdpbf16ps pair order for X
// regrouped the same way once per call (regroup_x_bf16), so no shuffle of weights is needed.
// Rules for this file: cpp/src/cpu/README.md (intrinsics + raw pointers only).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include <cstdint>

#include "cpu/nf4_gemv_bf16_kernels.hpp"
#include "cpu/simd_reduce_avx512.hpp"

namespace qlora::cpu::nf4_gemv_bf16_detail {

namespace {

#define QLORA_AI inline __attribute__((always_inline))

// An X vector used by both rows of a pair is loaded once (GCC would fold the load into each op).
QLORA_AI void keep_in_register(__m512i& a, __m512i& b) { asm("" : "+v"(a), "+v"(b)); }

// The block's lookup table: r(code_c * absmax) for c < 16 (fp32 product, as scalar::nf4_element,
// then RNE to bf16 as the GEMM path rounds it), in words c and 16 + c.
// One two-source convert of the same product gives both copies (no separate broadcast).
QLORA_AI __m512i table(__m512 codes, float absmax) {
  const __m512 v = _mm512_mul_ps(codes, _mm512_set1_ps(absmax));
  const __m512bh t = _mm512_cvtne2ps_pbh(v, v);
  return reinterpret_cast<const __m512i&>(t);
}

struct Shifts {};  // (no shift constants: the high nibbles take an immediate shift)
QLORA_AI Shifts make_shifts() { return {}; }

// 64 weights at p (32 bytes) looked up in t: low-nibble and high-nibble vectors (regrouped order).
// vpmovzxbw puts byte j in word j: bits 0..3 are its low nibble (column 2j + 1), bits 4..7 its high
// nibble (column 2j), which one immediate shift brings down.
struct W64 {
  __m512i lo, hi;
};
QLORA_AI W64 lookup(const uint8_t* p, __m512i t, const Shifts&) {
  const __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return {_mm512_permutexvar_epi16(b, t), _mm512_permutexvar_epi16(_mm512_srli_epi16(b, 4), t)};
}

QLORA_AI __m512 dp(__m512 acc, __m512i a, __m512i b) {
  return _mm512_dpbf16_ps(acc, reinterpret_cast<const __m512bh&>(a), reinterpret_cast<const __m512bh&>(b));
}

// Packed W ahead of the row pair at byte offset `off` of row n (rows are K/2 bytes, contiguous):
// pf_l1 bytes ahead into L1 and pf_l2 into L2, for both rows; once per 64-byte line.
QLORA_AI void prefetch_ahead(const uint8_t* p0, int64_t K, int64_t pf_l1, int64_t pf_l2) {
  _mm_prefetch(reinterpret_cast<const char*>(p0 + pf_l1), _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(p0 + pf_l1 + K / 2), _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(p0 + pf_l2), _MM_HINT_T1);
  _mm_prefetch(reinterpret_cast<const char*>(p0 + pf_l2 + K / 2), _MM_HINT_T1);
}

// y = alpha * dot (+ beta * y): products rounded apart (never an FMA), the same in the scalar and
// the vector store, so a row's bits do not depend on which one its group took.
QLORA_AI void store(const Args& a, int64_t m, int64_t n, float dot) {
  float* y = a.y + m * a.ldy + n;
  float v = a.alpha * dot;
  if (a.beta != 0.0f) {  // beta == 0: Y not read
    float b = a.beta * *y;
    asm("" : "+v"(v), "+v"(b));
    v += b;
  }
  *y = v;
}

// The block tables of row n at step k (columns [k, k + 64)): rebuilt when the step starts a block.
// Blocksize 64 (the QLoRA default): every step, no branch (kEvery).
template <bool kEvery>
QLORA_AI void next_table(__m512i& t, const float*& am, int64_t j, int64_t k, int64_t bs_mask, __m512 codes) {
  if (kEvery) {
    if (k) t = table(codes, *++am);
  } else if (k && (j & bs_mask) == 0) {
    t = table(codes, *++am);
  }
}

// Args::pf_lo/pf_hi spread over the rows [r0, r1) of a call: once rows [r0, n_end) are done, the
// first (pf_hi - pf_lo) * (n_end - r0) / (r1 - r0) bytes have been prefetched to L2 (a few lines
// per row pair, while the decode-bound loop leaves memory idle). Changes no result.
struct SidePf {
  const char* p;
  const char* lo;
  int64_t bytes, r0, rows;
  SidePf(const Args& a, int64_t r0_, int64_t r1) : p(a.pf_lo), lo(a.pf_lo), bytes(a.pf_hi - a.pf_lo), r0(r0_), rows(r1 - r0_) {}
  QLORA_AI void upto(int64_t n_end) {
    if (!p || p >= lo + bytes) return;
    const char* t = lo + bytes * (n_end - r0) / rows;
    for (; p < t; p += 64) _mm_prefetch(p, _MM_HINT_T1);
  }
};

// One row n (the odd last row of a range): out[m] = the 16 lane sums of row m of X.
template <int M, bool kEvery>
QLORA_AI void row_one(const Args& a, int64_t n, __m512 codes, const Shifts& sh, __m512* out) {
  const int64_t K = a.K, bs_mask = (int64_t{1} << a.bs_shift) - 1, j0 = n * K;
  const uint8_t* p = a.packed + j0 / 2;
  const float* am = a.absmax + ((j0 >> a.bs_shift) - a.block0);
  __m512i t = table(codes, *am);
  __m512 acc[M][2];
  for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 64) {
    next_table<kEvery>(t, am, j0 + k, k, bs_mask, codes);
    if ((k & 127) == 0) {
      _mm_prefetch(reinterpret_cast<const char*>(p + k / 2 + a.pf_l1), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(p + k / 2 + a.pf_l2), _MM_HINT_T1);
    }
    const W64 w = lookup(p + k / 2, t, sh);
    for (int m = 0; m < M; ++m) {
      const uint16_t* x = a.xb + m * K + k;
      acc[m][0] = dp(acc[m][0], w.lo, _mm512_loadu_si512(x));
      acc[m][1] = dp(acc[m][1], w.hi, _mm512_loadu_si512(x + 32));
    }
  }
  for (int m = 0; m < M; ++m) out[m] = _mm512_add_ps(acc[m][0], acc[m][1]);
}

// Rows n, n + 1 sharing every X load. M <= 4: separate low / high accumulators (more independent
// chains for vdpbf16ps's latency at small M); M > 4: one per (row of W, row of X), 16 registers.
// out0[m], out1[m]: the 16 lane sums of rows n and n + 1.
template <int M, bool kEvery>
QLORA_AI void row_pair(const Args& a, int64_t n, __m512 codes, const Shifts& sh, __m512* out0, __m512* out1) {
  constexpr int U = M <= 4 ? 2 : 1;
  const int64_t K = a.K, s = a.bs_shift, bs_mask = (int64_t{1} << s) - 1, j0 = n * K, j1 = j0 + K;
  const uint8_t* p0 = a.packed + j0 / 2;
  const uint8_t* p1 = p0 + K / 2;
  const float* am0 = a.absmax + ((j0 >> s) - a.block0);
  const float* am1 = a.absmax + ((j1 >> s) - a.block0);
  __m512i t0 = table(codes, *am0), t1 = table(codes, *am1);
  __m512 acc0[M][U], acc1[M][U];
  const __m512 zero = _mm512_setzero_ps();
#pragma GCC unroll 16
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 2
    for (int u = 0; u < U; ++u) acc0[m][u] = acc1[m][u] = zero;
  for (int64_t k = 0; k < K; k += 64) {
    next_table<kEvery>(t0, am0, j0 + k, k, bs_mask, codes);
    next_table<kEvery>(t1, am1, j1 + k, k, bs_mask, codes);
    if ((k & 127) == 0) prefetch_ahead(p0 + k / 2, K, a.pf_l1, a.pf_l2);
    const W64 w0 = lookup(p0 + k / 2, t0, sh), w1 = lookup(p1 + k / 2, t1, sh);
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      __m512i xl = _mm512_loadu_si512(a.xb + m * K + k), xh = _mm512_loadu_si512(a.xb + m * K + k + 32);
      keep_in_register(xl, xh);
      acc0[m][0] = dp(acc0[m][0], w0.lo, xl);
      acc0[m][U - 1] = dp(acc0[m][U - 1], w0.hi, xh);
      acc1[m][0] = dp(acc1[m][0], w1.lo, xl);
      acc1[m][U - 1] = dp(acc1[m][U - 1], w1.hi, xh);
    }
  }
  for (int m = 0; m < M; ++m) {
    out0[m] = U == 2 ? _mm512_add_ps(acc0[m][0], acc0[m][U - 1]) : acc0[m][0];
    out1[m] = U == 2 ? _mm512_add_ps(acc1[m][0], acc1[m][U - 1]) : acc1[m][0];
  }
}

// Rows [r0, r1): pairs (r0 even: the driver's splits are, so pairs are (2j, 2j + 1) of W whatever
// the thread count), then the single-row kernel for an odd last row. The lane sums of R = 16 / MP
// rows (MP: M rounded up to a power of two) go to slot MP * (n % R) + m of 16 and are reduced
// together by one hsum16 (a per-row _mm512_reduce_add_ps cost as much as the dot products at
// K = 576). The slot is fixed by n, so is the reduction: the result never depends on the split.
template <int M, bool kEvery>
void rows_mk(const Args& a, int64_t r0, int64_t r1) {
  constexpr int MP = M == 1 ? 1 : M == 2 ? 2 : M <= 4 ? 4 : 8, R = 16 / MP;
  const __m512 codes = _mm512_loadu_ps(a.codes);
  const Shifts sh = make_shifts();
  __m512 buf[16];
  for (int i = 0; i < 16; ++i) buf[i] = _mm512_setzero_ps();
  alignas(64) float dots[16];
  int64_t pending = r0;  // first row not stored yet
  auto flush = [&](int64_t end) __attribute__((always_inline)) {  // rows [pending, end) are in buf
    const __m512 d = hsum16(buf);
    if (M == 1 && end - pending == 16) {  // a whole aligned group: one vector store
      float* y = a.y + pending;
      __m512 v = _mm512_mul_ps(_mm512_set1_ps(a.alpha), d);
      if (a.beta != 0.0f) {
        __m512 b = _mm512_mul_ps(_mm512_set1_ps(a.beta), _mm512_loadu_ps(y));
        asm("" : "+v"(v), "+v"(b));
        v = _mm512_add_ps(v, b);
      }
      _mm512_storeu_ps(y, v);
    } else if (a.beta == 0.0f) {  // the common case, without store()'s branch per element
      _mm512_store_ps(dots, _mm512_mul_ps(_mm512_set1_ps(a.alpha), d));
      for (int64_t r = pending; r < end; ++r) {
        const float* dr = dots + MP * (r & (R - 1));
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m) a.y[m * a.ldy + r] = dr[m];
      }
    } else {
      _mm512_store_ps(dots, d);
      for (int64_t r = pending; r < end; ++r)
        for (int m = 0; m < M; ++m) store(a, m, r, dots[MP * (r % R) + m]);
    }
    pending = end;
  };
  SidePf side(a, r0, r1);
  int64_t n = r0;
  for (; n + 2 <= r1; n += 2) {
    side.upto(n + 2);
    row_pair<M, kEvery>(a, n, codes, sh, buf + MP * (n % R), buf + MP * ((n + 1) % R));
    if ((n + 2) % R == 0) flush(n + 2);
  }
  if (n < r1) {
    side.upto(r1);
    row_one<M, kEvery>(a, n, codes, sh, buf + MP * (n % R));
  }
  if (pending < r1) flush(r1);
}

template <int M>
void rows_m(const Args& a, int64_t r0, int64_t r1) {
  if (a.bs_shift == 6)
    rows_mk<M, true>(a, r0, r1);
  else
    rows_mk<M, false>(a, r0, r1);
}

}  // namespace

void regroup_x_bf16(int64_t M, int64_t K, const float* X, int64_t ldx, uint16_t* xb) {
  // Per 64 columns: cvtne2ps2bf16 gives columns [0, 32) and [32, 64) as words; one two-source
  // vpermt2w each gathers the low-nibble and the high-nibble slots (index bit 5: second source).
  alignas(64) uint16_t il[32], ih[32];
  for (int q = 0; q < 32; ++q) {
    il[q] = static_cast<uint16_t>(2 * q + 1);
    ih[q] = static_cast<uint16_t>(2 * q);
  }
  const __m512i idx_lo = _mm512_load_si512(il), idx_hi = _mm512_load_si512(ih);
  for (int64_t m = 0; m < M; ++m) {
    const float* x = X + m * ldx;
    uint16_t* o = xb + m * K;
    for (int64_t g = 0; g < K; g += 64) {
      const __m512bh lo = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + g + 16), _mm512_loadu_ps(x + g));
      const __m512bh hi = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + g + 48), _mm512_loadu_ps(x + g + 32));
      const __m512i a = reinterpret_cast<const __m512i&>(lo), b = reinterpret_cast<const __m512i&>(hi);
      _mm512_storeu_si512(o + g, _mm512_permutex2var_epi16(a, idx_lo, b));
      _mm512_storeu_si512(o + g + 32, _mm512_permutex2var_epi16(a, idx_hi, b));
    }
  }
}

void rows_bf16(const Args& a, int64_t r0, int64_t r1) {
  switch (a.M) {
    case 1: rows_m<1>(a, r0, r1); break;
    case 2: rows_m<2>(a, r0, r1); break;
    case 3: rows_m<3>(a, r0, r1); break;
    case 4: rows_m<4>(a, r0, r1); break;
    case 5: rows_m<5>(a, r0, r1); break;
    case 6: rows_m<6>(a, r0, r1); break;
    case 7: rows_m<7>(a, r0, r1); break;
    default: rows_m<8>(a, r0, r1); break;
  }
}

}  // namespace qlora::cpu::nf4_gemv_bf16_detail
