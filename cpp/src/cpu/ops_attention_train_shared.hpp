// What the training attention's two files share: ops_attention_train.cpp (the entry points, the fp32
// panels, the GEMM way) and ops_attention_train_bf16.cpp (the AVX512-BF16 packed path). Both files are
// compiled at the baseline level, so the inline functions here are level neutral.
#pragma once
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <new>

#include "cpu/features.hpp"
#include "cpu/gemm.hpp"
#include "cpu/gemm_kernels.hpp"
#include "cpu/gemv_f32.hpp"
#include "cpu/rowops_kernels.hpp"

namespace qlora::cpu::ops::attn {
constexpr int64_t kBlock = 64;  // queries (forward, dq) or keys (dk/dv) per task
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline bool all_nonzero(const int32_t* km, int64_t n) { return std::find(km, km + n, 0) == km + n; }
// Keys some row of the tile of queries t0 + ir .. t0 + ir + mr - 1 sees (causal), within nk.
inline int64_t keys_seen(int64_t t0, int64_t ir, int mr, int64_t nk) { return std::min(nk, t0 + ir + mr); }

// The bf16 forward prefetches a task's output rows (rows x n floats, row stride ld) when the task
// starts, the backward a block's dq rows: the tiles then store into cached lines (measured: AMX tile
// stores into uncached rows stalled the next call's ldtilecfg). QLORA_ATTN_FWD_PF=0 / QLORA_ATTN_BWD_PF=0
// (read per call) turn them off; no arithmetic changes.
inline bool env_not_zero(const char* name) {
  const char* e = std::getenv(name);
  return !(e && e[0] == '0' && e[1] == 0);
}
inline bool fwd_out_prefetch_on() { return env_not_zero("QLORA_ATTN_FWD_PF"); }
inline bool bwd_dq_prefetch_on() { return env_not_zero("QLORA_ATTN_BWD_PF"); }
inline void prefetch_rows(const float* p, int64_t ld, int64_t rows, int64_t n) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < n; c += 16) __builtin_prefetch(p + r * ld + c, 1, 3);
}

// 64-byte aligned scratch that grows on demand (the micro-kernels load panels with aligned loads).
template <class T>
struct AlignedBuf {
  T* p = nullptr;
  size_t n = 0;
  AlignedBuf() = default;
  AlignedBuf(const AlignedBuf&) = delete;
  AlignedBuf& operator=(const AlignedBuf&) = delete;
  ~AlignedBuf() { std::free(p); }
  T* get(size_t count) {
    if (count > n) {
      std::free(p);
      p = static_cast<T*>(std::aligned_alloc(64, (count * sizeof(T) + 63) / 64 * 64));
      if (!p) {
        n = 0;
        throw std::bad_alloc();
      }
      n = count;
    }
    return p;
  }
};

// In place on a tile S[rows, cols] (row stride ld) of scale·q·kᵀ for queries t0 + i and keys
// s0 + j: P = exp(S - lse_t) where key s is visible to query t (s <= t, mask != 0), else 0.
// kr: SIMD exp kernels or nullptr (std::exp); km_all: km[s0 .. s0 + cols) are all nonzero.
void probs_from_lse(const rowk::Kernels* kr, float* S, int64_t ld, int64_t rows, int64_t cols, int64_t t0, int64_t s0,
                    const int32_t* km, bool km_all, const float* lse);
// Row softmax of the forward on S[mq, nk] (scores of queries t0 + i, keys 0..nk-1; only keys
// s <= t are read): probabilities in place (0 for s > t and masked keys), lse[t] kept. With inv_out,
// the rows are left unnormalized (the weights exp(S - max)) and inv_out[i] = 1 / denominator (0 for a
// row that sees no key): the caller multiplies as it converts (the same fp32 product).
void softmax_rows(const rowk::Kernels* kr, float* S, int64_t nk, int64_t mq, int64_t t0, const int32_t* km,
                  bool km_all, float* l, float* inv_out = nullptr);
// dS = P (dP - delta_t) scale for the keys each query sees (s < n_vis), 0 beyond (dP is not
// computed there on the packed paths).
void dscores_causal(const float* P, float* dP, int64_t ld, int64_t rows, int64_t cols, int64_t t0,
                    const float* delta, float scale);

#ifdef QLORA_X86
// fp32 panels (ops_attention_train.cpp): K (and V) of a (b, KV head) packed once into the level's
// GEMM panels; the bf16 path takes its fp32 scores from them too.
namespace fp {
using Buf = AlignedBuf<float>;
// The panels serve when the level has blocked kernels, head_dim is one depth block of the scores
// GEMM, and the query block is past gemm_nt's GEMV route (M <= kGemvF32MaxM: another FMA order).
// QLORA_ATTN_PANELS=0 turns them off (A/B runs; tests compare both ways bit for bit).
bool usable(SimdLevel level, int64_t hd);
inline bool block_usable(int64_t mq) { return mq > kGemvF32MaxM; }
// The in-place operand kernels (cpu/attention_train_kernels.hpp): QLORA_ATTN_DIRECT=0 turns them off.
bool direct_on();
// The level's fp32 micro-kernel with A read in place, or nullptr: pack A.
gemm_k::UkernelDirectFn direct_fn(SimdLevel level);
// Scores panels of the n rows of X[n, hd] (keys as columns): [ceil(n/NR)][hd][NR].
inline int64_t rows_size(const GemmPanels& gp, int64_t n, int64_t hd) { return cdiv(n, gp.nr) * gp.nr * hd; }
void pack_rows(const GemmPanels& gp, const float* X, int64_t ld, int64_t n, int64_t hd, float* P);
// S[mq, ld] = alpha * Q[mq, hd]·Kᵀ for the keys each MR-row tile sees (Kp: pack_rows of K; the
// rest of S is left unwritten). Ap: MR * hd floats of scratch; dfn: direct_fn (Q read in place) or null.
void scores(const GemmPanels& gp, int64_t mq, int64_t nk, int64_t t0, int64_t hd, const float* Q, int64_t ldq,
            const float* Kp, float alpha, float* S, int64_t ld, float* Ap, gemm_k::UkernelDirectFn dfn = nullptr);
}  // namespace fp

// The AVX512-BF16 packed path (ops_attention_train_bf16.cpp), for bf16 compute at the AVX512 level
// where bf16_compute_available(level): the forward, and the fused backward (delta given, or nullptr:
// computed from dout and out in its tasks).
void attention_train_packed(SimdLevel level, const rowk::Kernels* kr, int64_t B, int64_t T, int64_t Hq, int64_t Hkv,
                            int64_t hd, const float* q, int64_t ldq, const float* k, int64_t ldk, const float* v,
                            int64_t ldv, const int32_t* key_mask, float scale, float* out, int64_t ldo, float* lse);
void attention_backward_packed(SimdLevel level, const rowk::Kernels* kr, int64_t B, int64_t T, int64_t Hq, int64_t Hkv,
                               int64_t hd, const float* q, int64_t ldq, const float* k, int64_t ldk, const float* v,
                               int64_t ldv, const int32_t* key_mask, float scale, const float* lse, const float* delta,
                               const float* out, int64_t ldo, const float* dout, int64_t lddo, float* dq, int64_t lddq,
                               float* dk, int64_t lddk, float* dv, int64_t lddv);
// QLORA_ATTN_BF16_DELTA (default on, read per call): attention_backward_packed computes delta itself
// (delta == nullptr; delta_rows_avx512 per query block and head, the same bits), so the caller skips
// its pass over dout and out.
bool bf16_delta_in_task();
#endif
}  // namespace qlora::cpu::ops::attn
