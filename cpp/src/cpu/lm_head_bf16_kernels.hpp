// Kernel of cpu/lm_head_bf16.cpp (declarations only: included by its AVX512-BF16 TU, cpu/README.md).
#pragma once
#include <cstdint>

namespace qlora::cpu::lm_head_k {

// One NN B panel (32 columns 2 pd0 .. 2 pd0 + 31 of E, k = rows in pairs: out[pv * 32 + c] =
// {E[2pv, 2pd0 + c], E[2pv + 1, 2pd0 + c]}, pv < np <= 16) from one NT panel Q of 32 rows of E
// (Q[pd * 32 + v] = {E[v, 2pd], E[v, 2pd + 1]}, pd < kpd; columns from pair kpd on read as zero).
// Q and out 64-byte aligned.
void nt_to_nn_panel_avx512(const uint32_t* Q, int64_t kpd, int64_t pd0, int np, uint32_t* out);

// C[mr, nr] = Ap·Bp over kp pairs (bf16_k::ukernel_avx512bf16 with alpha 1, beta 0: the same
// bits), whole 14x32 tiles on 64-byte aligned rows written with streaming stores (the logits chunk
// is larger than the caches: no read for ownership). store_fence() before others read C.
void ukernel_stream_avx512bf16(int64_t kp, const uint32_t* Ap, const uint32_t* Bp, float* C, int64_t ldc, int mr,
                               int nr);
// C[mr, nr] = T[mr, nr] (ld ldt, mr any, nr <= 32): streaming stores where ukernel_stream's would be
// (nr == 32, C's rows 64-byte aligned), else masked stores (the AMX logits tile staged in L1, then out).
void stream_tile_avx512(const float* T, int64_t ldt, float* C, int64_t ldc, int mr, int nr);
void store_fence();

}  // namespace qlora::cpu::lm_head_k
