// The lm_head's logits GEMM in bf16 compute (compute_dtype="bfloat16") over an fp32 table E [V, D]
// whose bf16 B panels are packed once per lm_cross_entropy call and reused by every row chunk.
// gemm_nt_bf16 packs the same panels again for each 256-row chunk (the 49152 x 576 SmolLM2 table:
// 113 MB of fp32 read and rounded 4 times per step); here once, into 57 MB that the chunks read.
// Same rounding (RNE), same micro-kernel (AVX512-BF16, or AMX-BF16 tiles where gemm_nt_bf16 runs
// them: bf16_amx::kernel_choice(), read per call), same single depth block: the logits are
// bit-identical to gemm_nt_bf16's (tests/test_lm_head_bf16.py). AVX512-BF16 CPUs only; callers fall
// back otherwise.
#pragma once
#include <cstddef>
#include <cstdint>

#include "cpu/features.hpp"

namespace qlora::cpu {

// True where the packed-once path runs: `level` has the AVX512-BF16 kernels, D fits one depth
// block of the bf16 GEMM (so the k order equals gemm_nt_bf16's), V > kSkinnyMaxN (64: narrower
// outputs take gemm_nt_bf16's skinny kernel, kept for its bits), and QLORA_BF16_HEAD_PANELS is not
// "0" (read per call: A/B runs and the bit-equality test switch it off).
bool lm_head_panels_apply(SimdLevel level, int64_t V, int64_t D);
// Bytes of the packed table: ceil(V / 32) panels of 32 rows x ceil(D / 2) bf16 pairs (uint32).
size_t lm_head_panels_bytes(int64_t V, int64_t D);
// The bytes lm_cross_entropy adds to its workspace for these panels (0 where it does not pack
// them): bf16 compute over an fp32 table on the host (not a device backend), more rows than one
// chunk (N > chunk_rows: with one chunk there is nothing to reuse) and lm_head_panels_apply.
// The one rule for the loss and the training memory plan (cpu_backend_lm_head.cpp route()).
size_t lm_head_panels_workspace_bytes(SimdLevel level, int64_t N, int64_t D, int64_t V, int64_t chunk_rows,
                                      bool bf16, bool device);
// Where lm_cross_entropy_q8_0_as_f32 (model/lm_loss.hpp) runs: bf16 on the host, D % 32 == 0,
// lm_head_panels_apply, the dh from the panels too when want_grad, and QLORA_BF16_HEAD_Q8 not "0"
// (read per call). Any number of chunks: the panels stand in for the never-made fp32 table, so a
// single chunk packs them too (lm_head_panels_bytes of workspace). One rule for the loss and
// the training memory plan (model/train_memory.cpp).
bool lm_head_q8_0_panels_apply(SimdLevel level, int64_t D, int64_t V, bool bf16, bool device, bool want_grad);
// P (64-byte aligned, lm_head_panels_bytes) = E's B panels (rows of E = columns of the logits).
void lm_head_pack_panels(int64_t V, int64_t D, const float* E, int64_t lde, uint32_t* P);
// The same panels from E as Q8_0 rows (cpu/q8_0.hpp: V rows of D/32 blocks, D % 32 == 0), each
// 32-row group dequantized (exact: fp16 d x int8 q) into a per-thread fp32 tile, then rounded and
// packed as above: bit-identical to lm_head_pack_panels over the fp32 dequantization of the rows
// (a GGUF's token_embd trained in bf16 compute needs no 4-byte copy of the table, ops_backward.hpp).
void lm_head_pack_panels_q8_0(int64_t V, int64_t D, const void* E_q8, uint32_t* P);
// C[M, V] (ld ldc) = h[M, D] (ld ldh) · Eᵀ from the packed panels (alpha 1, beta 0).
void lm_head_logits_bf16(int64_t M, int64_t V, int64_t D, const float* h, int64_t ldh, const uint32_t* P, float* C,
                         int64_t ldc);

// dh[M, D] (ld lddh) = G[M, V] (ld ldg) · E (alpha 1, beta 0), bf16 compute, E's values read from the
// packed NT panels (transposed into the backward's B panels per depth block) instead of rounding
// the fp32 table again: bit-identical to gemm_nn_bf16(M, D, V, G, E) (same values, depth split,
// micro-kernel). Under the same conditions as lm_head_logits_bf16 and lm_head_dh_from_panels().
void lm_head_dh_bf16(int64_t M, int64_t V, int64_t D, const float* G, int64_t ldg, const uint32_t* P, float* dh,
                     int64_t lddh);
// D > kSkinnyMaxN (gemm_nn_bf16 runs narrower dh through its skinny kernel: kept, for its bits) and
// QLORA_BF16_HEAD_NN is not "0" (read per call; A/B runs of the backward alone).
bool lm_head_dh_from_panels(int64_t D);

}  // namespace qlora::cpu
