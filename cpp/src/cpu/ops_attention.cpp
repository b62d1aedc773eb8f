// RoPE, KV-cache writes and causal grouped-query attention over the KV cache (fp32 softmax;
// per-level kernels in cpu/attention_kernels*.cpp, the scalar level keeps a plain reference loop).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "cpu/attention_kernels.hpp"
#include "cpu/gemm_bf16.hpp"
#include "cpu/kv_dot.hpp"
#include "cpu/ops_model.hpp"
#include "cpu/threads.hpp"

namespace qlora::cpu::ops {

namespace {
// cos / sin of every (position, frequency) of the last call, per calling thread: q and k of every
// layer of a forward pass rotate by the same angles, so a pass computes them once instead of
// 2 * layers times (the double cos/sin had cost ~0.2 ms of a batch-8 decode step).
struct RopeAngles {
  std::vector<int32_t> pos;  // [M]
  std::vector<float> inv;    // [half]
  std::vector<float> cs;     // [M, 2, half]: cos | sin of pos[m] * inv[i]
};
thread_local RopeAngles t_angles;

const float* rope_angles(int64_t M, int64_t half, const int32_t* pos, const float* inv_freq) {
  RopeAngles& t = t_angles;
  if (static_cast<int64_t>(t.pos.size()) == M && static_cast<int64_t>(t.inv.size()) == half &&
      std::equal(pos, pos + M, t.pos.begin()) && std::equal(inv_freq, inv_freq + half, t.inv.begin()))
    return t.cs.data();
  t.pos.assign(pos, pos + M);
  t.inv.assign(inv_freq, inv_freq + half);
  t.cs.resize(static_cast<size_t>(M * 2 * half));
  float* cs = t.cs.data();
  parallel_range(M, 8, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float p = static_cast<float>(pos[m]);
      for (int64_t i = 0; i < half; ++i) {
        // transformers: freqs = pos * inv_freq in fp32, then cos/sin in fp32 (rounded from double here).
        const float a = p * inv_freq[i];
        cs[m * 2 * half + i] = static_cast<float>(std::cos(static_cast<double>(a)));
        cs[m * 2 * half + half + i] = static_cast<float>(std::sin(static_cast<double>(a)));
      }
    }
  });
  return cs;
}
}  // namespace

void rope_rotate(int64_t M, int64_t n_heads, int64_t head_dim, float* x, int64_t ldx, const int32_t* pos,
                 const float* inv_freq, bool inverse) {
  const int64_t half = head_dim / 2;
  const float* cs = rope_angles(M, half, pos, inv_freq);  // [M, 2, half]
  parallel_range(M, 8, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float* c = cs + m * 2 * half;  // [cos | sin] of this token
      float* row = x + m * ldx;
      for (int64_t h = 0; h < n_heads; ++h) {
        float* v = row + h * head_dim;
        for (int64_t i = 0; i < half; ++i) {
          // inverse: rotation by -angle, the transpose (an exact negation of sin)
          const float x1 = v[i], x2 = v[half + i], co = c[i], sn = inverse ? -c[half + i] : c[half + i];
          v[i] = x1 * co - x2 * sn;
          v[half + i] = x2 * co + x1 * sn;
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

void kv_write_bf16(int64_t B, int64_t T, int64_t H, int64_t hd, const float* x, int64_t ldx, uint16_t* cache,
                   int64_t S_cap, int64_t start) {
  parallel_range(B * T, std::max<int64_t>(16, 16384 / std::max<int64_t>(1, H * hd)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / T, t = r % T;
      for (int64_t h = 0; h < H; ++h) {
        const float* src = x + r * ldx + h * hd;
        uint16_t* dst = cache + ((b * H + h) * S_cap + start + t) * hd;
        for (int64_t i = 0; i < hd; ++i) {  // round to nearest even (bf16_round), keep the high half
          const float y = bf16_round(src[i]);
          uint32_t bits;
          std::memcpy(&bits, &y, 4);
          dst[i] = static_cast<uint16_t>(bits >> 16);
        }
      }
    }
  });
}

namespace {
// The cpu:scalar reference: one (b, query head) pair per task, one dot and one std::exp per key.
// E = float (fp32 cache) or uint16_t (bf16 cache, each element widened exactly).
template <class E>
void attention_reference(int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t hd, const float* q,
                         int64_t ldq, const E* k_cache, const E* v_cache, int64_t S_cap, int64_t start,
                         const int32_t* key_mask, float scale, float* out, int64_t ldo) {
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
      const E* K = k_cache + (b * Hkv + kh) * S_cap * hd;  // [S_cap, hd]
      const E* V = v_cache + (b * Hkv + kh) * S_cap * hd;  // [S_cap, hd]
      const int32_t* km = key_mask + b * S_cap;                // [S_cap]
      for (int64_t t = 0; t < T; ++t) {
        const float* qv = q + (b * T + t) * ldq + h * hd;
        float* o = out + (b * T + t) * ldo + h * hd;
        const int64_t last = start + t;  // causal: slots [0, last]
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t s = 0; s <= last; ++s) {
          if (!km[s]) continue;
          const E* kv = K + s * hd;
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
          const E* vv = V + s * hd;
          for (int64_t i = 0; i < hd; ++i) acc[i] += w * wide(vv[i]);
        }
        const float inv = static_cast<float>(1.0 / denom);
        for (int64_t i = 0; i < hd; ++i) o[i] = acc[i] * inv;
      }
    }
  });
}

