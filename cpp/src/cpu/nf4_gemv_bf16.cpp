// Driver of the bf16-compute NF4 GEMV (nf4_gemv_bf16.hpp), level-neutral: rounds and regroups X
// once per call, decodes the double-quant block scales of a few rows at a time into a per-thread
// buffer (the same float ops as scalar::nf4_block_absmax, via nf4_gemv.cpp's decoder), and spreads
// even row chunks over the thread pool as nf4_gemv.cpp does, so a row's result (its pair (2j,
// 2j + 1) and its summation order) depends on K and M only, never on the thread count.
#include "cpu/nf4_gemv_bf16.hpp"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cpu/cache_info.hpp"
#include "cpu/gemm_bf16.hpp"
#include "cpu/gemv_tasks.hpp"
#include "cpu/nf4_gemv_bf16_kernels.hpp"
#include "cpu/nf4_gemv_kernels.hpp"
#include "cpu/threads.hpp"

namespace qlora::cpu {

#if defined(QLORA_X86)  // (the kernels are x86-only: elsewhere nf4_gemv_bf16_applies is false)
namespace {

int log2_exact(int bs) {
  int s = 0;
  while ((1 << s) < bs) ++s;
  return s;
}

// QLORA_BF16_GEMV=0 sends decode back to the bf16 GEMM driver (A/B measurements); read per call
// (a few hundred calls per decode step: negligible), so a process can switch it.
bool enabled() {
  const char* e = std::getenv("QLORA_BF16_GEMV");
  return !(e && std::strcmp(e, "0") == 0);
}

// QLORA_NF4_GEMV_PF="l1,l2" overrides the prefetch distances in bytes (A/B measurements, as for
// the fp32 M = 1 kernel; "0,0" is the shortest: the kernel always issues them).
void prefetch_override(int64_t& l1, int64_t& l2) {
  const char* e = std::getenv("QLORA_NF4_GEMV_PF");
  long long a = 0, b = 0;
  if (e && std::sscanf(e, "%lld,%lld", &a, &b) == 2 && a >= 0 && b >= 0) l1 = a, l2 = b;
}


// The fp32-FMA variant (nf4_gemv.hpp's nf4_gemv_nt_many_bf16_fp32: the same contract through the
// fp32 kernels, another summation order) or the vdpbf16ps kernel. Default: the variant at M = 1 on
// AMX-BF16 CPUs (Sapphire Rapids+), whose vdpbf16ps is slow: there its M = 1 row pairs with
// hardware-rounded tables decoded 1-7% more bytes per CPU second than the vdpbf16ps kernel
// (Emerald Rapids VM, 1 thread, 4096x4096 / 4096x11008 from DRAM); vdpbf16ps elsewhere (on the
// Zen 4 the vdpbf16ps GEMV was ~1.5x the fp32 one) and at M >= 2 (within noise there).
// QLORA_BF16_GEMV_FP32=1 / 0 forces one at every M (read per call: A/B runs).
bool fp32_variant(int64_t M) {
  const char* e = std::getenv("QLORA_BF16_GEMV_FP32");
  if (e && std::strcmp(e, "1") == 0) return true;
  if (e && std::strcmp(e, "0") == 0) return false;
  static const bool amx = cpu_has_amx_bf16();
  return M == 1 && amx;
}

}  // namespace
#endif

bool nf4_gemv_bf16_applies(SimdLevel level, int64_t M, const Nf4Ref& W) {
#if defined(QLORA_X86)
  return level == SimdLevel::AVX512 && bf16_compute_available(level) && M >= 1 && M <= kNf4GemvBf16MaxM &&
         W.cols % 64 == 0 && W.blocksize >= 64 && enabled();
#else
  (void)level, (void)M, (void)W;
  return false;
#endif
}

#if defined(QLORA_X86)
namespace {

// Rows [r0, r1) of W with the block scales of a few rows at a time decoded into the running
// thread's buffer.
void run_rows(const nf4_gemv_bf16_detail::Args& a, const Nf4Ref& W, int64_t r0, int64_t r1) {
  const uint8_t* code = static_cast<const uint8_t*>(W.absmax);
  gemv_tasks::scaled_rows(
      a, W, r0, r1,
      [&](int64_t b0, int64_t b1, float* out) {
        nf4_gemv_detail::decode_scales_avx512(code, W.nested_map, W.nested_absmax, W.offset, b0, b1, out);
      },
      [](const nf4_gemv_bf16_detail::Args& x, int64_t q0, int64_t q1) { nf4_gemv_bf16_detail::rows_bf16(x, q0, q1); });
}

// The calling thread's grow-only scratch (no allocation per decode-step call): the rounded,
// regrouped X and the task list. Only the calling thread writes them; the pool's threads read
// them while the caller waits in parallel_for.
struct CallScratch {
  std::vector<uint16_t> xb;
  std::vector<gemv_tasks::Task> tasks;
};
CallScratch& call_scratch() {
  thread_local CallScratch s;
  return s;
}

// Y_i = alpha * r(X) · r(deq(W_i))ᵀ + beta * Y_i for n weights sharing K: one regroup of X, one
// job (with the tail's tasks). Task rows are even chunks of each weight (pairs (2j, 2j + 1)
// whatever the split), so a row's result depends on K and M only.
void run_job(int64_t M, float alpha, const float* X, int64_t ldx, int64_t n, const Nf4Ref* const* W, float beta,
             float* const* Y, const int64_t* ldy, const GemvTail* tail) {
  namespace d = nf4_gemv_bf16_detail;
  if (fp32_variant(M)) return nf4_gemv_nt_many_bf16_fp32(M, alpha, X, ldx, n, W, beta, Y, ldy, tail);
  const int64_t K = W[0]->cols;
  CallScratch fresh;
  CallScratch& cs_ = gemv_tasks::scratch_enabled() ? call_scratch() : fresh;
  if (cs_.xb.size() < static_cast<size_t>(M * K)) cs_.xb.resize(static_cast<size_t>(M * K));
  d::regroup_x_bf16(M, K, X, ldx, cs_.xb.data());
  d::Args base{};
  base.M = M;
  base.K = K;
  base.codes = kNf4Codes;
  base.xb = cs_.xb.data();
  base.alpha = alpha;
  base.beta = beta;
  // Prefetch distances as nf4_gemv.cpp's (row pairs ahead, capped by the caches).
  const CacheSizes& cs = cache_sizes();
  base.pf_l1 = std::max<int64_t>(64, std::min<int64_t>(4 * K, cs.l1d / 2));
  base.pf_l2 = std::max<int64_t>(base.pf_l1, std::min<int64_t>(16 * K, cs.l2 / 16));
  prefetch_override(base.pf_l1, base.pf_l2);

  const int64_t total = gemv_tasks::split(M, K, n, W, cs_.tasks);
  gemv_tasks::run(cs_.tasks, total, tail, tail && tail->prefetch,
                  [&](const gemv_tasks::Task& t, int64_t r0, int64_t r1, const char* pf_lo, const char* pf_hi) {
                    const Nf4Ref& w = *W[t.w];
                    d::Args a = base;
                    a.packed = w.packed;
                    a.bs_shift = log2_exact(w.blocksize);
                    a.y = Y[t.w];
                    a.ldy = ldy[t.w];
                    a.pf_lo = pf_lo, a.pf_hi = pf_hi;
                    run_rows(a, w, r0, r1);
                  });
}

}  // namespace
#endif

void nf4_gemv_bf16(int64_t M, float alpha, const float* X, int64_t ldx, const Nf4Ref& W, float beta, float* Y,
                   int64_t ldy) {
#if defined(QLORA_X86)
  const Nf4Ref* w = &W;
  run_job(M, alpha, X, ldx, 1, &w, beta, &Y, &ldy, nullptr);
#else
  (void)M, (void)alpha, (void)X, (void)ldx, (void)W, (void)beta, (void)Y, (void)ldy;
#endif
}

void nf4_gemv_bf16_many(int64_t M, const float* X, int64_t ldx, int64_t n, const Nf4Ref* const* W, float* const* Y,
                        const int64_t* ldy, const GemvTail* tail) {
#if defined(QLORA_X86)
  run_job(M, 1.0f, X, ldx, n, W, 0.0f, Y, ldy, tail);
#else
  (void)M, (void)X, (void)ldx, (void)n, (void)W, (void)Y, (void)ldy, (void)tail;
#endif
}

}  // namespace qlora::cpu
