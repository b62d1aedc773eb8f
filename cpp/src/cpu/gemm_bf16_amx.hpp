// AMX-BF16 micro-kernel of the bf16-compute GEMM (cpu/gemm_bf16.cpp's driver): declarations only.
// The kernel (gemm_bf16_amx_body.hpp) is one source compiled twice: with the AMX intrinsics
// (gemm_bf16_amx.cpp, -mamx-tile -mamx-bf16, only where the compiler has them: QLORA_AMX_KERNEL) and
// on emulated tiles (gemm_bf16_amx_emu.cpp, plain C++ following the Intel SDM), so the driver's AMX path
// (A re-layout, 2 x 2 tiles, ragged edges) runs and is tested on CPUs without AMX (QLORA_AMX=emulate).
// The B panels are the AVX512-BF16 kernel's; the driver's A panels have 16 rows, packed straight in the
// AMX layout from row-major A (pack_a_rows_amx), else packed as usual, then re-laid (relayout_a).
#pragma once
#include <cstdint>

namespace qlora::cpu::bf16_amx {

enum class Kernel : int { Avx512Bf16 = 0, Amx = 1, AmxEmulated = 2 };

// AMX kernel compiled in, CPU has AMX-BF16 (+ AMX-TILE) at the avx512 level, and the OS granted the
// tile state (Linux: arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)). Detected once.
bool amx_usable();
// The micro-kernel the bf16 GEMMs run (QLORA_AMX, read per call: "0" = AVX512-BF16, "emulate" = the AMX
// kernel on emulated tiles (slow; tests), anything else / unset = AMX where amx_usable()).
Kernel kernel_choice();
const char* kernel_name(Kernel k);  // "avx512-bf16", "amx-bf16", "amx-bf16-emulated"

// Rows of the driver's AMX A panels (ukernel16): whole 16-row tiles.
constexpr int kMR16 = 16;

// In place: one A panel [kp][rows] (pairs of k outer, as the bf16_k packers write it; rows <= 16) to
// the AMX layout: per chunk c of 16 pairs, w = min(16, kp - 16c) pairs:
// dst[16c * rows + i * w + q] = src[(16c + q) * rows + i]. Same size (kp * rows words).
void relayout_a(uint32_t* panel, int64_t kp, int rows);
// One AMX A panel of `rows` (<= 16) rows straight from n <= rows rows of a row-major fp32 [*, kc]
// source (k along a row): the values of pack_rows_avx512bf16(W = rows) + relayout_a, without either
// (gemm_bf16_amx_pack_avx512bf16.cpp; needs AVX512-BF16).
void pack_a_rows_amx(const float* src, int64_t ld, int n, int64_t kc, int rows, uint32_t* P);

// C[mr, nr] = alpha * A·B + beta * C (gemm_bf16_amx_body.hpp): mr <= 32 rows from one or two
// consecutive re-laid 16-row A panels (panel 1 at Ap + kp * 16), one B panel; k == Kernel::Amx only if
// amx_usable(), k == Kernel::AmxEmulated anywhere.
void ukernel16(Kernel k, int64_t kp, const uint32_t* Ap, const uint32_t* Bp, float* C, int64_t ldc, float alpha,
               float beta, int mr, int nr);

// Holds this thread's tiles configured for ukernel16() from construction to destruction (one ldtilecfg /
// tilerelease per driver task, not per call). ukernel16() outside one configures the tiles itself,
// then releases them. No-op for Kernel::Avx512Bf16 or inside an open scope. Nothing else may use the
// tiles on this thread while it is open.
class TileScope {
 public:
  explicit TileScope(Kernel k);
  ~TileScope();
  TileScope(const TileScope&) = delete;
  TileScope& operator=(const TileScope&) = delete;

 private:
  Kernel k_;
  bool open_ = false;
};

// The two compilations (called through ukernel16()).
void ukernel16_amx(int64_t kp, const uint32_t* Ap, const uint32_t* Bp, float* C, int64_t ldc, float alpha,
                   float beta, int mr, int nr);
void ukernel16_amx_emulated(int64_t kp, const uint32_t* Ap, const uint32_t* Bp, float* C, int64_t ldc, float alpha,
                            float beta, int mr, int nr);
bool scope_begin_amx();  // true: opened (close with scope_end_amx)
void scope_end_amx();
bool scope_begin_amx_emulated();
void scope_end_amx_emulated();

}  // namespace qlora::cpu::bf16_amx
