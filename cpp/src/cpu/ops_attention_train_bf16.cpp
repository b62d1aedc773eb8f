// The training attention's bf16 path on AVX512-BF16 (compute_dtype="bfloat16", cpu:avx512 with
// bf16 units; ops_attention_train.cpp dispatches here): K and V of a (batch, KV head) packed once
// into bf16 pair panels, the vdpbf16ps micro-kernel on 14-row tiles over the keys some row of a tile
// sees (causal). The scores S = scale q·kᵀ stay fp32 (the fp32 panels of ops_attention_train.cpp),
// as do softmax, lse, delta and the outputs; P·v, dout·vᵀ, dS·k, dSᵀ·q and Pᵀ·dout round their
// operands to bf16 and accumulate in fp32. With QLORA_ATTN_DIRECT (default) the A operands of the
// tiles are read in place (cpu/attention_train_kernels.hpp; same bits as packing them per tile).
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cpu/attention_amx.hpp"
#include "cpu/attention_train_kernels.hpp"
#include "cpu/features.hpp"
#include "cpu/gemm.hpp"
#include "cpu/gemm_bf16_kernels.hpp"
#include "cpu/gemm_kernels.hpp"
#include "cpu/ops_attention_train_shared.hpp"
#include "cpu/rowops_kernels.hpp"
#include "cpu/threads.hpp"

