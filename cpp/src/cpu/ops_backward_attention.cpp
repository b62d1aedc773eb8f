// Training attention: causal GQA self-attention over the sequence (no KV cache) that keeps the
// per-row logsumexp, and its backward, which recomputes the probabilities from q, k and the
// logsumexp (flash-attention style: no [T, T] matrix per head is kept between forward and
// backward; only one [64, T] tile per task exists at a time).
// The tile products run through the CPU GEMM kernels of the backend's SIMD level; they are called
// from inside pool tasks, where a GEMM runs serially (threads.hpp), so tasks never oversubscribe.
// The exp passes use the level's SIMD exp (cpu/rowops_kernels.hpp; std::exp at scalar / generic).
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu/gemm.hpp"
#include "cpu/ops_backward.hpp"
#include "cpu/rowops_kernels.hpp"
#include "cpu/threads.hpp"

namespace qlora::cpu::ops {

namespace {
constexpr int64_t kBlock = 64;  // queries (forward, dq) or keys (dk/dv) per task
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// In place on a tile S[rows, cols] (row stride ld) of scale·q·kᵀ for queries t0 + i and keys
// s0 + j: P = exp(S - lse_t) where key s is visible to query t (s <= t, mask != 0), else 0.
// kr: SIMD exp kernels or nullptr (std::exp); km_all: km[s0 .. s0 + cols) are all nonzero.
void probs_from_lse(const rowk::Kernels* kr, float* S, int64_t ld, int64_t rows, int64_t cols, int64_t t0, int64_t s0,
                    const int32_t* km, bool km_all, const float* lse) {
  for (int64_t i = 0; i < rows; ++i) {
    float* r = S + i * ld;
    const int64_t t = t0 + i;
    const float l = lse[t];
    const int64_t n_vis = std::clamp<int64_t>(t - s0 + 1, 0, cols);  // causal: columns j < n_vis
    if (l == kNegInf) {
      std::fill(r, r + cols, 0.0f);
      continue;
    }
    if (kr) {
      kr->exp_scale(r, n_vis, l, 1.0f);
      if (!km_all)
        for (int64_t j = 0; j < n_vis; ++j) r[j] = km[s0 + j] ? r[j] : 0.0f;
    } else {
      for (int64_t j = 0; j < n_vis; ++j) r[j] = km[s0 + j] ? std::exp(r[j] - l) : 0.0f;
    }
    std::fill(r + n_vis, r + cols, 0.0f);
  }
}

// dS = P (dP - delta_t) scale, written over dP (both [rows, cols], row stride ld).
void dscores(const float* P, float* dP, int64_t ld, int64_t rows, int64_t cols, const float* delta, float scale) {
  for (int64_t i = 0; i < rows; ++i) {
    const float* p = P + i * ld;
    float* d = dP + i * ld;
    const float dl = delta[i];
    for (int64_t j = 0; j < cols; ++j) d[j] = p[j] * (d[j] - dl) * scale;
  }
}

bool all_nonzero(const int32_t* km, int64_t n) { return std::find(km, km + n, 0) == km + n; }
}  // namespace

void attention_train(SimdLevel level, int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t hd, const float* q,
                     int64_t ldq, const float* k, int64_t ldk, const float* v, int64_t ldv, const int32_t* key_mask,
                     float scale, float* out, int64_t ldo, float* lse) {
  const int64_t group = Hq / Hkv, nblk = (T + kBlock - 1) / kBlock;
  const rowk::Kernels* kr = rowk::for_level(level);
  // Task = (b, query head, block of queries t0..t0+mq), seeing keys 0..t0+mq-1.
  parallel_range(B * Hq * nblk, 1, [&](int64_t p0, int64_t p1) {
    std::vector<float> S(static_cast<size_t>(kBlock * T));  // [mq, nk] scores, then probabilities
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t b = p / (Hq * nblk), h = (p / nblk) % Hq, blk = p % nblk, kh = h / group;
      const int64_t t0 = blk * kBlock, mq = std::min(kBlock, T - t0), nk = t0 + mq;
      const int32_t* km = key_mask + b * T;
      float* l = lse + (b * Hq + h) * T;
      const bool km_all = all_nonzero(km, nk);
      gemm_nt(level, mq, nk, hd, scale, q + (b * T + t0) * ldq + h * hd, ldq, k + b * T * ldk + kh * hd, ldk, 0.0f,
              S.data(), nk);
      for (int64_t i = 0; i < mq; ++i) {
        float* r = S.data() + i * nk;
        const int64_t t = t0 + i;
        if (kr) {  // masked keys -> -inf, whose SIMD exp is exactly 0
          if (!km_all)
            for (int64_t s = 0; s <= t; ++s) r[s] = km[s] ? r[s] : kNegInf;
          const float mx = kr->max(r, t + 1);
          if (mx == kNegInf) {
            std::fill(r, r + nk, 0.0f);
            l[t] = kNegInf;
            continue;
          }
          const double denom = kr->exp_sum(r, t + 1, mx);
          const float inv = static_cast<float>(1.0 / denom);
          for (int64_t s = 0; s <= t; ++s) r[s] *= inv;
          std::fill(r + t + 1, r + nk, 0.0f);
          l[t] = mx + static_cast<float>(std::log(denom));
          continue;
        }
        float mx = kNegInf;
        for (int64_t s = 0; s <= t; ++s)
          if (km[s]) mx = std::max(mx, r[s]);
        if (mx == kNegInf) {  // no visible key: probabilities 0 (so output 0), lse -inf
          std::fill(r, r + nk, 0.0f);
          l[t] = kNegInf;
          continue;
        }
        double denom = 0.0;
        for (int64_t s = 0; s <= t; ++s) {
          r[s] = km[s] ? std::exp(r[s] - mx) : 0.0f;
          denom += r[s];
        }
        const float inv = static_cast<float>(1.0 / denom);
        for (int64_t s = 0; s <= t; ++s) r[s] *= inv;
        std::fill(r + t + 1, r + nk, 0.0f);
        l[t] = mx + static_cast<float>(std::log(denom));
      }
      // out rows = P · V
      gemm_nn(level, mq, hd, nk, 1.0f, S.data(), nk, v + b * T * ldv + kh * hd, ldv, 0.0f,
              out + (b * T + t0) * ldo + h * hd, ldo);
    }
  });
}

