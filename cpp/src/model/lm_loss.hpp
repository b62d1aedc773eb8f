// The causal-LM loss through the lm_head on any backend: row chunks of the logits by the backend's
// GEMMs (or its own lm_head layout, Backend::lm_head_begin) and its cross_entropy_rows, so the
// [N, V] logits are never materialized. Backend-neutral: it calls Backend ops only.
#pragma once
#include <cstddef>
#include <cstdint>

#include "backend.hpp"

namespace qlora {

// Causal-LM cross-entropy through the lm_head, on any backend (lm_loss.cpp).
// h [N, D] (row stride ldh; the final-norm output), E [V, D] (the lm_head / tied embedding,
// contiguous), labels int32 [N] in HOST memory (already shifted; -100 = ignored; anything else
// outside [0, V) throws ValueError before any work). h, E and dh live in the backend's memory.
// Row chunks of `chunk_rows` go through logits = h·Eᵀ (gemm_nt), the backend's
// cross_entropy_rows, and (when dh != nullptr) dh = dlogits·E (gemm_nn), so only a
// [chunk_rows, V] logits buffer exists at a time, never [N, V].
// dh [N, D] (row stride lddh) = d(loss_sum * grad_scale)/dh, overwritten (0 on ignored rows);
// dh may alias h with the same row stride (a chunk's rows are read before they are written).
// dh == nullptr: the forward-only (eval loss) variant.
struct CrossEntropyResult {
  double loss_sum = 0.0;       // Σ over non-ignored rows of -log softmax(logits)[label]
  int64_t count = 0;           // non-ignored rows
  size_t workspace_bytes = 0;  // bytes this call allocated (the bound: it does not grow with N)
};
constexpr int64_t kCrossEntropyChunkRows = 256;
// The scratch one call allocates for `rows_in_chunk` = min(N, chunk_rows): logits [rows, V]
// fp32 + per-row loss [rows] fp32 + the gathered labelled rows [rows + 1, D] fp32 and their indices
// [rows] int32 (lm_loss.cpp: the GEMMs skip rows labelled -100) + labels [rows] int32 on device backends.
size_t cross_entropy_workspace_bytes(int64_t rows_in_chunk, int64_t V, int64_t D, bool device);
CrossEntropyResult lm_cross_entropy(Backend& be, int64_t N, int64_t D, int64_t V, const float* h, int64_t ldh,
                                    const float* E, const int32_t* labels, float grad_scale, float* dh,
                                    int64_t lddh, int64_t chunk_rows = kCrossEntropyChunkRows, bool bf16 = false);
// bf16: the two lm_head GEMMs run as Backend::gemm_*_bf16 (compute_dtype="bfloat16"); softmax and
// loss stay fp32. Where the backend has a layout of its own for the call (Backend::lm_head_begin;
// CPU: the bf16 panels packed once for all chunks) the GEMMs run through it, the same bits.
// The lm_head as a Q8_0 matrix (head_format "q8_0": V rows of D/32 Q8_0 blocks, backend memory):
// logits by Backend::q8_0_gemm_nt (fp32 compute on the exact dequantized values; bf16:
// q8_0_gemm_nt_bf16, the dequantized chunks through the bf16 GEMM), dh by
// Backend::q8_0_gemm_nn (bf16: its chunks' GEMMs in bf16 compute); workspace_bytes includes the
// latter's dequantization scratch.
CrossEntropyResult lm_cross_entropy_q8_0(Backend& be, int64_t N, int64_t D, int64_t V, const float* h, int64_t ldh,
                                         const void* E_q8, const int32_t* labels, float grad_scale, float* dh,
                                         int64_t lddh, int64_t chunk_rows = kCrossEntropyChunkRows, bool bf16 = false);
// Q8_0 rows standing in for their fp32 dequantization (a GGUF's tied token_embd under head_format
// "float32", its fp32 table never made): lm_cross_entropy(bf16 = true) over that table, the same
// bits, with the bf16 panels (cpu/lm_head_bf16.hpp) packed from the Q8_0 rows; no widened chunk.
// Only where ..._applies (Backend::lm_head_extras(...).q8_0_rows; CPU: cpu::lm_head_q8_0_panels_apply,
// both lm_head GEMMs of that call from the panels (bf16, host memory, lm_head_panels_apply, the dh from the
// panels when want_grad, D % 32 == 0) and QLORA_BF16_HEAD_Q8 is not "0" (read per call: A/B runs
// and tests make the caller widen the table); ValueError otherwise (the caller widens the table
// instead). One chunk (N <= chunk_rows) packs the panels too: gemm_nt_bf16 / gemm_nn_bf16 over the
// table give the same bits (cpu/lm_head_bf16.hpp), so a short pass needs no table either.
bool lm_cross_entropy_q8_0_as_f32_applies(const Backend& be, int64_t N, int64_t D, int64_t V, int64_t chunk_rows,
                                          bool bf16, bool want_grad);
// fp32 (bf16 = false): lm_cross_entropy(bf16 = false) over that table, the same bits, each GEMM
// decoding the rows into its B panels (cpu/q8_0_head.hpp; workspace: that of lm_cross_entropy);
// applies on the CPU backend at any level but scalar with D % 32 == 0 and QLORA_F32_HEAD_Q8 not "0".
CrossEntropyResult lm_cross_entropy_q8_0_as_f32(Backend& be, int64_t N, int64_t D, int64_t V, const float* h,
                                                int64_t ldh, const void* E_q8, const int32_t* labels, float grad_scale,
                                                float* dh, int64_t lddh, int64_t chunk_rows = kCrossEntropyChunkRows,
                                                bool bf16 = true);
// The lm_head as 16-bit rows (head_format "f16" / "bf16": V rows of D fp16 values, or bf16 when
// rows_bf16, backend memory): logits by Backend::half_gemm_nt (fp32 compute on the exact widened values; bf16:
// half_gemm_nt_bf16), dh by Backend::half_gemm_nn; workspace_bytes includes the widened chunk.
CrossEntropyResult lm_cross_entropy_half(Backend& be, int64_t N, int64_t D, int64_t V, const float* h, int64_t ldh,
                                         bool rows_bf16, const void* E16, const int32_t* labels, float grad_scale,
                                         float* dh, int64_t lddh, int64_t chunk_rows = kCrossEntropyChunkRows,
                                         bool bf16 = false);

}  // namespace qlora
