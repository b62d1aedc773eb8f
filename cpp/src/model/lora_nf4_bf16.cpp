#include "model/lora_nf4_bf16.hpp"

#include <cstdlib>
#include <cstring>

#include "cpu/profile.hpp"

namespace qlora::model {

bool lora_nf4_forward_bf16(Backend& be, int n, const Nf4Ref* const* W, const LoraModule* const* m, int64_t M,
                           const float* x, int64_t ldx, const float* xl, int64_t ldxl, float* const* y,
                           const int64_t* ldy, float* t, float scale, LoraBf16 bf16) {
  // Opt-in (QLORA_BF16_LORA_EPILOGUE=1, read per call): measured neutral on Zen 4 (the r = 16
  // expand is bound by its FMAs, not by the pass over y it saves), so the default keeps the two calls.
  const char* e = std::getenv("QLORA_BF16_LORA_EPILOGUE");
  if (!(e && std::strcmp(e, "1") == 0) || scale == 0.0f || bf16[kLoraExpand] || n < 1 || n > kMaxLoraGroup)
    return false;
  const LoraModule* g[kMaxLoraGroup];
  int ng = 0;
  for (int i = 0; i < n; ++i)
    if (m[i]) g[ng++] = m[i];
  if (ng == 0 || !lora_group_adjacent(g, ng, false)) return false;
  const int64_t R = lora_rank_sum(g, ng), in = g[0]->in;
  {  // t[M, R] = xl·[A_0; ...]ᵀ: lora_forward(_group)'s shrink
    const prof::PartContext pc(prof::Part::LoraFwd);
    if (bf16[kLoraShrink]) be.gemm_nt_bf16(M, R, in, 1.0f, xl, ldxl, g[0]->A.f32(), in, 0.0f, t, R);
    else be.gemm_nt(M, R, in, 1.0f, xl, ldxl, g[0]->A.f32(), in, 0.0f, t, R);
  }
  Backend::Nf4Expand ex[kMaxLoraGroup];
  for (int i = 0, off = 0; i < n; ++i) {
    if (!m[i]) continue;
    ex[i] = Backend::Nf4Expand{t + off, R, m[i]->B.f32(), m[i]->r, scale * m[i]->scaling};
    off += static_cast<int>(m[i]->r);
  }
  be.nf4_gemm_nt_many_expand_bf16(M, x, ldx, n, W, y, ldy, ex);
  return true;
}

}  // namespace qlora::model
