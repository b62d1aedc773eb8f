// RoPE, KV-cache writes and causal grouped-query attention (fp32, exact softmax).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu/ops_model.hpp"
#include "cpu/threads.hpp"

namespace qlora::cpu::ops {

namespace {
// 8 independent partial sums: vectorizable without -ffast-math, and more accurate than one chain.
float dot(const float* a, const float* b, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
  float d = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < n; ++i) d += a[i] * b[i];
  return d;
}
}  // namespace

void rope_rotate(int64_t M, int64_t n_heads, int64_t head_dim, float* x, int64_t ldx, const int32_t* pos,
                 const float* inv_freq, bool inverse) {
  const int64_t half = head_dim / 2;
  parallel_range(M, 8, [&](int64_t m0, int64_t m1) {
    std::vector<float> cs(2 * half);  // [cos | sin] for one token
    for (int64_t m = m0; m < m1; ++m) {
      const float p = static_cast<float>(pos[m]);
      for (int64_t i = 0; i < half; ++i) {
        // transformers: freqs = pos * inv_freq in fp32, then cos/sin in fp32 (rounded from double here).
        const float a = p * inv_freq[i];
        cs[i] = static_cast<float>(std::cos(static_cast<double>(a)));
        const float sn = static_cast<float>(std::sin(static_cast<double>(a)));
        cs[half + i] = inverse ? -sn : sn;  // rotation by -angle: the transpose (exact negation)
      }
      float* row = x + m * ldx;
      for (int64_t h = 0; h < n_heads; ++h) {
        float* v = row + h * head_dim;
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = v[i], x2 = v[half + i], c = cs[i], s = cs[half + i];
          v[i] = x1 * c - x2 * s;
          v[half + i] = x2 * c + x1 * s;
        }
      }
    }
  });
}

void rope(int64_t M, int64_t n_heads, int64_t head_dim, float* x, int64_t ldx, const int32_t* pos,
          const float* inv_freq) {
  rope_rotate(M, n_heads, head_dim, x, ldx, pos, inv_freq, /*inverse=*/false);
}

void kv_write(int64_t B, int64_t T, int64_t H, int64_t hd, const float* x, int64_t ldx, float* cache, int64_t S_cap,
              int64_t start) {
  parallel_range(B * T, std::max<int64_t>(16, 16384 / std::max<int64_t>(1, H * hd)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / T, t = r % T;
      for (int64_t h = 0; h < H; ++h)
        std::memcpy(cache + ((b * H + h) * S_cap + start + t) * hd, x + r * ldx + h * hd, sizeof(float) * hd);
    }
  });
}

void attention(int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t hd, const float* q, int64_t ldq,
               const float* k_cache, const float* v_cache, int64_t S_cap, int64_t start, const int32_t* key_mask,
               float scale, float* out, int64_t ldo) {
  const int64_t group = Hq / Hkv;
  const int64_t S_end = start + T;  // slots in use after this call
  // One task = one (b, query head) pair over all its T queries; scratch is per task chunk.
  // Decode steps are tiny: group pairs so a chunk does ~64K multiply-adds (thread hand-off costs more).
  const int64_t pair_work = std::max<int64_t>(1, T * S_end * hd * 2);
  parallel_range(B * Hq, std::max<int64_t>(1, 65536 / pair_work), [&](int64_t p0, int64_t p1) {
    std::vector<float> score(S_end);  // [S_end]
    std::vector<float> acc(hd);       // [hd]
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t b = p / Hq, h = p % Hq, kh = h / group;
      const float* K = k_cache + (b * Hkv + kh) * S_cap * hd;  // [S_cap, hd]
      const float* V = v_cache + (b * Hkv + kh) * S_cap * hd;  // [S_cap, hd]
      const int32_t* km = key_mask + b * S_cap;                // [S_cap]
      for (int64_t t = 0; t < T; ++t) {
        const float* qv = q + (b * T + t) * ldq + h * hd;
        float* o = out + (b * T + t) * ldo + h * hd;
        const int64_t last = start + t;  // causal: slots [0, last]
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t s = 0; s <= last; ++s) {
          if (!km[s]) continue;
          const float* kv = K + s * hd;
          score[s] = dot(qv, kv, hd) * scale;
          mx = std::max(mx, score[s]);
        }
        std::fill(acc.begin(), acc.end(), 0.0f);
        if (mx == -std::numeric_limits<float>::infinity()) {  // no visible key (a padding query)
          std::memcpy(o, acc.data(), sizeof(float) * hd);
          continue;
        }
        double denom = 0.0;
        for (int64_t s = 0; s <= last; ++s) {
          if (!km[s]) continue;
          const float w = std::exp(score[s] - mx);
          denom += w;
          const float* vv = V + s * hd;
          for (int64_t i = 0; i < hd; ++i) acc[i] += w * vv[i];
        }
        const float inv = static_cast<float>(1.0 / denom);
        for (int64_t i = 0; i < hd; ++i) o[i] = acc[i] * inv;
      }
    }
  });
}

}  // namespace qlora::cpu::ops
