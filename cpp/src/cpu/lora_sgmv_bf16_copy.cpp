// The multi-adapter LoRA op's bf16 inference copies (lora_sgmv.hpp: availability, size, packing)
// and its Scalar level (the fp32 reference and the bf16 copies' oracle).
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu/gemm.hpp"
#include "cpu/gemm_bf16.hpp"
#include "cpu/lora_sgmv.hpp"
#include "cpu/lora_sgmv_bf16_kernels.hpp"
#include "cpu/lora_sgmv_plan.hpp"

namespace qlora::cpu {

using namespace sgmv_plan;

// ------------------------------------------------------------------ bf16 inference copies
bool lora_bf16_available(SimdLevel level) { return bf16_compute_available(level); }

size_t lora_bf16_bytes(int64_t r, int64_t in, int64_t out) {
  return sizeof(uint32_t) * static_cast<size_t>(sgmv_bf16::module_words(r, in, out));
}

namespace {
uint32_t bf16_bits(float x) {  // RNE, denormals flushed, as vcvtne2ps2bf16 (cpu/gemm_bf16.hpp)
  const float r = bf16_round(x);
  uint32_t b;
  std::memcpy(&b, &r, 4);
  return b >> 16;
}
float bf16_value(uint32_t word, int half) {  // the bf16 in half 0 (low) or 1 (high) of a pair, as fp32
  const uint32_t b = half ? (word & 0xFFFF0000u) : (word << 16);
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}
// Packs src[n, k] (row stride k) as 16-lane blocks of k pairs: word (nb * pairs(k) + p) * 16 + i.
void pack_lanes(int64_t n, int64_t k, const float* src, uint32_t* dst) {
  const int64_t kp = sgmv_bf16::pairs(k);
  for (int64_t nb = 0; nb < sgmv_bf16::blocks(n); ++nb)
    for (int64_t p = 0; p < kp; ++p)
      for (int64_t i = 0; i < 16; ++i) {
        const int64_t row = nb * 16 + i;
        uint32_t w = 0;
        if (row < n) {
          w = bf16_bits(src[row * k + 2 * p]);
          if (2 * p + 1 < k) w |= bf16_bits(src[row * k + 2 * p + 1]) << 16;
        }
        dst[(nb * kp + p) * 16 + i] = w;
      }
}
// Element (row, c) of a packed [n, k] operand, as fp32.
double packed_at(const uint32_t* P, int64_t k, int64_t row, int64_t c) {
  const int64_t kp = sgmv_bf16::pairs(k);
  return bf16_value(P[((row / 16) * kp + c / 2) * 16 + row % 16], static_cast<int>(c & 1));
}
}  // namespace

void lora_pack_bf16(SimdLevel level, int64_t r, int64_t in, int64_t out, const float* A, const float* B, void* dst) {
  uint32_t* d = static_cast<uint32_t*>(dst);
#if defined(QLORA_X86)
  if (level == SimdLevel::AVX512 && lora_bf16_available(level)) {  // vcvtne2ps2bf16 + transposes: same bits
    sgmv_bf16::pack_lanes_avx512bf16(r, in, A, d);
    sgmv_bf16::pack_lanes_avx512bf16(out, r, B, d + sgmv_bf16::a_words(r, in));
    return;
  }
#endif
  (void)level;
  pack_lanes(r, in, A, d);
  pack_lanes(out, r, B, d + sgmv_bf16::a_words(r, in));
}

void lora_segments_scalar(int64_t np, const Backend::LoraProblem* P, float* t) {
  for (int64_t i = 0; i < np; ++i) {
    const Backend::LoraProblem& p = P[i];
    check_problem(p);
    for (int64_t s = 0; s < p.n; ++s) {
      const Backend::LoraSegment& g = p.seg[s];
      if (g.rows <= 0 || g.alpha == 0.0f) continue;
      const float* x = p.x + g.row0 * p.ldx;
      float* y = p.y + g.row0 * p.ldy;
      if (!g.AB16) {  // Backend::lora_segments' reference
        gemm_nt(SimdLevel::Scalar, g.rows, g.r, p.in, 1.0f, x, p.ldx, g.A, p.in, 0.0f, t, g.r);
        gemm_nt(SimdLevel::Scalar, g.rows, p.out, g.r, g.alpha, t, g.r, g.B, g.r, 1.0f, y, p.ldy);
        continue;
      }
      const uint32_t* Ap = static_cast<const uint32_t*>(g.AB16);
      const uint32_t* Bp = Ap + sgmv_bf16::a_words(g.r, p.in);
      std::vector<double> tr(static_cast<size_t>(g.r));
      for (int64_t m = 0; m < g.rows; ++m) {
        for (int64_t j = 0; j < g.r; ++j) {
          double acc = 0;
          for (int64_t k = 0; k < p.in; ++k)
            acc += static_cast<double>(bf16_round(x[m * p.ldx + k])) * packed_at(Ap, p.in, j, k);
          tr[static_cast<size_t>(j)] = bf16_round(static_cast<float>(acc));  // t stored fp32, then rounded
        }
        for (int64_t n = 0; n < p.out; ++n) {
          double acc = 0;
          for (int64_t j = 0; j < g.r; ++j) acc += tr[static_cast<size_t>(j)] * packed_at(Bp, g.r, n, j);
          y[m * p.ldy + n] = static_cast<float>(static_cast<double>(y[m * p.ldy + n]) + g.alpha * acc);
        }
      }
    }
  }
}

}  // namespace qlora::cpu
