// Training attention: causal GQA self-attention over the sequence (no KV cache) that keeps the
// per-row logsumexp, and its backward, which recomputes the probabilities from q, k and the
// logsumexp (flash-attention style: no [T, T] matrix per head is kept between forward and
// backward; only one [64, T] tile per task exists at a time).
// The tile products run through the CPU GEMM kernels of the backend's SIMD level; they are called
// from inside pool tasks, where a GEMM runs serially (threads.hpp), so tasks never oversubscribe.
// The exp passes use the level's SIMD exp (cpu/rowops_kernels.hpp; std::exp at scalar / generic).
// bf16 compute (compute_dtype="bfloat16"): the tile products P·v, dout·vᵀ, dS·k, dSᵀ·q and Pᵀ·dout
// round their operands to bf16 and accumulate in fp32; the scores S = scale q·kᵀ stay fp32, as do
// softmax, lse, delta and the outputs. (Scores in bf16 err by ~u·|S| absolutely, which the softmax
// turns into a relative error of P: on the tiny 2-layer test model it tripled the LoRA gradient
// error and made it exceed PEFT's bf16 autocast; the other four products added < 10%.) On
// AVX512-BF16 a dedicated path (ops_attention_train_bf16.cpp) packs K and V of a (batch, KV head)
// once into bf16 pair panels and runs the vdpbf16ps micro-kernel on 14-row tiles, skipping the keys
// no row of a tile sees (causal); at the scalar level the tiles go through the bf16 GEMM oracle. The
// A operands of the tiles (queries, P, dS, dout) are read in place rather than packed per tile where
// the level has such a kernel (QLORA_ATTN_DIRECT, cpu/attention_train_kernels.hpp; same bits either way).
// This file: the entry points, the fp32 panels and the GEMM way; the helpers both files use
// (cpu/ops_attention_train_shared.hpp).
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cpu/attention_train_kernels.hpp"
#include "cpu/features.hpp"
#include "cpu/gemm.hpp"
#include "cpu/gemm_bf16.hpp"
#include "cpu/gemm_kernels.hpp"
#include "cpu/gemv_f32.hpp"
#include "cpu/ops_attention_train_shared.hpp"
#include "cpu/ops_backward.hpp"
#include "cpu/rowops_kernels.hpp"
#include "cpu/threads.hpp"

