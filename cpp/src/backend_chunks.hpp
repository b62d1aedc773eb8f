// The widening scratch of the chunked backend defaults over row formats (backend_q8.cpp: Q8_0,
// backend_half.cpp: fp16 / bf16): ids 0..nc-1 and nc fp32 rows in the backend's memory, freed after
// the backend finished with them.
#pragma once
#include <algorithm>
#include <vector>

#include "backend.hpp"

namespace qlora {

struct RowChunks {
  Backend& be;
  int64_t nc;
  void* ids = nullptr;   // int32 [nc]: 0..nc-1
  void* rows = nullptr;  // fp32 [nc, K]
  RowChunks(Backend& b, int64_t N, int64_t chunk, int64_t K) : be(b), nc(std::min(N, chunk)) {
    ids = be.alloc(static_cast<size_t>(nc) * sizeof(int32_t));
    try {
      rows = be.alloc(static_cast<size_t>(nc) * static_cast<size_t>(K) * sizeof(float));
      std::vector<int32_t> iota(static_cast<size_t>(nc));
      for (int64_t i = 0; i < nc; ++i) iota[i] = static_cast<int32_t>(i);
      be.upload(ids, iota.data(), iota.size() * sizeof(int32_t));
      be.synchronize();  // before `iota` goes
    } catch (...) {
      release();
      throw;
    }
  }
  RowChunks(const RowChunks&) = delete;
  RowChunks& operator=(const RowChunks&) = delete;
  ~RowChunks() {
    try {
      be.synchronize();
    } catch (...) {  // already failing: the memory is still given back
    }
    release();
  }
  void release() {
    if (rows) be.free(rows);
    if (ids) be.free(ids);
    rows = ids = nullptr;
  }
  // The scratch bytes of a RowChunks of `chunk` rows over an [N, K] table (ids + rows).
  static size_t scratch_bytes(int64_t N, int64_t K, int64_t chunk) {
    const size_t r = static_cast<size_t>(std::min<int64_t>(std::max<int64_t>(N, 1), chunk));
    return r * static_cast<size_t>(K) * sizeof(float) + r * sizeof(int32_t);
  }
};

// The two chunk loops of those defaults; c.load(W, n0, n, K) widens rows [n0, n0 + n) of W into
// c.rows and returns them (fp32 [n, K]). Arguments checked by the caller, M >= 1.
// Y[M, N] = X[M, K] · Wᵀ in bf16 compute, one gemm_nt_bf16 per chunk of columns.
template <class Chunks>
void chunked_gemm_nt_bf16(Chunks& c, int64_t M, int64_t N, int64_t K, const float* X, int64_t ldx, const void* W,
                          float* Y, int64_t ldy) {
  for (int64_t n0 = 0; n0 < N; n0 += c.nc) {
    const int64_t n = std::min(c.nc, N - n0);
    c.be.gemm_nt_bf16(M, n, K, 1.0f, X, ldx, c.load(W, n0, n, K), K, 0.0f, Y + n0, ldy);
  }
}

// dX[M, K] = alpha * dY[M, N] · W + beta * dX, one gemm_nn (bf16: gemm_nn_bf16) per chunk of W's
// rows, the chunks after the first accumulating.
template <class Chunks>
void chunked_gemm_nn(Chunks& c, int64_t M, int64_t N, int64_t K, float alpha, const float* dY, int64_t lddy,
                     const void* W, float beta, float* dX, int64_t lddx, bool bf16) {
  for (int64_t n0 = 0; n0 < N; n0 += c.nc) {
    const int64_t n = std::min(c.nc, N - n0);
    const float* S = c.load(W, n0, n, K);
    const float b = n0 == 0 ? beta : 1.0f;
    if (bf16) c.be.gemm_nn_bf16(M, K, n, alpha, dY + n0, lddy, S, K, b, dX, lddx);
    else c.be.gemm_nn(M, K, n, alpha, dY + n0, lddy, S, K, b, dX, lddx);
  }
}

}  // namespace qlora
