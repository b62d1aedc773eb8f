// Data cache sizes of the running CPU, for the GEMM blocking and the GEMV chunking (instead of
// constants tuned on one host). Linux sysfs first, then cpuid (leaf 4 on Intel, 0x8000001D on
// AMD), then conservative defaults; QLORA_CACHE_SIZES="l1d=32K,l2=1M,l3=32M" overrides (any
// subset; K/M/G suffixes), e.g. to reproduce another machine's blocking.
#pragma once
#include <cstdint>
#include <string>

namespace qlora::cpu {

struct CacheSizes {
  int64_t l1d = 32 << 10;  // bytes, per core
  int64_t l2 = 1 << 20;    // bytes, per core (private L2; a shared L2 is divided by its sharers)
  int64_t l3 = 8 << 20;    // bytes, the last-level cache core 0 sees (shared by its sharers)
  int l3_sharing = 1;      // logical CPUs sharing that L3
  int64_t line = 64;
  std::string source = "default";  // "sysfs", "cpuid", "default", and "+env" when overridden
};

const CacheSizes& cache_sizes();  // detected once

// Parses sysfs under `root` (normally /sys/devices/system/cpu/cpu0/cache); false if absent.
bool cache_sizes_from_sysfs(const std::string& root, CacheSizes& out);
// Applies a QLORA_CACHE_SIZES-style override; throws ValueError naming a bad entry.
void apply_cache_override(const std::string& spec, CacheSizes& out);

}  // namespace qlora::cpu
