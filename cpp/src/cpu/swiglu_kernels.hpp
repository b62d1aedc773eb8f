// SIMD kernels of the SwiGLU forward out = silu(gate) * up = gate * up / (1 + exp(-gate))
// (declarations only: cpu/README.md). ops::swiglu dispatches to them by level; the generic level
// keeps the plain loop with std::exp. exp is Cody-Waite range reduction plus Cephes' degree-6
// polynomial (within 2 ulp of exp on fp32 inputs), and the division is IEEE, so the result stays
// within a few ulp of the float64 value, as std::exp's does.
#pragma once
#include <cstdint>

namespace qlora::cpu::swiglu_k {

// Rows [m0, m1) of out[M, N] (row strides ldg, ldu, ldo; out may alias gate or up).
void rows_avx2(int64_t m0, int64_t m1, int64_t N, const float* gate, int64_t ldg, const float* up, int64_t ldu,
               float* out, int64_t ldo);
void rows_avx512(int64_t m0, int64_t m1, int64_t N, const float* gate, int64_t ldg, const float* up, int64_t ldu,
                 float* out, int64_t ldo);

}  // namespace qlora::cpu::swiglu_k