#ifdef QLORA_X86
namespace qlora::cpu::ops::attn {
namespace {
// Speed switches, read per call (interleaved A/B runs in one process; tests compare both ways bit
// for bit): =0 turns one off (env_not_zero, ops_attention_train_shared.hpp).
// QLORA_ATTN_BF16_HALF: a tile whose last panel has <= 16 columns computes only those (the dP tiles
// at the causal edge; bf16_tile::tile_half).
bool half_on() { return env_not_zero("QLORA_ATTN_BF16_HALF"); }
// QLORA_ATTN_BF16_DELTA: the backward's delta rows computed in its tasks, per (query block, head),
// while dout's rows are in cache (the same kernel, so the same bits), instead of a pass over all of
// dout and out before it.
// QLORA_ATTN_BF16_SCRATCH: the tasks' scratch left uninitialized (every element read is written
// first); =0 zero-fills it as the std::vector scratch did.
bool scratch_uninit_on() { return env_not_zero("QLORA_ATTN_BF16_SCRATCH"); }

template <class T>
T* scratch(AlignedBuf<T>& b, size_t n, bool uninit) {
  T* p = b.get(n);
  if (!uninit) std::fill(p, p + n, T{});
  return p;
}

// Operand panels in the bf16 GEMM's pair layout (cpu/gemm_bf16_kernels.hpp): a B panel holds NR
// columns, uint32 [pairs of k][NR]; an A panel MR rows, uint32 [pairs of k][MR].
namespace pk {
constexpr int MR = bf16_k::kMR, NR = bf16_k::kNR;
using Buf = AlignedBuf<uint32_t>;  // 64-byte aligned (the micro-kernel loads B panels with aligned loads)

// B panels with the n rows of X[n, hd] as columns, k = head dim: [ceil(n/NR)][ceil(hd/2)][NR]
// (the K of q·kᵀ, the V of dout·vᵀ).
void pack_rows_as_cols(const float* X, int64_t ld, int64_t n, int64_t hd, uint32_t* P) {
  const int64_t hp = cdiv(hd, 2);
  for (int64_t j = 0; j < n; j += NR)
    bf16_k::pack_rows_avx512bf16(X + j * ld, ld, static_cast<int>(std::min<int64_t>(NR, n - j)), hd, NR,
                                 P + (j / NR) * hp * NR);
}
// B panels with the head-dim columns of X[n, hd], k = its rows: [ceil(hd/NR)][ceil(n/2)][NR]
// (the V of P·v, the K of dS·k, the Q of dSᵀ·q, the dout of Pᵀ·dout).
void pack_dim_cols(const float* X, int64_t ld, int64_t n, int64_t hd, uint32_t* P) {
  const int64_t np = cdiv(n, 2);
  for (int64_t c = 0; c < hd; c += NR)
    bf16_k::pack_cols_avx512bf16(X + c, ld, static_cast<int>(std::min<int64_t>(NR, hd - c)), n, NR,
                                 P + (c / NR) * np * NR);
}
// C[mr, 0..ncols) = alpha * Ap·(B panels, `stride` uint32 apart) + beta * C, over kp pairs.
void row_tile(int64_t kp, const uint32_t* Ap, const uint32_t* Bp, int64_t stride, int64_t ncols, float* C,
              int64_t ldc, float alpha, float beta, int mr) {
  for (int64_t j = 0; j < ncols; j += NR)
    bf16_k::ukernel_avx512bf16(kp, Ap, Bp + (j / NR) * stride, C + j, ldc, alpha, beta, mr,
                               static_cast<int>(std::min<int64_t>(NR, ncols - j)));
}
// row_tile with A read in place: pair (i, p) at A[i * rs + p * cs] (attn_train_k).
void row_tile_direct(int64_t kp, const uint32_t* A, int64_t rs, int64_t cs, const uint32_t* Bp, int64_t stride,
                     int64_t ncols, float* C, int64_t ldc, float alpha, float beta, int mr, bool half) {
  for (int64_t j = 0; j < ncols; j += NR)
    attn_train_k::ukernel_direct_avx512bf16(kp, A, rs, cs, Bp + (j / NR) * stride, C + j, ldc, alpha, beta, mr,
                                            static_cast<int>(std::min<int64_t>(NR, ncols - j)), half);
}
}  // namespace pk

}  // namespace

bool bf16_delta_in_task() { return env_not_zero("QLORA_ATTN_BF16_DELTA"); }

// The bf16 forward on AVX512-BF16: V of every (b, KV head) packed once, then one task per
// (b, query head, block of 64 queries) as the fp32 way: fp32 scores, softmax, bf16 P·v.
void attention_train_packed(SimdLevel level, const rowk::Kernels* kr, int64_t B, int64_t T, int64_t Hq, int64_t Hkv,
                            int64_t hd, const float* q, int64_t ldq, const float* k, int64_t ldk, const float* v,
                            int64_t ldv, const int32_t* key_mask, float scale, float* out, int64_t ldo, float* lse) {
  using namespace pk;
  const int64_t group = Hq / Hkv, nblk = cdiv(T, kBlock);
  const int64_t tp = cdiv(T, 2);
  const int64_t vc_sz = cdiv(hd, NR) * tp * NR;  // uint32 per (b, kv head)
  Buf Vp;
  uint32_t* vp_all = Vp.get(static_cast<size_t>(B * Hkv * vc_sz));
  // The fp32 scores from K panels packed once (fp::, ops_attention_train.cpp), as the fp32 forward.
  const bool kpan = fp::usable(level, hd);
  const GemmPanels& gp = gemm_panels(level);
  const int64_t k_sz = kpan ? fp::rows_size(gp, T, hd) : 0;
  fp::Buf Kp;
  float* kp_all = kpan ? Kp.get(static_cast<size_t>(B * Hkv * k_sz)) : nullptr;
  parallel_range(B * Hkv, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t b = p / Hkv, kh = p % Hkv;
      pack_dim_cols(v + b * T * ldv + kh * hd, ldv, T, hd, vp_all + p * vc_sz);
      if (kpan) fp::pack_rows(gp, k + b * T * ldk + kh * hd, ldk, T, hd, kp_all + p * k_sz);
    }
  });
  const gemm_k::UkernelDirectFn dfn = fp::direct_fn(level);
  const bool direct = fp::direct_on(), half = half_on(), uninit = scratch_uninit_on();
  const attn_amx::Kernel ak = direct ? attn_amx::choice() : attn_amx::Kernel::Avx512Bf16;  // P·v on AMX tiles?
  const bool amx = ak != attn_amx::Kernel::Avx512Bf16;
  const bool opf = fwd_out_prefetch_on();
  parallel_range(B * Hq * nblk, 1, [&](int64_t p0, int64_t p1) {
    AlignedBuf<float> bS;
    AlignedBuf<uint32_t> bAp, bPb;
    float* S = scratch(bS, static_cast<size_t>(kBlock * T), uninit);  // [mq, nk] scores, then probabilities
    uint32_t* Ap = scratch(bAp, static_cast<size_t>(MR * tp), uninit);
    uint32_t* Pb = scratch(bPb, static_cast<size_t>(direct ? kBlock * tp : 1), uninit);  // [mq, ceil(nk/2)] bf16 pairs of P
    float inv[kBlock];
    fp::Buf Af;
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t b = p / (Hq * nblk), h = (p / nblk) % Hq, blk = p % nblk, kh = h / group;
      const int64_t t0 = blk * kBlock, mq = std::min(kBlock, T - t0), nk = t0 + mq;
      const int32_t* km = key_mask + b * T;
      const uint32_t* Vc = vp_all + (b * Hkv + kh) * vc_sz;
      if (opf) prefetch_rows(out + (b * T + t0) * ldo + h * hd, ldo, mq, hd);
      if (kpan && fp::block_usable(mq))
        fp::scores(gp, mq, nk, t0, hd, q + (b * T + t0) * ldq + h * hd, ldq, kp_all + (b * Hkv + kh) * k_sz, scale,
                   S, nk, Af.get(static_cast<size_t>(gp.mr * hd)), dfn);
      else
        gemm_nt(level, mq, nk, hd, scale, q + (b * T + t0) * ldq + h * hd, ldq, k + b * T * ldk + kh * hd, ldk, 0.0f,
                S, nk);  // scores in fp32
      if (direct) {
        // P = weights * (1 / denominator) rounded to bf16 once, read in place by the tiles: the
        // fp32 products and roundings of normalize-then-pack, without the pack per tile.
        softmax_rows(kr, S, nk, mq, t0, km, all_nonzero(km, nk), lse + (b * Hq + h) * T, inv);
        const int64_t np = cdiv(nk, 2);
        attn_train_k::rows_to_bf16_avx512bf16(S, nk, mq, nk, inv, reinterpret_cast<uint16_t*>(Pb),
                                              2 * np);
        if (amx) {  // out rows = P·v, 32 rows (2 x 2 tiles) at a time
          for (int64_t ir = 0; ir < mq; ir += 32) {
            const int mr = static_cast<int>(std::min<int64_t>(32, mq - ir));
            attn_amx::rows(ak, cdiv(keys_seen(t0, ir, mr, nk), 2), Pb + ir * np, np, mr, Vc, tp * NR, hd,
                           out + (b * T + t0 + ir) * ldo + h * hd, ldo);
          }
          continue;
        }
        for (int64_t ir = 0; ir < mq; ir += MR) {  // out rows = P·v
          const int mr = static_cast<int>(std::min<int64_t>(MR, mq - ir));
          const int64_t n = keys_seen(t0, ir, mr, nk);
          row_tile_direct(cdiv(n, 2), Pb + ir * np, np, 1, Vc, tp * NR, hd, out + (b * T + t0 + ir) * ldo + h * hd,
                          ldo, 1.0f, 0.0f, mr, half);
        }
        continue;
      }
      softmax_rows(kr, S, nk, mq, t0, km, all_nonzero(km, nk), lse + (b * Hq + h) * T);
      for (int64_t ir = 0; ir < mq; ir += MR) {  // out rows = P·v
        const int mr = static_cast<int>(std::min<int64_t>(MR, mq - ir));
        const int64_t n = keys_seen(t0, ir, mr, nk);
        bf16_k::pack_rows_avx512bf16(S + ir * nk, nk, mr, n, MR, Ap);
        row_tile(cdiv(n, 2), Ap, Vc, tp * NR, hd, out + (b * T + t0 + ir) * ldo + h * hd, ldo, 1.0f, 0.0f, mr);
      }
    }
  });
}


