// CpuBackend::lm_head_extras: what the chunked LM loss (ops_loss.cpp) allocates beyond the logits
// chunk at this backend's level, and whether a tied Q8_0 token_embd's rows can stand in for the fp32
// table, from the same functions ops_loss.cpp asks (one rule for the loss, the model and the plan).
#include "cpu/cpu_backend.hpp"
#include "cpu/lm_head_bf16.hpp"
#include "cpu/q8_0_head.hpp"

namespace qlora::cpu {

Backend::LmHeadExtras CpuBackend::lm_head_extras(const LmHeadCall& c) const {
  LmHeadExtras e;
  if (c.N <= 0 || c.chunk_rows < 1) return e;
  const SimdLevel lv = level();
  // bf16 over an fp32 table: its bf16 panels, packed once per call when there are several chunks
  e.f32_table_bytes = lm_head_panels_workspace_bytes(lv, c.N, c.D, c.V, c.chunk_rows, c.bf16, false);
  if (!c.bf16 && q8_0_head_f32_applies(lv, c.D)) {  // fp32: the rows decoded into the GEMMs' B panels
    e.q8_0_rows = true;                              // (no scratch beyond the logits chunk)
  } else if (c.bf16 && lm_head_q8_0_panels_apply(lv, c.D, c.V, true, false, c.want_grad)) {
    e.q8_0_rows = true;  // bf16: the panels packed from the rows, even for one chunk
    e.q8_0_rows_bytes = lm_head_panels_bytes(c.V, c.D);
  }
  return e;
}

}  // namespace qlora::cpu
