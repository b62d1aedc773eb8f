// The attention's AMX-BF16 kernels (attention_amx_body.hpp) on the real tiles: ldtilecfg, tileloadd,
// tdpbf16ps, tilestored. Compiled with -mamx-tile -mamx-bf16 (CMake: *_amx.cpp, only where the compiler
// accepts them; QLORA_AMX_KERNEL then set on attention_amx_select.cpp); called only after
// bf16_amx::amx_usable(). Rules: cpu/README.md. The tile backend: cpu/amx_tiles_real.hpp.
#include <immintrin.h>

#include <cstdint>

#define AMX_TILES_NO_EMULATION 1
#include "cpu/attention_amx.hpp"
#include "cpu/attention_amx_body.hpp"
#include "cpu/amx_tiles_real.hpp"

namespace qlora::cpu::attn_amx {
void rows_amx(int64_t kp, const uint32_t* A, int64_t lda, int mr, const uint32_t* Bp, int64_t bstride, int64_t ncols,
              float* C, int64_t ldc) {
  rows_kernel<amx::AmxTiles>(kp, A, lda, mr, Bp, bstride, ncols, C, ldc);
}

void acc_t_amx(int64_t kp, const uint32_t* At, int64_t lda, int64_t m, const uint32_t* Bk, int64_t ldb, int64_t ncols,
               float* Ct, int64_t ldc, int64_t q0) {
  acc_t_kernel<amx::AmxTiles>(kp, At, lda, m, Bk, ldb, ncols, Ct, ldc, q0);
}

}  // namespace qlora::cpu::attn_amx
