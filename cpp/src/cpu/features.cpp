#include "cpu/features.hpp"

#include <atomic>
#include <cstdlib>

#include "common/error.hpp"

#if defined(QLORA_X86) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace qlora::cpu {

namespace {

bool cpu_has(SimdLevel level) {
#if defined(QLORA_X86) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  switch (level) {
    case SimdLevel::Scalar:
    case SimdLevel::Generic:
      return true;
    case SimdLevel::AVX2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("f16c");
    case SimdLevel::AVX512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
             cpu_has(SimdLevel::AVX2);
  }
  return false;
#else
  return level == SimdLevel::Scalar || level == SimdLevel::Generic;
#endif
}

SimdLevel detect_best() {
  SimdLevel best = SimdLevel::Generic;
  for (SimdLevel l : {SimdLevel::AVX2, SimdLevel::AVX512})
    if (cpu_has(l)) best = l;
  // QLORA_SIMD=generic|avx2|avx512 caps the level (e.g. to test a wheel's fallback path).
  if (const char* env = std::getenv("QLORA_SIMD")) {
    try {
      SimdLevel cap = simd_level_from_name(env);
      if (static_cast<int>(cap) < static_cast<int>(best)) best = cap;
    } catch (const ValueError&) {
      // Unknown names are ignored rather than failing at import.
    }
  }
  return best;
}

std::atomic<int> g_active{-1};

}  // namespace

const char* simd_level_name(SimdLevel level) {
  switch (level) {
    case SimdLevel::Scalar: return "scalar";
    case SimdLevel::Generic: return "generic";
    case SimdLevel::AVX2: return "avx2";
    case SimdLevel::AVX512: return "avx512";
  }
  return "?";
}

SimdLevel simd_level_from_name(const std::string& name) {
  for (SimdLevel l : {SimdLevel::Scalar, SimdLevel::Generic, SimdLevel::AVX2, SimdLevel::AVX512})
    if (name == simd_level_name(l)) return l;
  throw ValueError("unknown SIMD level '" + name + "' (expected scalar, generic, avx2 or avx512)");
}

SimdLevel best_simd_level() {
  static const SimdLevel best = detect_best();
  return best;
}

bool simd_level_supported(SimdLevel level) {
  return static_cast<int>(level) <= static_cast<int>(best_simd_level());
}

std::vector<SimdLevel> supported_simd_levels() {
  std::vector<SimdLevel> out;
  for (SimdLevel l : {SimdLevel::Scalar, SimdLevel::Generic, SimdLevel::AVX2, SimdLevel::AVX512})
    if (simd_level_supported(l)) out.push_back(l);
  return out;
}

SimdLevel active_simd_level() {
  int v = g_active.load(std::memory_order_relaxed);
  return v < 0 ? best_simd_level() : static_cast<SimdLevel>(v);
}

bool cpu_has_avx512_bf16() {
#if defined(QLORA_X86) && (defined(__GNUC__) || defined(__clang__)) && (defined(__clang__) || __GNUC__ >= 10)
  static const bool has = simd_level_supported(SimdLevel::AVX512) && __builtin_cpu_supports("avx512bf16");
  return has;
#else
  return false;
#endif
}

bool cpu_has_amx_bf16() {
#if defined(QLORA_X86) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
  static const bool has = simd_level_supported(SimdLevel::AVX512) && __builtin_cpu_supports("amx-tile") &&
                          __builtin_cpu_supports("amx-bf16");
  return has;
#else
  return false;
#endif
}

bool amx_tile_data_permitted() {
#if defined(QLORA_X86) && defined(__linux__)
  // Linux keeps the 8 KiB tile state off until a process asks (a tile instruction before that
  // faults: SIGILL). ARCH_REQ_XCOMP_PERM = 0x1023, ARCH_GET_XCOMP_PERM = 0x1022, XFEATURE_XTILEDATA = 18.
  static const bool ok = [] {
    constexpr long kReq = 0x1023, kGet = 0x1022, kXtiledata = 18;
    if (syscall(SYS_arch_prctl, kReq, kXtiledata) != 0) return false;
    unsigned long mask = 0;
    return syscall(SYS_arch_prctl, kGet, &mask) == 0 && (mask & (1ul << kXtiledata)) != 0;
  }();
  return ok;
#else
  return false;
#endif
}

void set_active_simd_level(SimdLevel level) {
  check_arg(simd_level_supported(level),
            std::string("SIMD level '") + simd_level_name(level) + "' is not supported by this CPU");
  g_active.store(static_cast<int>(level), std::memory_order_relaxed);
}

}  // namespace qlora::cpu
