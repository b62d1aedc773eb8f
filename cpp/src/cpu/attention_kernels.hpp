// Per-SIMD-level kernels of the KV-cache attention (cpu/ops_attention.cpp drives them). Only
// constants and declarations live here (no inline functions), so the *_avx2.cpp / *_avx512.cpp
// kernel files may include it (cpu/README.md).
//
// One call = one block of R query rows that read the same KV head (rows of a GQA group and/or
// consecutive queries). Row r:
//   Qp[r * hd .. +hd]  the query, pre-multiplied by scale * log2(e), so scores are in log2 units
//                      and the softmax weights are 2^(score - max) (exactly softmax(scale q·k));
//   n_vis[r]           it sees key slots s < n_vis[r] (causal limit) whose km[s] != 0.
// K, V [>= max n_vis, hd] (row stride hd): the cache rows of that KV head from slot 0.
// S [R, lds] scratch, any contents (lds >= max n_vis rounded up to 16, a multiple of 16): a lane is
// written before it is read (lanes past a row's n_vis may be computed on but are masked to 0).
// O [R, hd]: softmax(scores) · V per row, or exactly 0 for a row that sees no key.
// Each row's result depends only on that row's inputs (not on R or the other rows), so any split
// of rows into blocks or threads gives bit-identical output.
#pragma once
#include <cstdint>

namespace qlora::cpu::attn_k {

constexpr int64_t kMaxRows = 32;  // R <= kMaxRows rows per call
constexpr int64_t kLdsAlign = 16;

using AttnBlockFn = void (*)(int64_t R, int64_t hd, const float* Qp, const float* K, const float* V,
                             const int32_t* km, const int64_t* n_vis, float* S, int64_t lds, float* O);

// Portable C++ (std::exp2, compiler-vectorized loops).
void attn_block_generic(int64_t R, int64_t hd, const float* Qp, const float* K, const float* V, const int32_t* km,
                        const int64_t* n_vis, float* S, int64_t lds, float* O);
// AVX2+FMA / AVX-512: 8 / 16 keys' scores per step (tree-reduced dot products), polynomial exp2
// (max error 0.87 ulp, see the .cpp), V rows broadcast-accumulated into register tiles of 4 query rows.
void attn_block_avx2(int64_t R, int64_t hd, const float* Qp, const float* K, const float* V, const int32_t* km,
                     const int64_t* n_vis, float* S, int64_t lds, float* O);
void attn_block_avx512(int64_t R, int64_t hd, const float* Qp, const float* K, const float* V, const int32_t* km,
                       const int64_t* n_vis, float* S, int64_t lds, float* O);

// The same over a bf16 cache (K, V: bf16 bit patterns), each element widened exactly to fp32 as it
// is loaded; everything else (scores, softmax, accumulation) as the fp32 kernels.
using AttnBlockBf16Fn = void (*)(int64_t R, int64_t hd, const float* Qp, const uint16_t* K, const uint16_t* V,
                                 const int32_t* km, const int64_t* n_vis, float* S, int64_t lds, float* O);
void attn_block_generic_bf16(int64_t R, int64_t hd, const float* Qp, const uint16_t* K, const uint16_t* V,
                             const int32_t* km, const int64_t* n_vis, float* S, int64_t lds, float* O);
void attn_block_avx2_bf16(int64_t R, int64_t hd, const float* Qp, const uint16_t* K, const uint16_t* V,
                          const int32_t* km, const int64_t* n_vis, float* S, int64_t lds, float* O);
void attn_block_avx512_bf16(int64_t R, int64_t hd, const float* Qp, const uint16_t* K, const uint16_t* V,
                            const int32_t* km, const int64_t* n_vis, float* S, int64_t lds, float* O);

}  // namespace qlora::cpu::attn_k
