// Portable KV-cache attention block (contract in cpu/attention_kernels.hpp): plain loops the
// compiler vectorizes for the baseline ISA; exact std::exp2, softmax denominator in double.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "cpu/attention_kernels.hpp"
#include "cpu/kv_dot.hpp"

namespace qlora::cpu::attn_k {

namespace {
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// T = float (fp32 cache) or uint16_t (bf16 cache, widened on load).
template <class T>
void attn_block(int64_t R, int64_t hd, const float* Qp, const T* K, const T* V, const int32_t* km,
                const int64_t* n_vis, float* S, int64_t lds, float* O) {
  const int64_t n_max = *std::max_element(n_vis, n_vis + R);
  float inv[kMaxRows];  // [R] 1 / denominator, 0 for a row that sees no key
  for (int64_t r = 0; r < R; ++r) {
    const float* qr = Qp + r * hd;
    float* Sr = S + r * lds;  // [n_max]: scores, then weights (0 where not visible)
    const int64_t n = n_vis[r];
    float m = kNegInf;
    for (int64_t s = 0; s < n; ++s) {
      Sr[s] = km[s] ? dot(qr, K + s * hd, hd) : kNegInf;
      m = std::max(m, Sr[s]);
    }
    double denom = 0.0;
    for (int64_t s = 0; s < n; ++s) {
      Sr[s] = (m != kNegInf && km[s]) ? std::exp2(Sr[s] - m) : 0.0f;
      denom += Sr[s];
    }
    std::fill(Sr + n, Sr + n_max, 0.0f);
    inv[r] = denom > 0.0 ? static_cast<float>(1.0 / denom) : 0.0f;
  }
  std::fill(O, O + R * hd, 0.0f);
  for (int64_t s = 0; s < n_max; ++s) {  // each V row read once for the block
    const T* vs = V + s * hd;
    for (int64_t r = 0; r < R; ++r) {
      const float p = S[r * lds + s];
      if (p == 0.0f) continue;
      float* o = O + r * hd;
      for (int64_t i = 0; i < hd; ++i) o[i] += p * wide(vs[i]);
    }
  }
  for (int64_t r = 0; r < R; ++r)
    for (int64_t i = 0; i < hd; ++i) O[r * hd + i] *= inv[r];
}
}  // namespace

void attn_block_generic(int64_t R, int64_t hd, const float* Qp, const float* K, const float* V, const int32_t* km,
                        const int64_t* n_vis, float* S, int64_t lds, float* O) {
  attn_block<float>(R, hd, Qp, K, V, km, n_vis, S, lds, O);
}
void attn_block_generic_bf16(int64_t R, int64_t hd, const float* Qp, const uint16_t* K, const uint16_t* V,
                             const int32_t* km, const int64_t* n_vis, float* S, int64_t lds, float* O) {
  attn_block<uint16_t>(R, hd, Qp, K, V, km, n_vis, S, lds, O);
}

}  // namespace qlora::cpu::attn_k