// With P = softmax(S), S = scale q·kᵀ, O = P·V and delta_t = dO_t·O_t:
//   dV = Pᵀ·dO,  dS = P ⊙ (dO·Vᵀ - delta),  dQ = scale dS·K,  dK = scale dSᵀ·Q   (P = exp(S - lse)).
// No two tasks may write the same rows (no atomics), so either
//  - fused (5 tile GEMMs per tile): one task per (b, KV head) walks the query blocks of every
//    query head of its group, writes dQ per block and accumulates dK, dV of the whole sequence of
//    that KV head in place (beta = 1), computing P and dS once; used when the B * Hkv equal tasks
//    keep the machine's physical cores >= 75% busy (tasks / (rounds * cores)). The choice depends
//    on the shape and the machine, never on the thread count, so results do not change with
//    set_num_threads (dK, dV sum their query blocks in a different order in the two ways);
//    QLORA_ATTN_BACKWARD=fused|split forces one (tests run both on any machine);
//  - else two passes (7 tile GEMMs, more tasks): pass 1 over query blocks writes dQ; pass 2 over key
//    blocks of one KV head, looping over every query head of its group, recomputes P and dP and
//    writes dK and dV.
void attention_train_backward(SimdLevel level, int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t hd,
                              const float* q, int64_t ldq, const float* k, int64_t ldk, const float* v, int64_t ldv,
                              const int32_t* key_mask, float scale, const float* out, int64_t ldo,
                              const float* lse, const float* dout, int64_t lddo, float* dq, int64_t lddq,
                              float* dk, int64_t lddk, float* dv, int64_t lddv) {
  const int64_t group = Hq / Hkv, nblk = (T + kBlock - 1) / kBlock;
  const rowk::Kernels* kr = rowk::for_level(level);
  std::vector<float> delta(static_cast<size_t>(B * Hq * T));  // [B, Hq, T]
  parallel_range(B * Hq * T, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {  // r = (b * Hq + h) * T + t
      const int64_t t = r % T, h = (r / T) % Hq, b = r / (T * Hq);
      const float* go = dout + (b * T + t) * lddo + h * hd;
      const float* o = out + (b * T + t) * ldo + h * hd;
      float d = 0.0f;
      for (int64_t i = 0; i < hd; ++i) d += go[i] * o[i];
      delta[r] = d;
    }
  });

  const int64_t tasks = B * Hkv, nt = std::max(1, physical_cores());
  const int64_t rounds = (tasks + nt - 1) / nt;
  const char* force = std::getenv("QLORA_ATTN_BACKWARD");
  const bool fused = force && std::strcmp(force, "fused") == 0   ? true
                     : force && std::strcmp(force, "split") == 0 ? false
                                                                 : 4 * tasks >= 3 * rounds * nt;
  if (fused) {
    parallel_range(tasks, 1, [&](int64_t p0, int64_t p1) {
      std::vector<float> P(static_cast<size_t>(kBlock * T)), dP(P.size());  // [mq, nk] each
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t b = p / Hkv, kh = p % Hkv;
        const float* Kb = k + b * T * ldk + kh * hd;  // [T, hd] rows of KV head kh
        const float* Vb = v + b * T * ldv + kh * hd;
        float* dKb = dk + b * T * lddk + kh * hd;
        float* dVb = dv + b * T * lddv + kh * hd;
        const int32_t* km = key_mask + b * T;
        for (int64_t t = 0; t < T; ++t) {
          std::fill(dKb + t * lddk, dKb + t * lddk + hd, 0.0f);
          std::fill(dVb + t * lddv, dVb + t * lddv + hd, 0.0f);
        }
        for (int64_t blk = 0; blk < nblk; ++blk) {
          const int64_t t0 = blk * kBlock, mq = std::min(kBlock, T - t0), nk = t0 + mq;
          const bool km_all = all_nonzero(km, nk);
          for (int64_t h = kh * group; h < (kh + 1) * group; ++h) {
            const float* Qr = q + (b * T + t0) * ldq + h * hd;        // [mq, hd]
            const float* dOr = dout + (b * T + t0) * lddo + h * hd;  // [mq, hd]
            gemm_nt(level, mq, nk, hd, scale, Qr, ldq, Kb, ldk, 0.0f, P.data(), nk);
            probs_from_lse(kr, P.data(), nk, mq, nk, t0, 0, km, km_all, lse + (b * Hq + h) * T);
            gemm_nt(level, mq, nk, hd, 1.0f, dOr, lddo, Vb, ldv, 0.0f, dP.data(), nk);
            dscores(P.data(), dP.data(), nk, mq, nk, delta.data() + (b * Hq + h) * T + t0, scale);
            gemm_nn(level, mq, hd, nk, 1.0f, dP.data(), nk, Kb, ldk, 0.0f, dq + (b * T + t0) * lddq + h * hd, lddq);
            gemm_tn(level, nk, hd, mq, 1.0f, dP.data(), nk, Qr, ldq, 1.0f, dKb, lddk);
            gemm_tn(level, nk, hd, mq, 1.0f, P.data(), nk, dOr, lddo, 1.0f, dVb, lddv);
          }
        }
      }
    });
    return;
  }

  parallel_range(B * Hq * nblk, 1, [&](int64_t p0, int64_t p1) {
    std::vector<float> P(static_cast<size_t>(kBlock * T)), dP(P.size());  // [mq, nk] each
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t b = p / (Hq * nblk), h = (p / nblk) % Hq, blk = p % nblk, kh = h / group;
      const int64_t t0 = blk * kBlock, mq = std::min(kBlock, T - t0), nk = t0 + mq;
      const float* Kb = k + b * T * ldk + kh * hd;  // [T, hd] rows of KV head kh
      gemm_nt(level, mq, nk, hd, scale, q + (b * T + t0) * ldq + h * hd, ldq, Kb, ldk, 0.0f, P.data(), nk);
      probs_from_lse(kr, P.data(), nk, mq, nk, t0, 0, key_mask + b * T, all_nonzero(key_mask + b * T, nk),
                     lse + (b * Hq + h) * T);
      gemm_nt(level, mq, nk, hd, 1.0f, dout + (b * T + t0) * lddo + h * hd, lddo, v + b * T * ldv + kh * hd, ldv, 0.0f,
              dP.data(), nk);
      dscores(P.data(), dP.data(), nk, mq, nk, delta.data() + (b * Hq + h) * T + t0, scale);
      gemm_nn(level, mq, hd, nk, 1.0f, dP.data(), nk, Kb, ldk, 0.0f, dq + (b * T + t0) * lddq + h * hd, lddq);
    }
  });

  parallel_range(B * Hkv * nblk, 1, [&](int64_t p0, int64_t p1) {
    std::vector<float> P(static_cast<size_t>(T * kBlock)), dP(P.size());  // [nq, ns] each
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t b = p / (Hkv * nblk), kh = (p / nblk) % Hkv, blk = p % nblk;
      const int64_t s0 = blk * kBlock, ns = std::min(kBlock, T - s0), nq = T - s0;  // queries t >= s0 see the block
      const float* Kb = k + (b * T + s0) * ldk + kh * hd;  // [ns, hd]
      const float* Vb = v + (b * T + s0) * ldv + kh * hd;
      float* dKb = dk + (b * T + s0) * lddk + kh * hd;
      float* dVb = dv + (b * T + s0) * lddv + kh * hd;
      const bool km_all = all_nonzero(key_mask + b * T + s0, ns);
      for (int64_t h = kh * group; h < (kh + 1) * group; ++h) {
        const float* Qr = q + (b * T + s0) * ldq + h * hd;     // [nq, hd]
        const float* dOr = dout + (b * T + s0) * lddo + h * hd;  // [nq, hd]
        const float beta = h == kh * group ? 0.0f : 1.0f;        // the first head overwrites
        gemm_nt(level, nq, ns, hd, scale, Qr, ldq, Kb, ldk, 0.0f, P.data(), ns);
        probs_from_lse(kr, P.data(), ns, nq, ns, s0, s0, key_mask + b * T, km_all, lse + (b * Hq + h) * T);
        gemm_nt(level, nq, ns, hd, 1.0f, dOr, lddo, Vb, ldv, 0.0f, dP.data(), ns);
        dscores(P.data(), dP.data(), ns, nq, ns, delta.data() + (b * Hq + h) * T + s0, scale);
        gemm_tn(level, ns, hd, nq, 1.0f, dP.data(), ns, Qr, ldq, beta, dKb, lddk);
        gemm_tn(level, ns, hd, nq, 1.0f, P.data(), ns, dOr, lddo, beta, dVb, lddv);
      }
    }
  });
}

}  // namespace qlora::cpu::ops
