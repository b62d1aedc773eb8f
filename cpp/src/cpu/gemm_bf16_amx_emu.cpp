// The AMX-BF16 micro-kernel on emulated tiles (gemm_bf16_amx_body.hpp with amx::EmulatedTiles: plain
// C++ following the Intel SDM pseudo-code): the same kernel source as gemm_bf16_amx.cpp, level-neutral,
// so the driver's AMX path runs on any CPU (QLORA_AMX=emulate; slow, for tests).
#include "cpu/amx_tiles.hpp"
#include "cpu/gemm_bf16_amx.hpp"
#include "cpu/gemm_bf16_amx_body.hpp"

namespace qlora::cpu::bf16_amx {

void ukernel16_amx_emulated(int64_t kp, const uint32_t* Ap, const uint32_t* Bp, float* C, int64_t ldc, float alpha,
                    float beta, int mr, int nr) {
  amx::ukernel<amx::EmulatedTiles>(kp, Ap, Bp, C, ldc, alpha, beta, mr, nr);
}
bool scope_begin_amx_emulated() { return amx::scope_begin<amx::EmulatedTiles>(); }
void scope_end_amx_emulated() { amx::scope_end<amx::EmulatedTiles>(); }

}  // namespace qlora::cpu::bf16_amx
