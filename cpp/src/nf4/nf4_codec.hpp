// NF4 quantization with double quantization, byte-compatible with bitsandbytes
// (shared/reference/nf4-format.md). Placeholder interface; the NF4 codec work owns this file.
#pragma once
#include <cstdint>

#include "cpu/features.hpp"
#include "tensor_types.hpp"

namespace qlora::nf4 {

// out[W.rows * W.cols] = dequantized W (float32).
void dequantize(cpu::SimdLevel level, const Nf4Ref& W, float* out);

}  // namespace qlora::nf4