namespace qlora::cpu::ops {
using namespace attn;

namespace attn {
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

void softmax_rows(const rowk::Kernels* kr, float* S, int64_t nk, int64_t mq, int64_t t0, const int32_t* km,
                  bool km_all, float* l, float* inv_out) {
  for (int64_t i = 0; i < mq; ++i) {
    float* r = S + i * nk;
    const int64_t t = t0 + i;
    float mx = kNegInf;
    if (kr) {  // masked keys -> -inf, whose SIMD exp is exactly 0
      if (!km_all)
        for (int64_t s = 0; s <= t; ++s) r[s] = km[s] ? r[s] : kNegInf;
      mx = kr->max(r, t + 1);
    } else {
      for (int64_t s = 0; s <= t; ++s)
        if (km[s]) mx = std::max(mx, r[s]);
    }
    if (mx == kNegInf) {  // no visible key: probabilities 0 (so output 0), lse -inf
      std::fill(r, r + nk, 0.0f);
      l[t] = kNegInf;
      if (inv_out) inv_out[i] = 0.0f;
      continue;
    }
    double denom = 0.0;
    if (kr) {
      denom = kr->exp_sum(r, t + 1, mx);
    } else {
      for (int64_t s = 0; s <= t; ++s) {
        r[s] = km[s] ? std::exp(r[s] - mx) : 0.0f;
        denom += r[s];
      }
    }
    const float inv = static_cast<float>(1.0 / denom);
    if (inv_out)
      inv_out[i] = inv;
    else
      for (int64_t s = 0; s <= t; ++s) r[s] *= inv;
    std::fill(r + t + 1, r + nk, 0.0f);
    l[t] = mx + static_cast<float>(std::log(denom));
  }
}

void dscores_causal(const float* P, float* dP, int64_t ld, int64_t rows, int64_t cols, int64_t t0,
                    const float* delta, float scale) {
  for (int64_t i = 0; i < rows; ++i) {
    const float* p = P + i * ld;
    float* d = dP + i * ld;
    const float dl = delta[i];
    const int64_t n_vis = std::clamp<int64_t>(t0 + i + 1, 0, cols);
    for (int64_t j = 0; j < n_vis; ++j) d[j] = p[j] * (d[j] - dl) * scale;
    std::fill(d + n_vis, d + cols, 0.0f);
  }
}
}  // namespace attn

namespace {
// dS = P (dP - delta_t) scale, written over dP (both [rows, cols], row stride ld).
void dscores(const float* P, float* dP, int64_t ld, int64_t rows, int64_t cols, const float* delta, float scale) {
  for (int64_t i = 0; i < rows; ++i) {
    const float* p = P + i * ld;
    float* d = dP + i * ld;
    const float dl = delta[i];
    for (int64_t j = 0; j < cols; ++j) d[j] = p[j] * (d[j] - dl) * scale;
  }
}

// The tile products: the level's fp32 GEMMs, or its bf16-compute GEMMs (cpu/gemm_bf16.hpp; the
// emulating oracle at the scalar level).
struct Gemms {
  SimdLevel level;
  bool bf16;
  void nt(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda, const float* B, int64_t ldb,
          float beta, float* C, int64_t ldc) const {
    if (bf16) return gemm_nt_bf16(level, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    gemm_nt(level, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  }
  void nn(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda, const float* B, int64_t ldb,
          float beta, float* C, int64_t ldc) const {
    if (bf16) return gemm_nn_bf16(level, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    gemm_nn(level, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  }
  void tn(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda, const float* B, int64_t ldb,
          float beta, float* C, int64_t ldc) const {
    if (bf16) return gemm_tn_bf16(level, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    gemm_tn(level, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  }
};

}  // namespace

#ifdef QLORA_X86
// ------------------------------------------------------------------ fp32 panels (scores, P·v)
// K (and V) of every (b, KV head) packed once into the level's GEMM panels (cpu/gemm.hpp
// gemm_panels) and reused by every query head of the group and every query block; each MR-row tile
// of a query block runs the micro-kernel over the keys some row of it sees (causal) only, instead
// of a full [64, nk] GEMM that packs K again per block and head and computes the masked triangle.
// Per element the FMA chains and depth blocks are those of gemm_nt / gemm_nn over the whole block
// (the skipped products are zeros), so the results are bit for bit those of the unpacked way.
namespace attn::fp {
bool usable(SimdLevel level, int64_t hd) {
  static const bool off = [] {
    const char* e = std::getenv("QLORA_ATTN_PANELS");
    return e && std::strcmp(e, "0") == 0;
  }();
  return !off && level != SimdLevel::Scalar && gemm_depth_block(level, hd) == hd;
}

// The in-place operand kernels (cpu/attention_train_kernels.hpp, gemm_k::ukernel_direct_*): the
// queries of the scores, the bf16 weights / score gradients of the products read where they lie
// instead of being packed per tile. Same chains, so the same bits as the packing way.
// QLORA_ATTN_DIRECT=0 turns them off (A/B runs; tests compare both ways bit for bit).
bool direct_on() {
  static const bool off = [] {
    const char* e = std::getenv("QLORA_ATTN_DIRECT");
    return e && std::strcmp(e, "0") == 0;
  }();
  return !off;
}
// The level's fp32 micro-kernel with A read in place (its MR x NR tile is gemm_panels(level)'s), or
// nullptr: pack A.
gemm_k::UkernelDirectFn direct_fn(SimdLevel level) {
  if (!direct_on()) return nullptr;
  if (level == SimdLevel::AVX512) return gemm_k::ukernel_direct_avx512;
  if (level == SimdLevel::AVX2) return gemm_k::ukernel_direct_avx2;
  return nullptr;
}

// Scores panels of the n rows of X[n, hd] (keys as columns): [ceil(n/NR)][hd][NR].
void pack_rows(const GemmPanels& gp, const float* X, int64_t ld, int64_t n, int64_t hd, float* P) {
  for (int64_t j = 0; j < n; j += gp.nr)
    gp.pack_b_t(X + j * ld, ld, static_cast<int>(std::min<int64_t>(gp.nr, n - j)), hd, P + (j / gp.nr) * gp.nr * hd);
}

// S[mq, ld] = alpha * Q[mq, hd]·Kᵀ for the keys each MR-row tile sees (Kp: pack_rows of K; the
// rest of S is left unwritten). Ap: MR * hd floats of scratch; dfn: direct_fn (Q read in place) or null.
void scores(const GemmPanels& gp, int64_t mq, int64_t nk, int64_t t0, int64_t hd, const float* Q, int64_t ldq,
            const float* Kp, float alpha, float* S, int64_t ld, float* Ap, gemm_k::UkernelDirectFn dfn) {
  for (int64_t ir = 0; ir < mq; ir += gp.mr) {
    const int mr = static_cast<int>(std::min<int64_t>(gp.mr, mq - ir));
    const int64_t n = keys_seen(t0, ir, mr, nk);
    if (dfn) {
      for (int64_t j = 0; j < n; j += gp.nr)
        dfn(hd, Q + ir * ldq, ldq, 1, Kp + (j / gp.nr) * gp.nr * hd, S + ir * ld + j, ld, alpha, 0.0f, mr,
            static_cast<int>(std::min<int64_t>(gp.nr, n - j)));
      continue;
    }
    gp.pack_a_rows(Q + ir * ldq, ldq, mr, hd, Ap);
    for (int64_t j = 0; j < n; j += gp.nr)
      gp.ukernel(hd, Ap, Kp + (j / gp.nr) * gp.nr * hd, S + ir * ld + j, ld, alpha, 0.0f, mr,
                 static_cast<int>(std::min<int64_t>(gp.nr, n - j)));
  }
}

namespace {
// Panels of the head-dim columns of X[n, hd] (depth = its n rows): [ceil(hd/NR)][n][NR].
int64_t cols_size(const GemmPanels& gp, int64_t n, int64_t hd) { return cdiv(hd, gp.nr) * gp.nr * n; }
void pack_cols(const GemmPanels& gp, const float* X, int64_t ld, int64_t n, int64_t hd, float* P) {
  for (int64_t c = 0; c < hd; c += gp.nr)
    gp.pack_b_n(X + c, ld, static_cast<int>(std::min<int64_t>(gp.nr, hd - c)), n, P + (c / gp.nr) * gp.nr * n);
}

// O[mq, hd] = P[mq, nk]·V over the keys each tile sees, depth blocked as gemm_nn(mq, hd, nk)
// (Vp: pack_cols of V for T keys). Ap: MR * gemm_depth_block(nk) floats of scratch; dfn: direct_fn
// (P read in place) or null.
void p_times_v(SimdLevel level, const GemmPanels& gp, int64_t mq, int64_t nk, int64_t t0, int64_t hd, int64_t T,
               const float* P, int64_t ld, const float* Vp, float* O, int64_t ldo, float* Ap,
               gemm_k::UkernelDirectFn dfn = nullptr) {
  const int64_t kc = gemm_depth_block(level, nk);
  for (int64_t ir = 0; ir < mq; ir += gp.mr) {
    const int mr = static_cast<int>(std::min<int64_t>(gp.mr, mq - ir));
    const int64_t n = keys_seen(t0, ir, mr, nk);
    for (int64_t pc = 0; pc < n; pc += kc) {
      const int64_t kcur = std::min(kc, n - pc);
      if (dfn) {
        for (int64_t c = 0; c < hd; c += gp.nr)
          dfn(kcur, P + ir * ld + pc, ld, 1, Vp + (c / gp.nr) * gp.nr * T + pc * gp.nr, O + ir * ldo + c, ldo, 1.0f,
              pc == 0 ? 0.0f : 1.0f, mr, static_cast<int>(std::min<int64_t>(gp.nr, hd - c)));
        continue;
      }
      gp.pack_a_rows(P + ir * ld + pc, ld, mr, kcur, Ap);
      for (int64_t c = 0; c < hd; c += gp.nr)
        gp.ukernel(kcur, Ap, Vp + (c / gp.nr) * gp.nr * T + pc * gp.nr, O + ir * ldo + c, ldo, 1.0f,
                   pc == 0 ? 0.0f : 1.0f, mr, static_cast<int>(std::min<int64_t>(gp.nr, hd - c)));
    }
  }
}
// C[nk, hd] += Aᵀ·X for A[mq, nk] (ld; the backward's dS or P of queries t0.., zero past each
// query's keys) and X[mq, hd] (ldx; its q or dout rows): gemm_tn(nk, hd, mq, 1, A, ld, X, ldx, 1, C)
// with A read in place (dfn, rs = 1, cs = ld) against one panel set of X (Xp: cols_size(mq, hd)), packed
// here once for all nk / MR row tiles instead of packing Aᵀ per tile. A tile of keys i0.. starts at
// query i0 - t0 (the rows before it are all +0 there, whose products leave the +0 chain as is): the
// same chain per element as gemm_tn's single depth block (t_times_usable), so the same bits.
// fresh: C's rows t0.. hold nothing yet; their tiles (split from the rows before t0) store the sums
// (beta = 0) instead of adding them to zeros, which is the same value (a chain from +0 is never -0),
// so C needs no zeroing first.
void t_times(const GemmPanels& gp, gemm_k::UkernelDirectFn dfn, int64_t mq, int64_t nk, int64_t t0, int64_t hd,
             const float* A, int64_t ld, const float* X, int64_t ldx, float* Xp, float* C, int64_t ldc,
             bool fresh = false) {
  pack_cols(gp, X, ldx, mq, hd, Xp);
  for (int64_t i0 = 0; i0 < nk;) {
    const int64_t end = fresh && i0 < t0 ? t0 : nk;
    const int mr = static_cast<int>(std::min<int64_t>(gp.mr, end - i0));
    const int64_t k0 = std::clamp<int64_t>(i0 - t0, 0, mq);
    if (k0 == mq) break;
    const float beta = fresh && i0 >= t0 ? 0.0f : 1.0f;
    for (int64_t c = 0; c < hd; c += gp.nr)
      dfn(mq - k0, A + k0 * ld + i0, 1, ld, Xp + (c / gp.nr) * gp.nr * mq + k0 * gp.nr, C + i0 * ldc + c, ldc, 1.0f,
          beta, mr, static_cast<int>(std::min<int64_t>(gp.nr, hd - c)));
    i0 += mr;
  }
}
bool t_times_usable(SimdLevel level, int64_t mq) { return gemm_depth_block(level, mq) == mq; }

using ProbsDscoresFn = void (*)(int64_t, int64_t, int64_t, float*, float*, int64_t, const float*, const float*, float,
                                const int32_t*);
using ScaleFillFn = void (*)(float*, int64_t, int64_t, float);
// The level's one-pass SIMD row ops (cpu/attention_train_kernels.hpp; same bits as the scalar ones),
// t_times and the forward's tile-at-a-time loop: off with QLORA_ATTN_FUSE=0 (A/B runs) or
// QLORA_ATTN_DIRECT=0 (the bit-for-bit tests' other way).
bool fuse_on() {
  static const bool off = [] {
    const char* e = std::getenv("QLORA_ATTN_FUSE");
    return e && std::strcmp(e, "0") == 0;
  }();
  return !off && direct_on();
}
ProbsDscoresFn probs_dscores_fn(SimdLevel level) {
  if (!fuse_on()) return nullptr;
  if (level == SimdLevel::AVX512) return attn_train_k::probs_dscores_avx512;
  if (level == SimdLevel::AVX2) return attn_train_k::probs_dscores_avx2;
  return nullptr;
}
ScaleFillFn scale_fill_fn(SimdLevel level) {
  if (!fuse_on()) return nullptr;
  if (level == SimdLevel::AVX512) return attn_train_k::scale_fill_avx512;
  if (level == SimdLevel::AVX2) return attn_train_k::scale_fill_avx2;
  return nullptr;
}
}  // namespace
}  // namespace attn::fp
#endif

namespace {
// bf16 requested and the level has AVX512-BF16: the packed path (else the Gemms way).
bool attention_bf16_packed(SimdLevel level, bool bf16) {
#ifdef QLORA_X86
  return bf16 && level == SimdLevel::AVX512 && bf16_compute_available(level);
#else
  (void)level, (void)bf16;
  return false;
#endif
}
}  // namespace

void attention_train(SimdLevel level, int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t hd, const float* q,
                     int64_t ldq, const float* k, int64_t ldk, const float* v, int64_t ldv, const int32_t* key_mask,
                     float scale, float* out, int64_t ldo, float* lse, bool bf16) {
  const int64_t group = Hq / Hkv, nblk = (T + kBlock - 1) / kBlock;
  const rowk::Kernels* kr = rowk::for_level(level);
#ifdef QLORA_X86
  if (attention_bf16_packed(level, bf16))
    return attention_train_packed(level, kr, B, T, Hq, Hkv, hd, q, ldq, k, ldk, v, ldv, key_mask, scale, out, ldo,
                                  lse);
#endif
  const Gemms g{level, bf16 && bf16_compute_available(level)};
  // fp32 products: K and V of every (b, KV head) in the level's GEMM panels, packed once.
  const bool panels = !g.bf16 && fp::usable(level, hd);
  const GemmPanels* gp = panels ? &gemm_panels(level) : nullptr;
  fp::Buf KVp;
  const int64_t k_sz = panels ? fp::rows_size(*gp, T, hd) : 0, v_sz = panels ? fp::cols_size(*gp, T, hd) : 0;
  float* kv_all = panels ? KVp.get(static_cast<size_t>(B * Hkv * (k_sz + v_sz))) : nullptr;
  if (panels)
    parallel_range(B * Hkv, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t b = p / Hkv, kh = p % Hkv;
        fp::pack_rows(*gp, k + b * T * ldk + kh * hd, ldk, T, hd, kv_all + p * (k_sz + v_sz));
        fp::pack_cols(*gp, v + b * T * ldv + kh * hd, ldv, T, hd, kv_all + p * (k_sz + v_sz) + k_sz);
      }
    });
  // Task = (b, query head, block of queries t0..t0+mq), seeing keys 0..t0+mq-1.
  parallel_range(B * Hq * nblk, 1, [&](int64_t p0, int64_t p1) {
    std::vector<float> S(static_cast<size_t>(kBlock * T));  // [mq, nk] scores, then probabilities
    fp::Buf Ap;
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t b = p / (Hq * nblk), h = (p / nblk) % Hq, blk = p % nblk, kh = h / group;
      const int64_t t0 = blk * kBlock, mq = std::min(kBlock, T - t0), nk = t0 + mq;
      const int32_t* km = key_mask + b * T;
      const float* Q = q + (b * T + t0) * ldq + h * hd;
      float* O = out + (b * T + t0) * ldo + h * hd;
      if (panels && fp::block_usable(mq)) {
        const float* Kp = kv_all + (b * Hkv + kh) * (k_sz + v_sz);
        float* ap = Ap.get(static_cast<size_t>(gp->mr * std::max(hd, gemm_depth_block(level, nk))));
        constexpr int kMaxMr = 16;  // inv[] below; the AVX2 / AVX-512 tiles have 6 / 14 rows
        const fp::ScaleFillFn sf = gp->mr <= kMaxMr ? fp::scale_fill_fn(level) : nullptr;
        const bool km_all = all_nonzero(km, nk);
        if (!sf) {
          fp::scores(*gp, mq, nk, t0, hd, Q, ldq, Kp, scale, S.data(), nk, ap, fp::direct_fn(level));
          softmax_rows(kr, S.data(), nk, mq, t0, km, km_all, lse + (b * Hq + h) * T);
          fp::p_times_v(level, *gp, mq, nk, t0, hd, T, S.data(), nk, Kp + k_sz, O, ldo, ap, fp::direct_fn(level));
          continue;
        }
        // One MR-row tile at a time (scores, softmax, P·v), so its rows of S stay in L1 between the
        // three passes (a whole [64, T] block does not at T = 256); the same per-row operations.
        const gemm_k::UkernelDirectFn dfn = fp::direct_fn(level);
        float inv[kMaxMr];
        for (int64_t ir = 0; ir < mq; ir += gp->mr) {
          const int64_t mr = std::min<int64_t>(gp->mr, mq - ir);
          float* Sr = S.data() + ir * nk;
          fp::scores(*gp, mr, nk, t0 + ir, hd, Q + ir * ldq, ldq, Kp, scale, Sr, nk, ap, dfn);
          softmax_rows(kr, Sr, nk, mr, t0 + ir, km, km_all, lse + (b * Hq + h) * T, inv);
          for (int64_t i = 0; i < mr; ++i) sf(Sr + i * nk, t0 + ir + i + 1, 0, inv[i]);  // r[s] *= inv, s <= t
          fp::p_times_v(level, *gp, mr, nk, t0 + ir, hd, T, Sr, nk, Kp + k_sz, O + ir * ldo, ldo, ap, dfn);
        }
        continue;
      }
      gemm_nt(level, mq, nk, hd, scale, Q, ldq, k + b * T * ldk + kh * hd, ldk, 0.0f, S.data(),
              nk);  // scores in fp32 (also in bf16 mode)
      softmax_rows(kr, S.data(), nk, mq, t0, km, all_nonzero(km, nk), lse + (b * Hq + h) * T);
      g.nn(mq, hd, nk, 1.0f, S.data(), nk, v + b * T * ldv + kh * hd, ldv, 0.0f, O, ldo);  // out rows = P · V
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
                              float* dk, int64_t lddk, float* dv, int64_t lddv, bool bf16) {
  const int64_t group = Hq / Hkv, nblk = (T + kBlock - 1) / kBlock;
  const rowk::Kernels* kr = rowk::for_level(level);
  const Gemms g{level, bf16 && bf16_compute_available(level)};
  const int64_t tasks = B * Hkv, nt = std::max(1, physical_cores());
  const int64_t rounds = (tasks + nt - 1) / nt;
  const char* force = std::getenv("QLORA_ATTN_BACKWARD");
  const bool fused = force && std::strcmp(force, "fused") == 0   ? true
                     : force && std::strcmp(force, "split") == 0 ? false
                                                                 : 4 * tasks >= 3 * rounds * nt;
#ifdef QLORA_X86
  if (fused && attention_bf16_packed(level, bf16) && bf16_delta_in_task())  // delta computed in its tasks
    return attention_backward_packed(level, kr, B, T, Hq, Hkv, hd, q, ldq, k, ldk, v, ldv, key_mask, scale, lse, nullptr,
                                     out, ldo, dout, lddo, dq, lddq, dk, lddk, dv, lddv);
#endif
  std::vector<float> delta(static_cast<size_t>(B * Hq * T));  // [B, Hq, T]
#ifdef QLORA_X86
  if ((level == SimdLevel::AVX512 || level == SimdLevel::AVX2) && fp::direct_on()) {
    // The same sums, 16 (AVX2: 8) queries of one (b, head) per vector (attn_train_k::delta_rows_*).
    const auto rows = level == SimdLevel::AVX512 ? attn_train_k::delta_rows_avx512 : attn_train_k::delta_rows_avx2;
    parallel_range(B * Hq, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t b = p / Hq, h = p % Hq;
        rows(T, hd, dout + b * T * lddo + h * hd, lddo, out + b * T * ldo + h * hd, ldo, delta.data() + p * T);
      }
    });
  } else
#endif
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

#ifdef QLORA_X86
  if (fused && attention_bf16_packed(level, bf16))
    return attention_backward_packed(level, kr, B, T, Hq, Hkv, hd, q, ldq, k, ldk, v, ldv, key_mask, scale, lse, delta.data(),
                                     out, ldo, dout, lddo, dq, lddq, dk, lddk, dv, lddv);
#endif
  if (fused) {
    // fp32 products: scores, dP and dq from K and V panels packed once per task (fp:: above);
    // dK and dV through gemm_tn as before.
    const bool panels = !g.bf16 && fp::usable(level, hd);
    const GemmPanels* gp = panels ? &gemm_panels(level) : nullptr;
    const gemm_k::UkernelDirectFn dfn = fp::direct_fn(level);
    const fp::ProbsDscoresFn pds = panels ? fp::probs_dscores_fn(level) : nullptr;
    const bool tt = panels && dfn && fp::fuse_on() && fp::t_times_usable(level, std::min(kBlock, T));
    // Every block through t_times: its first head writes the block's own dK, dV rows (fresh), so
    // they are not zeroed first (measured ~1-2% of the backward at these shapes).
    const bool no_zero = tt && fp::block_usable(T - (nblk - 1) * kBlock);
    parallel_range(tasks, 1, [&](int64_t p0, int64_t p1) {
      std::vector<float> P(static_cast<size_t>(kBlock * T)), dP(P.size());  // [mq, nk] each
      fp::Buf bKr, bVr, bKc, bAp, bXp;
      float *Kr = nullptr, *Vr = nullptr, *Kc = nullptr, *Ap = nullptr, *Xp = nullptr;
      if (panels) {
        Kr = bKr.get(static_cast<size_t>(fp::rows_size(*gp, T, hd)));
        Vr = bVr.get(static_cast<size_t>(fp::rows_size(*gp, T, hd)));
        Kc = bKc.get(static_cast<size_t>(fp::cols_size(*gp, T, hd)));
        Ap = bAp.get(static_cast<size_t>(gp->mr * std::max(hd, std::min(T, gemm_blocking_in_use(level).kc))));
        if (tt) Xp = bXp.get(static_cast<size_t>(fp::cols_size(*gp, std::min(kBlock, T), hd)));
      }
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t b = p / Hkv, kh = p % Hkv;
        const float* Kb = k + b * T * ldk + kh * hd;  // [T, hd] rows of KV head kh
        const float* Vb = v + b * T * ldv + kh * hd;
        float* dKb = dk + b * T * lddk + kh * hd;
        float* dVb = dv + b * T * lddv + kh * hd;
        const int32_t* km = key_mask + b * T;
        if (panels) {
          fp::pack_rows(*gp, Kb, ldk, T, hd, Kr);
          fp::pack_rows(*gp, Vb, ldv, T, hd, Vr);
          fp::pack_cols(*gp, Kb, ldk, T, hd, Kc);
        }
        for (int64_t t = 0; t < T && !no_zero; ++t) {
          std::fill(dKb + t * lddk, dKb + t * lddk + hd, 0.0f);
          std::fill(dVb + t * lddv, dVb + t * lddv + hd, 0.0f);
        }
        for (int64_t blk = 0; blk < nblk; ++blk) {
          const int64_t t0 = blk * kBlock, mq = std::min(kBlock, T - t0), nk = t0 + mq;
          const bool km_all = all_nonzero(km, nk);
          for (int64_t h = kh * group; h < (kh + 1) * group; ++h) {
            const float* Qr = q + (b * T + t0) * ldq + h * hd;        // [mq, hd]
            const float* dOr = dout + (b * T + t0) * lddo + h * hd;  // [mq, hd]
            if (panels && fp::block_usable(mq)) {
              // dS beyond each row's keys is +0 where the full products gave ±0 (P = 0 there): the
              // sums below never differ (an fp32 sum from +0 is never -0).
              fp::scores(*gp, mq, nk, t0, hd, Qr, ldq, Kr, scale, P.data(), nk, Ap, dfn);
              fp::scores(*gp, mq, nk, t0, hd, dOr, lddo, Vr, 1.0f, dP.data(), nk, Ap, dfn);
              const float* dl = delta.data() + (b * Hq + h) * T + t0;
              if (pds) {  // P and dS in one SIMD pass
                pds(mq, nk, t0, P.data(), dP.data(), nk, lse + (b * Hq + h) * T + t0, dl, scale, km_all ? nullptr : km);
              } else {
                probs_from_lse(kr, P.data(), nk, mq, nk, t0, 0, km, km_all, lse + (b * Hq + h) * T);
                dscores_causal(P.data(), dP.data(), nk, mq, nk, t0, dl, scale);
              }
              fp::p_times_v(level, *gp, mq, nk, t0, hd, T, dP.data(), nk, Kc, dq + (b * T + t0) * lddq + h * hd,
                            lddq, Ap, dfn);
              if (tt) {  // dK, dV: the A operands read in place against a panel of this block's q / dout
                const bool fresh = no_zero && h == kh * group;
                fp::t_times(*gp, dfn, mq, nk, t0, hd, dP.data(), nk, Qr, ldq, Xp, dKb, lddk, fresh);
                fp::t_times(*gp, dfn, mq, nk, t0, hd, P.data(), nk, dOr, lddo, Xp, dVb, lddv, fresh);
                continue;
              }
            } else {
              gemm_nt(level, mq, nk, hd, scale, Qr, ldq, Kb, ldk, 0.0f, P.data(), nk);  // scores in fp32
              probs_from_lse(kr, P.data(), nk, mq, nk, t0, 0, km, km_all, lse + (b * Hq + h) * T);
              g.nt(mq, nk, hd, 1.0f, dOr, lddo, Vb, ldv, 0.0f, dP.data(), nk);
              dscores(P.data(), dP.data(), nk, mq, nk, delta.data() + (b * Hq + h) * T + t0, scale);
              g.nn(mq, hd, nk, 1.0f, dP.data(), nk, Kb, ldk, 0.0f, dq + (b * T + t0) * lddq + h * hd, lddq);
            }
            g.tn(nk, hd, mq, 1.0f, dP.data(), nk, Qr, ldq, 1.0f, dKb, lddk);
            g.tn(nk, hd, mq, 1.0f, P.data(), nk, dOr, lddo, 1.0f, dVb, lddv);
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
      g.nt(mq, nk, hd, 1.0f, dout + (b * T + t0) * lddo + h * hd, lddo, v + b * T * ldv + kh * hd, ldv, 0.0f,
              dP.data(), nk);
      dscores(P.data(), dP.data(), nk, mq, nk, delta.data() + (b * Hq + h) * T + t0, scale);
      g.nn(mq, hd, nk, 1.0f, dP.data(), nk, Kb, ldk, 0.0f, dq + (b * T + t0) * lddq + h * hd, lddq);
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
        g.nt(nq, ns, hd, 1.0f, dOr, lddo, Vb, ldv, 0.0f, dP.data(), ns);
        dscores(P.data(), dP.data(), ns, nq, ns, delta.data() + (b * Hq + h) * T + s0, scale);
        g.tn(ns, hd, nq, 1.0f, dP.data(), ns, Qr, ldq, beta, dKb, lddk);
        g.tn(ns, hd, nq, 1.0f, P.data(), ns, dOr, lddo, beta, dVb, lddv);
      }
    }
  });
}

}  // namespace qlora::cpu::ops