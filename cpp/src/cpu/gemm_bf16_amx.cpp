// The AMX-BF16 micro-kernel on the real tiles (gemm_bf16_amx_body.hpp with AmxTiles): ldtilecfg,
// tileloadd, tdpbf16ps, tilestored. Compiled with -mamx-tile -mamx-bf16 (CMake: *_amx.cpp, only where the
// compiler accepts them; QLORA_AMX_KERNEL then set); called only after bf16_amx::amx_usable().
// Rules: cpu/README.md. The tile backend (AmxTiles): cpu/amx_tiles_real.hpp.
#include <immintrin.h>

#include <cstddef>
#include <cstdint>
#include <cstring>

#define AMX_TILES_NO_EMULATION 1
#include "cpu/gemm_bf16_amx.hpp"
#include "cpu/amx_tiles_real.hpp"
#include "cpu/gemm_bf16_amx_body.hpp"

namespace qlora::cpu::bf16_amx {

void ukernel16_amx(int64_t kp, const uint32_t* Ap, const uint32_t* Bp, float* C, int64_t ldc, float alpha,
                    float beta, int mr, int nr) {
  amx::ukernel<amx::AmxTiles>(kp, Ap, Bp, C, ldc, alpha, beta, mr, nr);
}
bool scope_begin_amx() { return amx::scope_begin<amx::AmxTiles>(); }
void scope_end_amx() { amx::scope_end<amx::AmxTiles>(); }

}  // namespace qlora::cpu::bf16_amx
