// CpuBackend::nf4_gemm_nt_many_lora_bf16 (backend.hpp): the bf16-compute decode projections with
// their LoRA terms in ONE thread-pool job, as nf4_gemm_nt_many_lora does in fp32 compute: the bf16
// NF4 GEMV (cpu/nf4_gemv_bf16.hpp) carries the fused LoRA plan (cpu/lora_sgmv.hpp) as its GemvTail,
// so the factors are prefetched into L2 while the GEMV streams the base weights and the shrinks /
// expands run as the job's tasks. Every output equals the unfused path's (Backend's default: one
// nf4_gemm_nt_bf16 per projection, then lora_segments_many) bit for bit: the GEMV rows are
// nf4_gemv_bf16's (a row depends on K and M only) and the LoRA terms run the same kernels in the
// same order after the base outputs.
#include <cstdint>
#include <cstdlib>

#include "cpu/cpu_backend.hpp"
#include "cpu/lora_sgmv.hpp"
#include "cpu/nf4_gemv_bf16.hpp"
#include "cpu/profile.hpp"

namespace qlora::cpu {

namespace {

double d(int64_t v) { return static_cast<double>(v); }

// QLORA_SGMV_FUSE_BF16=0: the unfused bf16 path (A/B runs). Read per call so one process can
// interleave both; QLORA_SGMV_FUSE=0 / QLORA_SGMV=0 (read once) turn it off too.
bool bf16_fuse_enabled() {
  const char* e = std::getenv("QLORA_SGMV_FUSE_BF16");
  return !(e && e[0] == '0' && e[1] == '\0');
}

}  // namespace

void CpuBackend::nf4_gemm_nt_many_lora_bf16(int64_t M, const float* X, int64_t ldx, int64_t n,
                                            const Nf4Ref* const* W, float* const* Y, const int64_t* ldy,
                                            const LoraProblem* lora, float* t) {
  const SimdLevel lv = level();
  // Where every projection takes the bf16 GEMV with valid shapes (else the default, whose
  // nf4_gemm_nt_bf16 calls raise on bad arguments as before).
  bool fits = lv == SimdLevel::AVX512 && n >= 1 && n <= 8 && M >= 1 && M <= kNf4GemvBf16MaxM && bf16_fuse_enabled();
  for (int64_t i = 0; fits && i < n; ++i) {
    const Nf4Ref& w = *W[i];
    fits = w.rows >= 1 && w.cols == W[0]->cols && w.packed && (M == 1 || (ldx >= w.cols && ldy[i] >= w.rows)) &&
           lora[i].x == X && lora[i].y == Y[i] && lora[i].out == w.rows && lora[i].in == w.cols &&
           nf4_gemv_bf16_applies(lv, M, w);
  }
  SgmvFused plan;
  if (!fits || !plan.prepare(lv, n, lora)) return Backend::nf4_gemm_nt_many_lora_bf16(M, X, ldx, n, W, Y, ldy, lora, t);
  double fl = 0, by = 0;
  for (int64_t i = 0; prof::enabled() && i < n; ++i) {
    fl += 2 * d(M) * d(W[i]->rows) * d(W[i]->cols);
    by += d(W[i]->rows) * d(W[i]->cols) / 2 + 4.0 * d(M) * (d(W[i]->rows) + d(W[i]->cols));
    for (int64_t s = 0; s < lora[i].n; ++s) {
      const LoraSegment& g = lora[i].seg[s];
      fl += 2 * d(g.rows) * d(g.r) * d(lora[i].in + lora[i].out);
      by += (g.AB16 ? 2 : 4) * d(g.r) * d(lora[i].in + lora[i].out);
    }
  }
  prof::Scope sc(prof::Part::Nf4Fwd, "nf4_gemm_nt_many_lora_bf16", fl, by, M, n, W[0]->cols);
  const GemvTail tail = plan.tail();
  nf4_gemv_bf16_many(M, X, ldx, n, W, Y, ldy, &tail);
}

}  // namespace qlora::cpu
