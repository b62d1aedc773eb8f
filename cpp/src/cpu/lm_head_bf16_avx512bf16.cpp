// AVX-512 kernel of cpu/lm_head_bf16.cpp: an NN B panel of the lm_head backward (dh = dlogits · E,
// k = vocabulary rows in pairs) rebuilt from the NT panels packed once for the logits (k = D in
// pairs), so the backward reads 2-byte values that are already rounded instead of rounding fp32 E
// again for every chunk. Pure data movement: the same bf16 values as packing E's fp32 rows.
// Compiled with the AVX512-BF16 flags (CMake: *_avx512bf16.cpp); called only after
// cpu_has_avx512_bf16(). Rules: cpu/README.md (plain functions on raw pointers only).
#include <immintrin.h>

#include <cstdint>

#include "cpu/lm_head_bf16_kernels.hpp"
#include "cpu/transpose16_avx512.hpp"

#if defined(__GNUC__) && !defined(__clang__)  // GCC's false positives on the intrinsics' undefined vectors
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

namespace qlora::cpu::lm_head_k {

void nt_to_nn_panel_avx512(const uint32_t* Q, int64_t kpd, int64_t pd0, int np, uint32_t* out) {
  // Q[pd * 32 + v] = {E[v, 2pd], E[v, 2pd + 1]} (v < 32 rows of this NT panel). Transposing the
  // 16 x 32 block of dwords at pd0.. gives, per row v, its 32 bf16 of columns 2 pd0 ..; output pair
  // row pv interleaves rows 2pv and 2pv + 1 column by column.
  __m512 lo[16], hi[16];
  for (int i = 0; i < 16; ++i) {
    const int64_t pd = pd0 + i;
    if (pd < kpd) {
      lo[i] = _mm512_castsi512_ps(_mm512_load_si512(Q + pd * 32));
      hi[i] = _mm512_castsi512_ps(_mm512_load_si512(Q + pd * 32 + 16));
    } else {
      lo[i] = hi[i] = _mm512_setzero_ps();  // columns past D: the zero padding of the last panel
    }
  }
  transpose16(lo);  // lo[v]: row v (v < 16), 32 bf16 columns
  transpose16(hi);  // hi[v - 16]
  alignas(64) static const uint16_t kLo[32] = {0, 32, 1, 33, 2,  34, 3,  35, 4,  36, 5,  37, 6,  38, 7,  39,
                                               8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  alignas(64) static const uint16_t kHi[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                                               24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  const __m512i il = _mm512_load_si512(kLo), ih = _mm512_load_si512(kHi);
  for (int pv = 0; pv < np; ++pv) {
    const __m512i a = _mm512_castps_si512(2 * pv < 16 ? lo[2 * pv] : hi[2 * pv - 16]);
    const __m512i b = _mm512_castps_si512(2 * pv + 1 < 16 ? lo[2 * pv + 1] : hi[2 * pv + 1 - 16]);
    _mm512_store_si512(out + pv * 32, _mm512_permutex2var_epi16(a, il, b));
    _mm512_store_si512(out + pv * 32 + 16, _mm512_permutex2var_epi16(a, ih, b));
  }
}

}  // namespace qlora::cpu::lm_head_k
