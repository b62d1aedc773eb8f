#include "cpu/pack.hpp"

#include <cstring>

#include "common/error.hpp"

namespace qlora::cpu::pack {

namespace {

template <int MR>
void a_rows_t(const float* A, int64_t lda, int mr, int64_t kc, float* Ap) {
  if (mr == MR) {
    // k blocks of 8: each row's run is read contiguously, writes stay within a few cache lines.
    int64_t k0 = 0;
    for (; k0 + 8 <= kc; k0 += 8)
      for (int i = 0; i < MR; ++i) {
        const float* a = A + i * lda + k0;
        float* d = Ap + k0 * MR + i;
        for (int kk = 0; kk < 8; ++kk) d[kk * MR] = a[kk];
      }
    for (; k0 < kc; ++k0)
      for (int i = 0; i < MR; ++i) Ap[k0 * MR + i] = A[i * lda + k0];
    return;
  }
  for (int64_t k = 0; k < kc; ++k) {
    float* d = Ap + k * MR;
    for (int i = 0; i < mr; ++i) d[i] = A[i * lda + k];
    for (int i = mr; i < MR; ++i) d[i] = 0.0f;
  }
}

template <int MR>
void a_cols_t(const float* A, int64_t lda, int mr, int64_t kc, float* Ap) {
  for (int64_t k = 0; k < kc; ++k) {
    float* d = Ap + k * MR;
    std::memcpy(d, A + k * lda, sizeof(float) * mr);
    for (int i = mr; i < MR; ++i) d[i] = 0.0f;
  }
}

}  // namespace

void a_rows(int MR, const float* A, int64_t lda, int mr, int64_t kc, float* Ap) {
  switch (MR) {
    case 4: return a_rows_t<4>(A, lda, mr, kc, Ap);
    case 6: return a_rows_t<6>(A, lda, mr, kc, Ap);
    case 14: return a_rows_t<14>(A, lda, mr, kc, Ap);
    default: throw std::logic_error("pack::a_rows: unsupported MR");
  }
}

void a_cols(int MR, const float* A, int64_t lda, int mr, int64_t kc, float* Ap) {
  switch (MR) {
    case 4: return a_cols_t<4>(A, lda, mr, kc, Ap);
    case 6: return a_cols_t<6>(A, lda, mr, kc, Ap);
    case 14: return a_cols_t<14>(A, lda, mr, kc, Ap);
    default: throw std::logic_error("pack::a_cols: unsupported MR");
  }
}

namespace {
// Decoded absmax of NF4 block b (double quant: 8-bit code through the nested map, 256 blocks per
// nested scale); the one expression both scale fills below use.
inline float block_scale(const Nf4Ref& W, int64_t b) {
  if (!W.double_quant) return static_cast<const float*>(W.absmax)[b];
  const uint8_t* codes = static_cast<const uint8_t*>(W.absmax);  // [n_blocks]
  return W.nested_map[codes[b]] * W.nested_absmax[b >> 8] + W.offset;
}
}  // namespace

void nf4_scales(const Nf4Ref& W, int64_t b0, int64_t b1, float* out) {
  if (!W.double_quant) {
    std::memcpy(out, static_cast<const float*>(W.absmax) + b0, sizeof(float) * (b1 - b0));
    return;
  }
  for (int64_t b = b0; b < b1; ++b) out[b - b0] = block_scale(W, b);
}

void nf4_scales_strided(const Nf4Ref& W, int64_t f0, int64_t stride, int64_t n, int bs_log2, float* out) {
  for (int64_t k = 0; k < n; ++k) out[k] = block_scale(W, (f0 + k * stride) >> bs_log2);
}

}  // namespace qlora::cpu::pack
