// NF4 quantization with double quantization, byte-compatible with bitsandbytes
// (shared/reference/nf4-format.md).
#pragma once
#include <cstdint>

#include "cpu/features.hpp"
#include "tensor_types.hpp"

namespace qlora::nf4 {

// bitsandbytes' signed dynamic 8-bit map (shared/reference/dynamic-map-256.txt), float32 [256].
extern const float kDynamicMap[256];

struct Sizes {
  int64_t packed_bytes;  // (n + 1) / 2
  int64_t n_blocks;      // ceil(n / blocksize)
  int64_t n_nested;      // ceil(n_blocks / 256) (double quant), else 0
};
// Throws ValueError unless blocksize is a power of two in [32, 4096] and n >= 1.
Sizes sizes(int64_t n, int blocksize, bool double_quant);

// Quantizes x[n] (dtype F32, F16 or BF16, contiguous) into the caller's buffers:
//   packed[(n+1)/2]; absmax: uint8 codes [n_blocks] when double_quant, else float [n_blocks];
//   nested_absmax[n_nested] and *offset when double_quant (ignored otherwise, may be null).
// Throws ValueError on NaN/inf input. Parallel and SIMD (active level).
void quantize(const void* x, DType dtype, int64_t n, int blocksize, bool double_quant, uint8_t* packed,
              void* absmax, float* nested_absmax, float* offset);

// out[W.rows * W.cols] = dequantized W (float32).
void dequantize(cpu::SimdLevel level, const Nf4Ref& W, float* out);

}  // namespace qlora::nf4