// The blocked driver over the per-level kernel `block` (E: the cache's element type).
template <class E, class BlockFn>
void attention_blocked(BlockFn block, int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t hd, const float* q,
                       int64_t ldq, const E* k_cache, const E* v_cache, int64_t S_cap, int64_t start,
                       const int32_t* key_mask, float scale, float* out, int64_t ldo) {
  // Rows of one (b, kv head) group: r = t * G + g for query t and query head kh * G + g; t-major so
  // a block's causal limits are close. A task = up to kMaxRows rows of one group, so every K/V row
  // is read once per block for all its GQA heads and queries (decode: one task per group).
  const int64_t G = Hq / Hkv, rows = T * G, nblk = (rows + attn_k::kMaxRows - 1) / attn_k::kMaxRows;
  const int64_t S_end = start + T;  // slots in use after this call
  const int64_t lds = (S_end + attn_k::kLdsAlign - 1) / attn_k::kLdsAlign * attn_k::kLdsAlign;
  // Queries are pre-scaled by scale * log2(e) (one fp32 rounding) so the kernels take exp2.
  const float qscale = static_cast<float>(static_cast<double>(scale) * 1.4426950408889634);
  // Thread hand-off costs ~5-10 us: chunks of at least ~256K flops (2 dots of hd per row and key).
  const int64_t blk_flops = std::max<int64_t>(1, 4 * std::min(rows, attn_k::kMaxRows) * S_end * hd);
  parallel_range(B * Hkv * nblk, std::max<int64_t>(1, (int64_t{1} << 18) / blk_flops), [&](int64_t p0, int64_t p1) {
    // Scratch left uninitialized (the kernels write before they read): zeroing it would cost a
    // decode step more than the attention itself.
    const int64_t rmax = std::min(rows, attn_k::kMaxRows);
    std::unique_ptr<float[]> S(new float[rmax * lds]);   // [rmax, lds] scores / weights
    std::unique_ptr<float[]> Qp(new float[rmax * hd]);   // [rmax, hd] scaled queries
    std::unique_ptr<float[]> Ob(new float[rmax * hd]);   // [rmax, hd] outputs
    int64_t n_vis[attn_k::kMaxRows];
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t b = p / (Hkv * nblk), kh = (p / nblk) % Hkv, r0 = (p % nblk) * attn_k::kMaxRows;
      const int64_t R = std::min(attn_k::kMaxRows, rows - r0);
      for (int64_t i = 0; i < R; ++i) {
        const int64_t t = (r0 + i) / G, h = kh * G + (r0 + i) % G;
        const float* src = q + (b * T + t) * ldq + h * hd;
        for (int64_t j = 0; j < hd; ++j) Qp[i * hd + j] = src[j] * qscale;
        n_vis[i] = start + t + 1;  // causal: slots [0, start + t]
      }
      const int64_t off = (b * Hkv + kh) * S_cap * hd;  // [S_cap, hd] slab of this (b, kv head)
      block(R, hd, Qp.get(), k_cache + off, v_cache + off, key_mask + b * S_cap, n_vis, S.get(), lds, Ob.get());
      for (int64_t i = 0; i < R; ++i) {
        const int64_t t = (r0 + i) / G, h = kh * G + (r0 + i) % G;
        std::memcpy(out + (b * T + t) * ldo + h * hd, Ob.get() + i * hd, sizeof(float) * hd);
      }
    }
  });
}
}  // namespace

void attention(SimdLevel level, int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t hd, const float* q,
               int64_t ldq, const float* k_cache, const float* v_cache, int64_t S_cap, int64_t start,
               const int32_t* key_mask, float scale, float* out, int64_t ldo) {
  if (level == SimdLevel::Scalar)
    return attention_reference(B, T, Hq, Hkv, hd, q, ldq, k_cache, v_cache, S_cap, start, key_mask, scale, out, ldo);
#if defined(QLORA_X86)
  const attn_k::AttnBlockFn block = level == SimdLevel::AVX512 ? attn_k::attn_block_avx512
                                    : level == SimdLevel::AVX2  ? attn_k::attn_block_avx2
                                                                : attn_k::attn_block_generic;
#else  // the *_avx2 / *_avx512 files are built on x86 only
  const attn_k::AttnBlockFn block = attn_k::attn_block_generic;
#endif
  attention_blocked(block, B, T, Hq, Hkv, hd, q, ldq, k_cache, v_cache, S_cap, start, key_mask, scale, out, ldo);
}

void attention_bf16(SimdLevel level, int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t hd, const float* q,
                    int64_t ldq, const uint16_t* k_cache, const uint16_t* v_cache, int64_t S_cap, int64_t start,
                    const int32_t* key_mask, float scale, float* out, int64_t ldo) {
  if (level == SimdLevel::Scalar)
    return attention_reference(B, T, Hq, Hkv, hd, q, ldq, k_cache, v_cache, S_cap, start, key_mask, scale, out, ldo);
#if defined(QLORA_X86)
  const attn_k::AttnBlockBf16Fn block = level == SimdLevel::AVX512 ? attn_k::attn_block_avx512_bf16
                                        : level == SimdLevel::AVX2  ? attn_k::attn_block_avx2_bf16
                                                                    : attn_k::attn_block_generic_bf16;
#else
  const attn_k::AttnBlockBf16Fn block = attn_k::attn_block_generic_bf16;
#endif
  attention_blocked(block, B, T, Hq, Hkv, hd, q, ldq, k_cache, v_cache, S_cap, start, key_mask, scale, out, ldo);
}

}  // namespace qlora::cpu::ops
