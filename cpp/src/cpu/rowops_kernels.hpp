// Per-SIMD-level kernels of the row-wise training ops: softmax / cross-entropy exp passes,
// RMSNorm sums and the SwiGLU backward (declarations only: cpu/README.md). The callers
// (ops_loss.cpp, ops_attention.cpp's training attention, ops_elementwise.cpp,
// ops_backward_elementwise.cpp) take rowk::for_level(level); nullptr (scalar and generic levels)
// means: run the plain reference loop with std::exp and serial double sums.
//
// exp is Cody-Waite range reduction plus Cephes' degree-6 polynomial (within 2 ulp of exp on
// fp32 inputs, as swiglu_kernels*); inputs <= -104 give exactly 0 (exp(-104) is below half the
// smallest fp32 denormal, so 0 is the correctly rounded value), -inf included; NaN stays NaN.
// Sums that the callers keep in double (softmax denominators, Σx², Σw·g·x) are accumulated in
// double lanes (exact fp32 -> double conversion, several independent lanes): same precision
// class as the serial double sum, different order, so results may differ in the last bit.
#pragma once
#include <cstdint>

namespace qlora::cpu {
enum class SimdLevel : int;  // cpu/features.hpp (not included: kernel files may include this header)
}

namespace qlora::cpu::rowk {

struct Kernels {
  float (*max)(const float* x, int64_t n);                            // -inf for n = 0 (NaN-free input)
  double (*exp_sum)(float* x, int64_t n, float sub);                  // x[i] = exp(x[i] - sub); returns Σ (double)
  double (*exp_sum_ro)(const float* x, int64_t n, float sub);         // Σ exp(x[i] - sub) (double), x unchanged
  void (*exp_scale)(float* x, int64_t n, float sub, float scale);     // x[i] = scale * exp(x[i] - sub)
  double (*sumsq)(const float* x, int64_t n);                         // Σ x[i]² (double)
  void (*sumsq_dot)(const float* x, const float* w, const float* g, int64_t n, double* ss,
                    double* dot);                                     // Σ x², Σ w·g·x (double)
  // SwiGLU backward of one row: du = d silu(g), dg = d u s (1 + g (1 - s)), s = sigmoid(g);
  // outputs may alias inputs element-wise.
  void (*swiglu_bwd)(int64_t n, const float* g, const float* u, const float* d, float* dg, float* du);
};

extern const Kernels kernels_avx2;
extern const Kernels kernels_avx512;

// The kernels of an x86 SIMD level, or nullptr for the scalar / generic levels (reference loops).
const Kernels* for_level(SimdLevel level);

}  // namespace qlora::cpu::rowk
