// Placeholder until the real kernels land (the GEMM work replaces this file).
#include <stdexcept>

#include "cpu/gemm.hpp"

namespace qlora::cpu {
#define QLORA_TODO throw std::runtime_error("not implemented yet")
void gemm_nt(SimdLevel, int64_t, int64_t, int64_t, float, const float*, int64_t, const float*, int64_t, float, float*, int64_t) { QLORA_TODO; }
void gemm_nn(SimdLevel, int64_t, int64_t, int64_t, float, const float*, int64_t, const float*, int64_t, float, float*, int64_t) { QLORA_TODO; }
void gemm_tn(SimdLevel, int64_t, int64_t, int64_t, float, const float*, int64_t, const float*, int64_t, float, float*, int64_t) { QLORA_TODO; }
void nf4_gemm_nt(SimdLevel, int64_t, float, const float*, int64_t, const Nf4Ref&, float, float*, int64_t) { QLORA_TODO; }
void nf4_gemm_nn(SimdLevel, int64_t, float, const float*, int64_t, const Nf4Ref&, float, float*, int64_t) { QLORA_TODO; }
}  // namespace qlora::cpu
