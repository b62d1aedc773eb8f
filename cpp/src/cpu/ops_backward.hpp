// CPU training ops: gradients of the transformer ops in ops_model.hpp, the training attention
// (self-attention over the sequence, with logsumexp kept for the backward) and the per-row
// softmax cross-entropy (driven by the chunked loss, model/lm_loss.hpp). Semantics are those of
// the Backend methods of the same names (backend.hpp). Plain loops the compiler can vectorize, threaded with parallel_range; fp32.
#pragma once
#include <cstdint>

#include "cpu/features.hpp"

namespace qlora::cpu::ops {

// ops_backward_elementwise.cpp
// Row kernels at AVX2 / AVX-512 (cpu/rowops_kernels.hpp), reference loops below.
void rmsnorm_backward(SimdLevel level, int64_t M, int64_t D, const float* x, const float* w, float eps, const float* dy, float* dx);
void rope_backward(int64_t M, int64_t n_heads, int64_t head_dim, float* dx, int64_t ldx, const int32_t* pos,
                   const float* inv_freq);
void swiglu_backward(SimdLevel level, int64_t M, int64_t N, const float* gate, int64_t ldg, const float* up,
                     int64_t ldu, const float* dout, int64_t ldd, float* dgate, int64_t lddg, float* dup, int64_t lddu);

// ops_attention_train.cpp, ops_attention_train_bf16.cpp (tile products through the GEMM kernels of
// `level`; bf16: all but the scores q·kᵀ on bf16-rounded operands, fp32 accumulation, where
// bf16_compute_available(level), else fp32)
void attention_train(SimdLevel level, int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t hd, const float* q,
                     int64_t ldq, const float* k, int64_t ldk, const float* v, int64_t ldv, const int32_t* key_mask,
                     float scale, float* out, int64_t ldo, float* lse, bool bf16 = false);
void attention_train_backward(SimdLevel level, int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t hd,
                              const float* q, int64_t ldq, const float* k, int64_t ldk, const float* v, int64_t ldv,
                              const int32_t* key_mask, float scale, const float* out, int64_t ldo,
                              const float* lse, const float* dout, int64_t lddo, float* dq, int64_t lddq,
                              float* dk, int64_t lddk, float* dv, int64_t lddv, bool bf16 = false);

// ops_loss.cpp
// SIMD exp at AVX2 / AVX-512 (cpu/rowops_kernels.hpp), std::exp below.
void cross_entropy_rows(SimdLevel level, int64_t M, int64_t V, float* logits, int64_t ldl, const int32_t* labels,
                        float grad_scale, bool want_grad, float* loss);

}  // namespace qlora::cpu::ops
