// Backend defaults for 16-bit float rows (head_format "f16" / "bf16", backend.hpp): the lm_head
// backward half_gemm_nn and the bf16-compute logits half_gemm_nt_bf16, both over chunks of W
// widened to fp32 by half_rows (the pattern of the Q8_0 defaults in backend_q8.cpp).
#include <algorithm>
#include <string>
#include <vector>

#include "backend.hpp"
#include "backend_chunks.hpp"
#include "common/error.hpp"

namespace qlora {

size_t Backend::half_chunk_scratch_bytes(int64_t N, int64_t K) {
  return RowChunks::scratch_bytes(N, K, kHalfChunk);
}

namespace {
struct HalfChunks : RowChunks {
  Backend::HalfType t;
  HalfChunks(Backend& b, Backend::HalfType type, int64_t N, int64_t K)
      : RowChunks(b, N, Backend::kHalfChunk, K), t(type) {}
  // Rows [n0, n0 + n) of W widened into rows (fp32 [n, K]).
  float* load(const void* W, int64_t n0, int64_t n, int64_t K) {
    be.half_rows(t, n, K, static_cast<const uint16_t*>(W) + static_cast<size_t>(n0) * static_cast<size_t>(K),
                 static_cast<const int32_t*>(ids), static_cast<float*>(rows));
    return static_cast<float*>(rows);
  }
};
}  // namespace

void Backend::half_gemm_nt_bf16(HalfType t, int64_t M, int64_t N, int64_t K, const float* X, int64_t ldx,
                                const void* W, float* Y, int64_t ldy) {
  check_arg(K >= 1 && N >= 1 && M >= 0 && ldx >= K && ldy >= N,
            "half_gemm_nt_bf16: need K >= 1, N >= 1, M >= 0, ldx >= K, ldy >= N");
  if (M == 0) return;
  HalfChunks c(*this, t, N, K);
  chunked_gemm_nt_bf16(c, M, N, K, X, ldx, W, Y, ldy);
}

void Backend::half_gemm_nn(HalfType t, int64_t M, int64_t N, int64_t K, float alpha, const float* dY, int64_t lddy,
                           const void* W, float beta, float* dX, int64_t lddx, bool bf16) {
  check_arg(K >= 1 && N >= 1 && M >= 0 && lddy >= N && lddx >= K,
            "half_gemm_nn: need K >= 1, N >= 1, M >= 0, lddy >= N, lddx >= K");
  if (M == 0) return;
  HalfChunks c(*this, t, N, K);
  chunked_gemm_nn(c, M, N, K, alpha, dY, lddy, W, beta, dX, lddx, bf16);
}

}  // namespace qlora
