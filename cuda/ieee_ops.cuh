// fp32 arithmetic that matches the CPU build bit for bit under --use_fast_math: each op is one PTX
// instruction with an explicit round-to-nearest modifier and no .ftz, so it is IEEE-exact with
// subnormals kept, and never contracted into a fused multiply-add (PTX: instructions with an
// explicit rounding modifier are not merged by the optimizer). Used where kernels must reproduce
// the host code exactly (AdamW, gradient clipping). Included by .cu files only.
#pragma once
#include <cuda_runtime.h>

namespace qlora::cuda {

__device__ __forceinline__ float ieee_add(float a, float b) {
  float r;
  asm("add.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ float ieee_sub(float a, float b) {
  float r;
  asm("sub.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ float ieee_mul(float a, float b) {
  float r;
  asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ float ieee_div(float a, float b) {
  float r;
  asm("div.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ float ieee_sqrt(float a) {
  float r;
  asm("sqrt.rn.f32 %0, %1;" : "=f"(r) : "f"(a));
  return r;
}
// NaN or +-inf (exponent bits all ones), independent of any fast-math assumption.
__device__ __forceinline__ bool is_nonfinite_bits(float x) { return (__float_as_uint(x) & 0x7F800000u) == 0x7F800000u; }

}  // namespace qlora::cuda