// The fused backward in bf16 on AVX512-BF16: one task per (b, KV head) packs its K and V once,
// then per (query block, query head) the scores in fp32 and four bf16 products on 14-row tiles; dK and
// dV accumulate in place in fp32 (beta 1), each key tile over the queries that can see it.
void attention_backward_packed(SimdLevel level, const rowk::Kernels* kr, int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t hd,
                               const float* q, int64_t ldq, const float* k, int64_t ldk, const float* v, int64_t ldv,
                               const int32_t* key_mask, float scale, const float* lse, const float* delta,
                               const float* out, int64_t ldo, const float* dout, int64_t lddo, float* dq, int64_t lddq,
                               float* dk, int64_t lddk, float* dv, int64_t lddv) {
  using namespace pk;
  const bool half = half_on(), uninit = scratch_uninit_on();
  const int64_t group = Hq / Hkv, nblk = cdiv(T, kBlock);
  const bool direct = fp::direct_on();
  const int64_t hp = cdiv(hd, 2), tp = cdiv(T, 2), bp = cdiv(kBlock, 2);
  // AMX tiles (cpu/attention_amx.hpp) for all four products: dP, dq from the same in-place rows; dk,
  // dv transposed (dkᵀ += qᵀ·dS, dvᵀ += doutᵀ·P: the pair rows D2 / P2 are B tiles as they are) into
  // fp32 [hdp][Tp] sums per task, zero-padded to whole tiles, written out transposed at its end.
  const attn_amx::Kernel ak = direct ? attn_amx::choice() : attn_amx::Kernel::Avx512Bf16;
  const bool amx = ak != attn_amx::Kernel::Avx512Bf16;
  const bool dpf = bwd_dq_prefetch_on();
  const int64_t hdp = cdiv(hd, 32) * 32, Tp = cdiv(T, 32) * 32;
  const int64_t vr_sz = cdiv(T, NR) * hp * NR, kc_sz = cdiv(hd, NR) * tp * NR, qc_sz = cdiv(hd, NR) * bp * NR;
  parallel_range(B * Hkv, 1, [&](int64_t p0, int64_t p1) {
    AlignedBuf<float> bP, bdP;
    AlignedBuf<uint32_t> bAp;
    float* P = scratch(bP, static_cast<size_t>(kBlock * T), uninit);  // [mq, nk] each
    float* dP = scratch(bdP, static_cast<size_t>(kBlock * T), uninit);
    uint32_t* Ap = scratch(bAp, static_cast<size_t>(MR * std::max({hp, tp, bp})), uninit);
    Buf bKc, bVr, bQc, bOc;
    uint32_t *Kc = bKc.get(kc_sz), *Vr = bVr.get(vr_sz), *Qc = bQc.get(qc_sz), *Oc = bOc.get(qc_sz);
    // fp32 scores from K panels packed once per task (fp::, ops_attention_train.cpp), as the fp32 backward.
    const bool kpan = fp::usable(level, hd);
    const GemmPanels& gp = gemm_panels(level);
    fp::Buf bKr, bAf;
    float* Kr = kpan ? bKr.get(static_cast<size_t>(fp::rows_size(gp, T, hd))) : nullptr;
    float* Af = kpan ? bAf.get(static_cast<size_t>(gp.mr * hd)) : nullptr;
    // Direct way: dS as bf16 rows (dq), dS and P as bf16 row pairs (dk, dv), each written once per
    // block and head and read in place by the tiles (no pack per tile).
    const gemm_k::UkernelDirectFn dfn = fp::direct_fn(level);
    AlignedBuf<uint32_t> bDb, bD2, bP2, bOb;
    uint32_t* Db = scratch(bDb, static_cast<size_t>(direct ? kBlock * tp : 1), uninit);  // [mq, ceil(nk/2)] pairs of keys
    uint32_t* D2 = scratch(bD2, static_cast<size_t>(direct ? bp * Tp : 1), uninit);  // [ceil(mq/2), nk] pairs of queries
    uint32_t* P2 = scratch(bP2, static_cast<size_t>(direct ? bp * Tp : 1), uninit);
    AlignedBuf<uint32_t> bQt, bOt;
    AlignedBuf<float> bdKt, bdVt;
    uint32_t* Qt = amx ? bQt.get(static_cast<size_t>(hdp * bp)) : nullptr;  // [hdp][bp] pairs of queries
    uint32_t* Ot = amx ? bOt.get(static_cast<size_t>(hdp * bp)) : nullptr;
    float* dKt = amx ? bdKt.get(static_cast<size_t>(hdp * Tp)) : nullptr;  // [hdp][Tp] dkᵀ, dvᵀ sums
    float* dVt = amx ? bdVt.get(static_cast<size_t>(hdp * Tp)) : nullptr;
    uint32_t* Ob = scratch(bOb, static_cast<size_t>(direct ? kBlock * hp : 1), uninit);  // [mq, ceil(hd/2)] pairs of dout
    float dl[kBlock];  // delta of one (query block, head) when delta == nullptr
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t b = p / Hkv, kh = p % Hkv;
      const float* Kb = k + b * T * ldk + kh * hd;  // [T, hd] rows of KV head kh
      const float* Vb = v + b * T * ldv + kh * hd;
      float* dKb = dk + b * T * lddk + kh * hd;
      float* dVb = dv + b * T * lddv + kh * hd;
      const int32_t* km = key_mask + b * T;
      pack_dim_cols(Kb, ldk, T, hd, Kc);
      pack_rows_as_cols(Vb, ldv, T, hd, Vr);
      if (kpan) fp::pack_rows(gp, Kb, ldk, T, hd, Kr);
      if (amx) {
        std::fill(dKt, dKt + hdp * Tp, 0.0f);
        std::fill(dVt, dVt + hdp * Tp, 0.0f);
      } else {
        for (int64_t t = 0; t < T; ++t) {
          std::fill(dKb + t * lddk, dKb + t * lddk + hd, 0.0f);
          std::fill(dVb + t * lddv, dVb + t * lddv + hd, 0.0f);
        }
      }
      for (int64_t blk = 0; blk < nblk; ++blk) {
        const int64_t t0 = blk * kBlock, mq = std::min(kBlock, T - t0), nk = t0 + mq, qp = cdiv(mq, 2);
        const bool km_all = all_nonzero(km, nk);
        for (int64_t h = kh * group; h < (kh + 1) * group; ++h) {
          const float* Qr = q + (b * T + t0) * ldq + h * hd;        // [mq, hd]
          const float* dOr = dout + (b * T + t0) * lddo + h * hd;  // [mq, hd]
          // delta of these queries: given, or computed here (dout's rows are about to be read anyway)
          const float* dlt = delta ? delta + (b * Hq + h) * T + t0 : dl;
          if (dpf) prefetch_rows(dq + (b * T + t0) * lddq + h * hd, lddq, mq, hd);
          if (!delta) attn_train_k::delta_rows_avx512(mq, hd, dOr, lddo, out + (b * T + t0) * ldo + h * hd, ldo, dl);
          if (!direct) {
            pack_dim_cols(Qr, ldq, mq, hd, Qc);
            pack_dim_cols(dOr, lddo, mq, hd, Oc);
          }
          if (kpan && fp::block_usable(mq))  // S = P: the scores in fp32
            fp::scores(gp, mq, nk, t0, hd, Qr, ldq, Kr, scale, P, nk, Af, dfn);
          else
            gemm_nt(level, mq, nk, hd, scale, Qr, ldq, Kb, ldk, 0.0f, P, nk);
          if (direct)  // dout rows in bf16 once, read in place by the dP tiles
            attn_train_k::rows_to_bf16_avx512bf16(dOr, lddo, mq, hd, nullptr, reinterpret_cast<uint16_t*>(Ob),
                                                  2 * hp);
          for (int64_t ir = 0; amx && ir < mq; ir += 32) {  // dP = dout·vᵀ on AMX tiles
            const int mr = static_cast<int>(std::min<int64_t>(32, mq - ir));
            attn_amx::rows(ak, hp, Ob + ir * hp, hp, mr, Vr, hp * NR, keys_seen(t0, ir, mr, nk), dP + ir * nk, nk);
          }
          for (int64_t ir = 0; !amx && ir < mq; ir += MR) {  // dP = dout·vᵀ
            const int mr = static_cast<int>(std::min<int64_t>(MR, mq - ir));
            const int64_t n = keys_seen(t0, ir, mr, nk);
            if (direct) {
              row_tile_direct(hp, Ob + ir * hp, hp, 1, Vr, hp * NR, n, dP + ir * nk, nk, 1.0f, 0.0f, mr, half);
              continue;
            }
            bf16_k::pack_rows_avx512bf16(dOr + ir * lddo, lddo, mr, hd, MR, Ap);
            row_tile(hp, Ap, Vr, hp * NR, n, dP + ir * nk, nk, 1.0f, 0.0f, mr);
          }
          const int64_t qpp = cdiv(qp, 16) * 16, nk32 = cdiv(nk, 32) * 32;
          if (amx) {  // q and dout as transposed pairs (the A of dkᵀ, dvᵀ), zero-padded to whole tiles
            attn_train_k::pairs_t_avx512bf16(Qr, ldq, mq, hd, Qt, bp, hdp, qpp);
            attn_train_k::pairs_t_avx512bf16(dOr, lddo, mq, hd, Ot, bp, hdp, qpp);
          } else if (direct) {  // the pair panels of q and dout for dk, dv: their rows are in cache now
            pack_dim_cols(Qr, ldq, mq, hd, Qc);
            pack_dim_cols(dOr, lddo, mq, hd, Oc);
          }
          if (direct) {
            // P, dS and their three bf16 forms in one pass (the rounding of the separate passes)
            const int64_t np = cdiv(nk, 2);
            attn_train_k::probs_dscores_bf16_avx512bf16(mq, nk, t0, P, dP, nk, lse + (b * Hq + h) * T + t0,
                                                        dlt, scale, km_all ? nullptr : km,
                                                        reinterpret_cast<uint16_t*>(Db), 2 * np, D2,
                                                        P2, amx ? nk32 : nk);
            if (amx) {
              for (int64_t p2 = 0; p2 < qpp; ++p2) {  // D2, P2 zero past nk and past the last query pair
                const int64_t c0 = p2 < qp ? nk : 0;
                std::fill(D2 + p2 * nk32 + c0, D2 + (p2 + 1) * nk32, 0u);
                std::fill(P2 + p2 * nk32 + c0, P2 + (p2 + 1) * nk32, 0u);
              }
              for (int64_t ir = 0; ir < mq; ir += 32) {  // dq rows = dS·k
                const int mr = static_cast<int>(std::min<int64_t>(32, mq - ir));
                attn_amx::rows(ak, cdiv(keys_seen(t0, ir, mr, nk), 2), Db + ir * np, np, mr, Kc, tp * NR, hd,
                               dq + (b * T + t0 + ir) * lddq + h * hd, lddq);
              }
              attn_amx::acc_t(ak, qpp, Qt, bp, hdp, D2, nk32, nk32, dKt, Tp, t0);  // dkᵀ += qᵀ·dS
              attn_amx::acc_t(ak, qpp, Ot, bp, hdp, P2, nk32, nk32, dVt, Tp, t0);  // dvᵀ += doutᵀ·P
              continue;
            }
            for (int64_t ir = 0; ir < mq; ir += MR) {  // dq rows = dS·k
              const int mr = static_cast<int>(std::min<int64_t>(MR, mq - ir));
              const int64_t n = keys_seen(t0, ir, mr, nk);
              row_tile_direct(cdiv(n, 2), Db + ir * np, np, 1, Kc, tp * NR, hd,
                              dq + (b * T + t0 + ir) * lddq + h * hd, lddq, 1.0f, 0.0f, mr, half);
            }
            for (int64_t s = 0; s < nk; s += MR) {  // dk += dSᵀ·q, dv += Pᵀ·dout over the queries seeing keys s..
              const int mr = static_cast<int>(std::min<int64_t>(MR, nk - s));
              const int64_t q0 = std::max<int64_t>(0, s - t0) & ~int64_t{1};  // even: pairs stay aligned
              if (q0 >= mq) break;
              const int64_t kp = cdiv(mq - q0, 2);
              row_tile_direct(kp, D2 + (q0 / 2) * nk + s, 1, nk, Qc + (q0 / 2) * NR, qp * NR, hd, dKb + s * lddk,
                              lddk, 1.0f, 1.0f, mr, half);
              row_tile_direct(kp, P2 + (q0 / 2) * nk + s, 1, nk, Oc + (q0 / 2) * NR, qp * NR, hd, dVb + s * lddv,
                              lddv, 1.0f, 1.0f, mr, half);
            }
            continue;
          }
          probs_from_lse(kr, P, nk, mq, nk, t0, 0, km, km_all, lse + (b * Hq + h) * T);
          dscores_causal(P, dP, nk, mq, nk, t0, dlt, scale);
          for (int64_t ir = 0; ir < mq; ir += MR) {  // dq rows = dS·k
            const int mr = static_cast<int>(std::min<int64_t>(MR, mq - ir));
            const int64_t n = keys_seen(t0, ir, mr, nk);
            bf16_k::pack_rows_avx512bf16(dP + ir * nk, nk, mr, n, MR, Ap);
            row_tile(cdiv(n, 2), Ap, Kc, tp * NR, hd, dq + (b * T + t0 + ir) * lddq + h * hd, lddq, 1.0f, 0.0f,
                     mr);
          }
          for (int64_t s = 0; s < nk; s += MR) {  // dk += dSᵀ·q, dv += Pᵀ·dout over the queries seeing keys s..
            const int mr = static_cast<int>(std::min<int64_t>(MR, nk - s));
            const int64_t q0 = std::max<int64_t>(0, s - t0) & ~int64_t{1};  // even: pairs stay aligned
            if (q0 >= mq) break;
            const int64_t kc = mq - q0;
            bf16_k::pack_cols_avx512bf16(dP + q0 * nk + s, nk, mr, kc, MR, Ap);
            row_tile(cdiv(kc, 2), Ap, Qc + (q0 / 2) * NR, qp * NR, hd, dKb + s * lddk, lddk, 1.0f, 1.0f, mr);
            bf16_k::pack_cols_avx512bf16(P + q0 * nk + s, nk, mr, kc, MR, Ap);
            row_tile(cdiv(kc, 2), Ap, Oc + (q0 / 2) * NR, qp * NR, hd, dVb + s * lddv, lddv, 1.0f, 1.0f, mr);
          }
        }
      }
      if (amx) {  // dk, dv rows from the transposed sums
        attn_train_k::transpose_f32_avx512bf16(dKt, Tp, hd, T, dKb, lddk);
        attn_train_k::transpose_f32_avx512bf16(dVt, Tp, hd, T, dVb, lddv);
      }
    }
  });
}
}  // namespace qlora::cpu::ops::attn
#endif
