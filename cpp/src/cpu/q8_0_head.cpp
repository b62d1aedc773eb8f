// fp32 lm_head GEMMs over Q8_0 rows without the fp32 table (see q8_0_head.hpp for why the bits are
// those of gemm_nt / gemm_nn over the table).
#include "cpu/q8_0_head.hpp"

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "cpu/gemm.hpp"

namespace qlora::cpu {

bool q8_0_head_f32_applies(SimdLevel level, int64_t D) {
  const char* e = std::getenv("QLORA_F32_HEAD_Q8");  // "0": the caller widens the table (A/B, tests)
  return !(e && std::strcmp(e, "0") == 0) && level != SimdLevel::Scalar && D >= 32 && D % 32 == 0;
}

int64_t q8_0_head_f32_block_rows(SimdLevel level, int64_t V) { return gemm_depth_block(level, V); }

size_t q8_0_head_f32_scratch_bytes(SimdLevel level, int64_t V, int64_t D) {
  return static_cast<size_t>(q8_0_head_f32_block_rows(level, V)) * static_cast<size_t>(D) * sizeof(float);
}

void q8_0_head_logits_f32(SimdLevel level, int64_t M, int64_t V, int64_t D, const float* h, int64_t ldh,
                          const void* E, float* logits, int64_t ldl, float* scratch) {
  // Column blocks of the depth-block size (balanced: no sliver of <= NR columns at the end, which
  // would take the direct micro-kernel; it computes a column as the packed one does anyway).
  const int64_t nb = q8_0_head_f32_block_rows(level, V);
  for (int64_t v0 = 0; v0 < V; v0 += nb) {
    const int64_t n = std::min(nb, V - v0);
    q8_0_decode_rows(v0, n, D, E, scratch);  // [n, D]
    gemm_nt(level, M, n, D, 1.0f, h, ldh, scratch, D, 0.0f, logits + v0, ldl);
  }
}

void q8_0_head_dh_f32(SimdLevel level, int64_t M, int64_t V, int64_t D, const float* dlogits, int64_t ldl,
                      const void* E, float* dh, int64_t lddh, float* scratch) {
  const int64_t kc = q8_0_head_f32_block_rows(level, V);  // the one-call GEMM's depth blocks
  for (int64_t k0 = 0; k0 < V; k0 += kc) {
    const int64_t n = std::min(kc, V - k0);
    q8_0_decode_rows(k0, n, D, E, scratch);  // [n, D]: rows k0.. of deq(E), the depth block's B
    gemm_nn(level, M, D, n, 1.0f, dlogits + k0, ldl, scratch, D, k0 == 0 ? 0.0f : 1.0f, dh, lddh);
  }
}

}  // namespace qlora::cpu
