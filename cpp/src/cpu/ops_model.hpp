// CPU transformer ops behind the Backend methods of the same names (semantics in backend.hpp).
// Plain loops the compiler can vectorize, threaded with parallel_range; fp32 in and out.
#pragma once
#include <cstdint>

#include "cpu/features.hpp"

namespace qlora::cpu::ops {

void embedding(int64_t M, int64_t D, const float* table, const int32_t* ids, float* out);
void rmsnorm(SimdLevel level, int64_t M, int64_t D, const float* x, const float* w, float eps, float* out);
void add_inplace(int64_t n, const float* x, float* y);
void add_bias(int64_t M, int64_t N, const float* bias, float* y, int64_t ldy);
// Rotate-half RoPE in place; inverse = rotation by -angle (its transpose: rope_backward).
void rope_rotate(int64_t M, int64_t n_heads, int64_t head_dim, float* x, int64_t ldx, const int32_t* pos,
                 const float* inv_freq, bool inverse);
void rope(int64_t M, int64_t n_heads, int64_t head_dim, float* x, int64_t ldx, const int32_t* pos,
          const float* inv_freq);
// out = silu(gate) * up; SIMD exp at AVX2 / AVX-512 (cpu/swiglu_kernels.hpp), std::exp below.
void swiglu(SimdLevel level, int64_t M, int64_t N, const float* gate, int64_t ldg, const float* up, int64_t ldu,
            float* out, int64_t ldo);
void kv_write(int64_t B, int64_t T, int64_t H, int64_t hd, const float* x, int64_t ldx, float* cache, int64_t S_cap,
              int64_t start);
// KV-cache attention (Backend::attention) with the kernels of `level` (Scalar: the plain reference loop).
void attention(SimdLevel level, int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t hd, const float* q,
               int64_t ldq, const float* k_cache, const float* v_cache, int64_t S_cap, int64_t start,
               const int32_t* key_mask, float scale, float* out, int64_t ldo);
// The bf16 KV cache (Backend::kv_write_bf16 / attention_kv_bf16): x rounded to bf16 (nearest even)
// as it is written; attention widens each element exactly and computes as attention() does.
void kv_write_bf16(int64_t B, int64_t T, int64_t H, int64_t hd, const float* x, int64_t ldx, uint16_t* cache,
                   int64_t S_cap, int64_t start);
void attention_bf16(SimdLevel level, int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t hd, const float* q,
                    int64_t ldq, const uint16_t* k_cache, const uint16_t* v_cache, int64_t S_cap, int64_t start,
                    const int32_t* key_mask, float scale, float* out, int64_t ldo);

}  // namespace qlora::cpu::ops
