// NF4 quantization with double quantization, byte-compatible with bitsandbytes
// (shared/reference/nf4-format.md).
#pragma once
#include <cstdint>

#include "cpu/features.hpp"
#include "tensor_types.hpp"

namespace qlora::nf4 {

// bitsandbytes' signed dynamic 8-bit map (shared/reference/dynamic-map-256.txt), float32 [256].
extern const float kDynamicMap[256];

// Double quantization quantizes absmax in nested blocks of this many blocks.
constexpr int64_t kNestedBlocksize = 256;

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
// Rules (bitsandbytes' where it defines them):
//   level 1: y = x * (1.0f / absmax) in float32; nibble = #{float32 midpoints t of the NF4 codes :
//            y > t} (a tie goes to the LOWER code); an all-zero block emits nibble 7, and so does
//            the pad nibble after an odd final element (bitsandbytes pads with 0.0).
//            Extension: when 1/absmax overflows (absmax < ~2.9e-39) both sides are first scaled
//            by 2^64, so subnormal blocks keep their resolution (bitsandbytes CPU clamps absmax
//            to 1e-38 in the scale and so rounds such blocks to ~0).
//   level 2: offset = float32(compensated double mean of absmax); v = absmax - offset (float32);
//            nested_absmax = max |v| per nested block; code = nearest map entry to
//            y = v * (1.0f / nested_absmax), compared exactly (double midpoints), ties to the
//            LOWER code (bitsandbytes CUDA: binary search; CPU: a lookup table, off by one step on
//            ~0.1% of codes). A zero nested absmax gives code 127 (0.0).
void quantize(const void* x, DType dtype, int64_t n, int blocksize, bool double_quant, uint8_t* packed,
              void* absmax, float* nested_absmax, float* offset);
// The same at an explicit SIMD level (Scalar runs the portable kernel on one thread); throws
// ValueError if the level is unsupported.
void quantize(cpu::SimdLevel level, const void* x, DType dtype, int64_t n, int blocksize, bool double_quant,
              uint8_t* packed, void* absmax, float* nested_absmax, float* offset);

// out[W.n_blocks()] = the decoded float32 absmax of every block
// (double quant: nested_map[code] * nested_absmax[b / 256] + offset, two float32 roundings, no FMA).
void decode_absmax(const Nf4Ref& W, float* out);

// out[W.rows * W.cols] = dequantized W (float32).
void dequantize(cpu::SimdLevel level, const Nf4Ref& W, float* out);

}  // namespace qlora::nf4
