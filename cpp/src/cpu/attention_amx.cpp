// The attention's AMX-BF16 kernels (attention_amx_body.hpp) on the real tiles: ldtilecfg, tileloadd,
// tdpbf16ps, tilestored. Compiled with -mamx-tile -mamx-bf16 (CMake: *_amx.cpp, only where the compiler
// accepts them; QLORA_AMX_KERNEL then set on attention_amx_select.cpp); called only after
// bf16_amx::amx_usable(). Rules: cpu/README.md. The intrinsics take literal tile numbers.
#include <immintrin.h>

#include <cstdint>

#define AMX_TILES_NO_EMULATION 1
#include "cpu/attention_amx.hpp"
#include "cpu/attention_amx_body.hpp"

namespace qlora::cpu::attn_amx {
namespace {

struct RealTiles {
  static void config(const TileConfig* c) { _tile_loadconfig(c); }
  static void release() { _tile_release(); }
  template <int T>
  static void zero() {
    if constexpr (T == 0) _tile_zero(0);
    else if constexpr (T == 1) _tile_zero(1);
    else if constexpr (T == 2) _tile_zero(2);
    else if constexpr (T == 3) _tile_zero(3);
    else static_assert(T < 0, "C tiles only");
  }
  template <int T>
  static void load(const void* p, int64_t stride) {
    if constexpr (T == 0) _tile_loadd(0, p, stride);
    else if constexpr (T == 1) _tile_loadd(1, p, stride);
    else if constexpr (T == 2) _tile_loadd(2, p, stride);
    else if constexpr (T == 3) _tile_loadd(3, p, stride);
    else if constexpr (T == 4) _tile_loadd(4, p, stride);
    else if constexpr (T == 5) _tile_loadd(5, p, stride);
    else if constexpr (T == 6) _tile_loadd(6, p, stride);
    else _tile_loadd(7, p, stride);
  }
  template <int T>
  static void store(void* p, int64_t stride) {
    if constexpr (T == 0) _tile_stored(0, p, stride);
    else if constexpr (T == 1) _tile_stored(1, p, stride);
    else if constexpr (T == 2) _tile_stored(2, p, stride);
    else if constexpr (T == 3) _tile_stored(3, p, stride);
    else static_assert(T < 0, "C tiles only");
  }
  template <int Cd, int A, int B>
  static void dp() {
    if constexpr (Cd == 0 && A == 4 && B == 6) _tile_dpbf16ps(0, 4, 6);
    else if constexpr (Cd == 1 && A == 4 && B == 7) _tile_dpbf16ps(1, 4, 7);
    else if constexpr (Cd == 2 && A == 5 && B == 6) _tile_dpbf16ps(2, 5, 6);
    else if constexpr (Cd == 3 && A == 5 && B == 7) _tile_dpbf16ps(3, 5, 7);
    else static_assert(Cd < 0, "tile triple not used by the kernels");
  }
};

}  // namespace

void rows_amx(int64_t kp, const uint32_t* A, int64_t lda, int mr, const uint32_t* Bp, int64_t bstride, int64_t ncols,
              float* C, int64_t ldc) {
  rows_kernel<RealTiles>(kp, A, lda, mr, Bp, bstride, ncols, C, ldc);
}

void acc_t_amx(int64_t kp, const uint32_t* At, int64_t lda, int64_t m, const uint32_t* Bk, int64_t ldb, int64_t ncols,
               float* Ct, int64_t ldc, int64_t q0) {
  acc_t_kernel<RealTiles>(kp, At, lda, m, Bk, ldb, ncols, Ct, ldc, q0);
}

}  // namespace qlora::cpu::attn_amx
