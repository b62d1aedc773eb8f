// The real-tile backend of the AMX kernels' tile interface (cpu/amx_tiles.hpp documents it; EmulatedTiles
// there is its plain-C++ twin): ldtilecfg, tilezero, tileloadd, tilestored, tdpbf16ps, tilerelease through
// the intrinsics. Included only by the *_amx.cpp files (compiled with -mamx-tile -mamx-bf16; cpu/README.md):
// internal linkage, each TU keeps its own copy. The intrinsics take literal tile numbers (GCC pastes them
// into the asm), hence the if constexpr chains. Tiles: C 0..3, A 4..5, B 6..7; the attention kernels also
// load C tiles (accumulating into fp32 sums in memory).
#pragma once
#include <immintrin.h>

#include <cstdint>

#include "cpu/amx_tiles.hpp"

namespace qlora::cpu::amx {
namespace {

struct AmxTiles {
  static void config(const TileConfig* c) {
    // GCC does not model ldtilecfg's 64-byte read: without the barrier it dropped the rows / colsb
    // stores of a config built just before (only palette_id was written; tile ops then #UD).
    __asm__ __volatile__("" : : "r"(c) : "memory");
    _tile_loadconfig(c);
  }
  static void release() { _tile_release(); }
  template <int T>
  static void zero() {
    static_assert(T >= 0 && T < 4, "C tiles only");
    if constexpr (T == 0) _tile_zero(0);
    else if constexpr (T == 1) _tile_zero(1);
    else if constexpr (T == 2) _tile_zero(2);
    else _tile_zero(3);
  }
  template <int T>
  static void load(const void* p, int64_t stride) {
    static_assert(T >= 0 && T < 8, "tiles 0..7");
    // GCC's tileloadd asm declares no memory read either: without the barrier it may sink the stores
    // of tiles staged just before (the kernel's zero-padded ragged chunk on the stack) past the load.
    __asm__ __volatile__("" : : "r"(p) : "memory");
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
    static_assert(T >= 0 && T < 4, "C tiles only");
    if constexpr (T == 0) _tile_stored(0, p, stride);
    else if constexpr (T == 1) _tile_stored(1, p, stride);
    else if constexpr (T == 2) _tile_stored(2, p, stride);
    else _tile_stored(3, p, stride);
  }
  template <int Cd, int A, int B>
  static void dp() {
    if constexpr (Cd == 0 && A == 4 && B == 6) _tile_dpbf16ps(0, 4, 6);
    else if constexpr (Cd == 1 && A == 4 && B == 7) _tile_dpbf16ps(1, 4, 7);
    else if constexpr (Cd == 2 && A == 5 && B == 6) _tile_dpbf16ps(2, 5, 6);
    else if constexpr (Cd == 3 && A == 5 && B == 7) _tile_dpbf16ps(3, 5, 7);
    else static_assert(Cd < 0, "tile triple not used by the kernels");
  }
  static float fma(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
};

}  // namespace
}  // namespace qlora::cpu::amx
