// CpuBackend's bf16 inference copies of LoRA factors (backend.hpp lora_bf16_bytes /
// lora_pack_bf16; layout and kernels: cpu/lora_sgmv.hpp, lora_sgmv_bf16_kernels.hpp).
#include "cpu/cpu_backend.hpp"
#include "cpu/lora_sgmv.hpp"

namespace qlora::cpu {

size_t CpuBackend::lora_bf16_bytes(int64_t r, int64_t in, int64_t out) const {
  return lora_bf16_available(level()) ? cpu::lora_bf16_bytes(r, in, out) : 0;
}

void CpuBackend::lora_pack_bf16(int64_t r, int64_t in, int64_t out, const float* A, const float* B, void* dst) {
  cpu::lora_pack_bf16(level(), r, in, out, A, B, dst);  // host memory: packed in place
}

}  // namespace qlora::cpu
