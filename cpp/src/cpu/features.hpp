// CPU SIMD levels and run-time dispatch. Kernels are compiled once per level (files named
// *_avx2.cpp / *_avx512.cpp get the flags) and the best level the running CPU supports is
// chosen at run time, so one wheel runs on any x86-64 (and non-x86 builds use generic).
#pragma once
#include <string>
#include <vector>

namespace qlora::cpu {

enum class SimdLevel : int {
  Scalar = 0,   // simple, unoptimized reference kernels (single thread): the oracle for tests
  Generic = 1,  // blocked + threaded portable C++ (compiler-vectorized for the baseline ISA)
  AVX2 = 2,     // AVX2 + FMA (+F16C)
  AVX512 = 3,   // AVX-512 F/BW/VL/DQ
};

const char* simd_level_name(SimdLevel level);
SimdLevel simd_level_from_name(const std::string& name);  // throws ValueError on unknown names
bool simd_level_supported(SimdLevel level);               // by the running CPU and this build
SimdLevel best_simd_level();                              // best supported (env QLORA_SIMD caps it)
std::vector<SimdLevel> supported_simd_levels();           // ascending, Scalar first

// The level used by default for every kernel; settable for tests and benchmarks.
SimdLevel active_simd_level();
void set_active_simd_level(SimdLevel level);  // throws ValueError if unsupported

// bf16 compute units (compute_dtype="bfloat16"), by the running CPU and this build, and only while
// the AVX-512 level is allowed (QLORA_SIMD below avx512 turns them off too).
bool cpu_has_avx512_bf16();  // AVX512-BF16: vcvtne2ps2bf16 / vdpbf16ps (Zen 4+, Cooper Lake, Sapphire Rapids+)
bool cpu_has_amx_bf16();     // AMX-TILE + AMX-BF16 (Sapphire Rapids+): the bf16 GEMM's AMX kernel (gemm_bf16_amx.hpp)
// The OS lets this process use the AMX tile data (Linux >= 5.16: arch_prctl(ARCH_REQ_XCOMP_PERM,
// XFEATURE_XTILEDATA), requested once, process-wide; false elsewhere or when refused).
bool amx_tile_data_permitted();

}  // namespace qlora::cpu
