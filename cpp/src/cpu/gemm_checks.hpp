// Argument checks and the NF4 block-scale scratch shared by the fp32 GEMM driver (cpu/gemm.cpp)
// and the bf16 one (cpu/gemm_bf16.cpp). Internal linkage (anonymous namespace): include only from
// baseline-compiled files, never from a *_avx2 / *_avx512 kernel file (cpu/README.md).
#pragma once
#include <algorithm>
#include <cstdint>

#include "common/error.hpp"
#include "cpu/pack.hpp"
#include "tensor_types.hpp"

namespace qlora::cpu {
namespace {

void check_dims(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t a_cols, int64_t ldb, int64_t b_cols,
                int64_t ldc) {
  check_arg(M >= 0 && N >= 0 && K >= 0, "gemm: negative dimension");
  check_arg(lda >= std::max<int64_t>(1, a_cols) && ldb >= std::max<int64_t>(1, b_cols) && ldc >= std::max<int64_t>(1, N),
            "gemm: leading dimension smaller than the row width");
}

// Checks an NF4 weight's shape and blocksize; returns log2(blocksize).
int check_nf4(const Nf4Ref& W) {
  check_arg(W.rows >= 1 && W.cols >= 1, "nf4 gemm: empty weight");
  check_arg(W.blocksize >= 16 && (W.blocksize & (W.blocksize - 1)) == 0, "nf4 gemm: blocksize must be a power of two >= 16");
  int s = 0;
  while ((1 << s) < W.blocksize) ++s;
  return s;
}

// Decoded absmax of the blocks the flat run [j0, j0 + len) touches (len <= kMaxLen, the largest KC).
struct RunScales {
  static constexpr int64_t kMaxLen = 4096;
  float v[kMaxLen / 16 + 2];
  const float* fill(const Nf4Ref& W, int64_t j0, int64_t len, int s) {
    pack::nf4_scales(W, j0 >> s, ((j0 + len - 1) >> s) + 1, v);
    return v;
  }
};

}  // namespace
}  // namespace qlora::cpu
