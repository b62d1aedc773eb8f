// CpuBackend's 16-bit-row ops (head_format "f16" / "bf16"; backend.hpp, cpu/half_rows.hpp), kept
// apart from cpu_backend.cpp.
#include <cstdint>

#include "cpu/cpu_backend.hpp"
#include "cpu/half_rows.hpp"
#include "cpu/profile.hpp"

namespace qlora::cpu {

namespace {
double d(int64_t v) { return static_cast<double>(v); }
}  // namespace

void CpuBackend::half_gemm_nt(HalfType t, int64_t M, int64_t N, int64_t K, const float* X, int64_t ldx, const void* W,
                              float* Y, int64_t ldy) {
  prof::Scope sc(prof::Part::Other, "half_gemm_nt", 2 * d(M) * d(N) * d(K), 2 * d(N) * d(K) + 4 * d(M) * (d(N) + d(K)),
                 M, N, K);
  cpu::half_gemm_nt(level(), t == HalfType::BF16, M, N, K, X, ldx, W, Y, ldy);
}

void CpuBackend::half_rows(HalfType t, int64_t M, int64_t K, const void* W, const int32_t* ids, float* out) {
  prof::Scope sc(prof::Part::Other, "half_rows", 0, 6.0 * d(M) * d(K), M, K);
  cpu::half_rows(level(), t == HalfType::BF16, M, K, W, ids, out);
}

}  // namespace qlora::cpu
