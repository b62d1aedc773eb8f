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

std::vector<float>& thread_scales() {  // grow-only per thread (no allocation per task)
  thread_local std::vector<float> s;
  return s;
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

void nf4_gemv_bf16(int64_t M, float alpha, const float* X, int64_t ldx, const Nf4Ref& W, float beta, float* Y,
                   int64_t ldy) {
#if defined(QLORA_X86)
  namespace d = nf4_gemv_bf16_detail;
  const int64_t N = W.rows, K = W.cols;
  const int s = log2_exact(W.blocksize);
  std::vector<uint16_t> xb(static_cast<size_t>(M * K));
  d::regroup_x_bf16(M, K, X, ldx, xb.data());
  d::Args base{};
  base.M = M;
  base.K = K;
  base.packed = W.packed;
  base.bs_shift = s;
  base.codes = kNf4Codes;
  base.xb = xb.data();
  base.alpha = alpha;
  base.beta = beta;
  base.y = Y;
  base.ldy = ldy;
  // Prefetch distances as nf4_gemv.cpp's (row pairs ahead, capped by the caches).
  const CacheSizes& cs = cache_sizes();
  base.pf_l1 = std::max<int64_t>(64, std::min<int64_t>(4 * K, cs.l1d / 2));
  base.pf_l2 = std::max<int64_t>(base.pf_l1, std::min<int64_t>(16 * K, cs.l2 / 16));
  prefetch_override(base.pf_l1, base.pf_l2);

  // Rows [r0, r1) with the block scales of a few rows at a time decoded into `scales`.
  auto run = [&](int64_t r0, int64_t r1) {
    d::Args a = base;
    if (!W.double_quant) {
      a.absmax = static_cast<const float*>(W.absmax);
      a.block0 = 0;
      d::rows_bf16(a, r0, r1);
      return;
    }
    std::vector<float>& scales = thread_scales();
    const int64_t rows_per_sub = std::max<int64_t>(2, ((int64_t{4096} << s) / K) & ~int64_t{1});
    const uint8_t* code = static_cast<const uint8_t*>(W.absmax);
    for (int64_t q0 = r0; q0 < r1; q0 += rows_per_sub) {
      const int64_t q1 = std::min(r1, q0 + rows_per_sub);
      const int64_t b0 = (q0 * K) >> s, b1 = ((q1 * K - 1) >> s) + 1;  // blocks [b0, b1)
      scales.resize(static_cast<size_t>(b1 - b0));
      nf4_gemv_detail::decode_scales_avx512(code, W.nested_map, W.nested_absmax, W.offset, b0, b1, scales.data());
      a.absmax = scales.data();
      a.block0 = b0;
      d::rows_bf16(a, q0, q1);
    }
  };
  // Tasks of at least 128 KiB of packed weight at M <= 2 (less at larger M), even row counts.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / (K * std::max<int64_t>(1, M / 2)));
  const int64_t n_tasks = std::max<int64_t>(1, std::min<int64_t>((N + grain - 1) / grain, 4 * int64_t{num_threads()}));
  int64_t per = (N + n_tasks - 1) / n_tasks;
  per += per & 1;
  const int64_t n_run = (N + per - 1) / per;
  if (n_run == 1) return run(0, N);
  parallel_for(n_run, [&](int64_t t) { run(t * per, std::min(N, (t + 1) * per)); });
#else
  (void)M, (void)alpha, (void)X, (void)ldx, (void)W, (void)beta, (void)Y, (void)ldy;
#endif
}

}  // namespace qlora::cpu
