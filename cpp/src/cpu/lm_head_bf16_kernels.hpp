// Kernel of cpu/lm_head_bf16.cpp (declarations only: included by its AVX512-BF16 TU, cpu/README.md).
#pragma once
#include <cstdint>

namespace qlora::cpu::lm_head_k {

// One NN B panel (32 columns 2 pd0 .. 2 pd0 + 31 of E, k = rows in pairs: out[pv * 32 + c] =
// {E[2pv, 2pd0 + c], E[2pv + 1, 2pd0 + c]}, pv < np <= 16) from one NT panel Q of 32 rows of E
// (Q[pd * 32 + v] = {E[v, 2pd], E[v, 2pd + 1]}, pd < kpd; columns from pair kpd on read as zero).
// Q and out 64-byte aligned.
void nt_to_nn_panel_avx512(const uint32_t* Q, int64_t kpd, int64_t pd0, int np, uint32_t* out);

}  // namespace qlora::cpu::lm_head_k
