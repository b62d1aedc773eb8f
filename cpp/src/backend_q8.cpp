// Backend defaults built on other ops (every backend has them): fill_zero, copy and the Q8_0
// lm_head backward q8_0_gemm_nn (backend.hpp).
#include <algorithm>
#include <string>
#include <vector>

#include "backend.hpp"
#include "backend_chunks.hpp"
#include "common/error.hpp"

namespace qlora {

void Backend::fill_zero(void* p, size_t bytes) {
  static const std::vector<char> zeros(size_t{1} << 20, 0);  // uploads of one zero block
  for (size_t off = 0; off < bytes; off += zeros.size())
    upload(static_cast<char*>(p) + off, zeros.data(), std::min(zeros.size(), bytes - off));
}

void Backend::copy(void* dst, const void* src, size_t bytes) {
  if (!bytes) return;
  std::vector<char> host(bytes);
  download(host.data(), src, bytes);
  upload(dst, host.data(), bytes);
  synchronize();  // before `host` goes
}

size_t Backend::q8_0_gemm_nn_scratch_bytes(int64_t N, int64_t K) {
  return RowChunks::scratch_bytes(N, K, kQ8_0GemmNnChunk);
}

namespace {
struct Q8Chunks : RowChunks {
  Q8Chunks(Backend& b, int64_t N, int64_t K) : RowChunks(b, N, Backend::kQ8_0GemmNnChunk, K) {}
  // Rows [n0, n0 + n) of W dequantized into rows (fp32 [n, K]).
  float* load(const void* W, int64_t n0, int64_t n, int64_t K) {
    be.q8_0_rows(n, K, static_cast<const uint8_t*>(W) + static_cast<size_t>(n0) * static_cast<size_t>(K / 32) * 34,
                 static_cast<const int32_t*>(ids), static_cast<float*>(rows));
    return static_cast<float*>(rows);
  }
};
}  // namespace

void Backend::q8_0_gemm_nt_bf16(int64_t M, int64_t N, int64_t K, const float* X, int64_t ldx, const void* W, float* Y,
                                int64_t ldy) {
  check_arg(K >= 32 && K % 32 == 0 && N >= 1 && M >= 0 && ldx >= K && ldy >= N,
            "q8_0_gemm_nt_bf16: need K a multiple of 32, N >= 1, M >= 0, ldx >= K, ldy >= N");
  if (M == 0) return;
  Q8Chunks c(*this, N, K);
  chunked_gemm_nt_bf16(c, M, N, K, X, ldx, W, Y, ldy);
}

void Backend::q8_0_gemm_nn(int64_t M, int64_t N, int64_t K, float alpha, const float* dY, int64_t lddy, const void* W,
                           float beta, float* dX, int64_t lddx, bool bf16) {
  check_arg(K >= 32 && K % 32 == 0 && N >= 1 && M >= 0 && lddy >= N && lddx >= K,
            "q8_0_gemm_nn: need K a multiple of 32, N >= 1, M >= 0, lddy >= N, lddx >= K");
  if (M == 0) return;
  Q8Chunks c(*this, N, K);
  chunked_gemm_nn(c, M, N, K, alpha, dY, lddy, W, beta, dX, lddx, bf16);
}

}  // namespace qlora
