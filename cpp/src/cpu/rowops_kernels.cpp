// Dispatch of cpu/rowops_kernels.hpp (level-neutral file).
#include "cpu/rowops_kernels.hpp"

#include "cpu/features.hpp"

namespace qlora::cpu::rowk {

const Kernels* for_level(SimdLevel level) {
#if defined(QLORA_X86)
  if (level == SimdLevel::AVX512) return &kernels_avx512;
  if (level == SimdLevel::AVX2) return &kernels_avx2;
#endif
  (void)level;
  return nullptr;
}

}  // namespace qlora::cpu::rowk
