// Device-side NF4 decoding shared by the NF4 kernels (bitsandbytes layout, see
// shared/reference/nf4-format.md): W[j] = code[nibble_j] * absmax[j >> log2(blocksize)], with
// absmax[b] = map[code_b] * nested_absmax[b >> 8] + offset under double quantization.
// Include only from .cu files.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "tensor_types.hpp"

namespace qlora::cuda {

// Kernel-parameter view of an Nf4Ref (all pointers are device memory).
struct Nf4Dev {
  const uint8_t* packed;        // [(n+1)/2]
  const void* absmax;           // uint8 [n_blocks] (double quant) or float [n_blocks]
  const float* nested_absmax;   // [ceil(n_blocks/256)] (double quant)
  const float* nested_map;      // [256] (double quant), global memory: any map the caller uploaded
  float offset;
  int64_t rows, cols, n;        // n = rows * cols
  int log2_bs;                  // blocksize = 1 << log2_bs (power of two, >= 32)
  bool double_quant;
};

inline Nf4Dev make_nf4_dev(const Nf4Ref& W) {
  Nf4Dev d{};
  d.packed = W.packed;
  d.absmax = W.absmax;
  d.nested_absmax = W.nested_absmax;
  d.nested_map = W.nested_map;
  d.offset = W.offset;
  d.rows = W.rows;
  d.cols = W.cols;
  d.n = W.numel();
  int l = 0;
  while ((1 << l) < W.blocksize) ++l;
  d.log2_bs = l;
  d.double_quant = W.double_quant;
  return d;
}

// Shared-memory lookup table: [0, 16) NF4 codes, [16, 272) the nested map (double quant only).
constexpr int kNf4LutSize = 16 + 256;

// Internal linkage: every .cu (compiled without -rdc) gets its own copy.
static __constant__ float kNf4CodesDev[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

// Fills lut (shared, kNf4LutSize floats) with the whole block; the caller must __syncthreads().
__device__ __forceinline__ void nf4_fill_lut(const Nf4Dev& w, float* lut) {
  for (int i = threadIdx.x; i < 16; i += blockDim.x) lut[i] = kNf4CodesDev[i];
  if (w.double_quant)
    for (int i = threadIdx.x; i < 256; i += blockDim.x) lut[16 + i] = __ldg(w.nested_map + i);
}

// Scale of quantization block b.
__device__ __forceinline__ float nf4_block_scale(const Nf4Dev& w, const float* lut, int64_t b) {
  if (!w.double_quant) return __ldg(static_cast<const float*>(w.absmax) + b);
  const unsigned char code = __ldg(static_cast<const unsigned char*>(w.absmax) + b);
  return lut[16 + code] * __ldg(w.nested_absmax + (b >> 8)) + w.offset;
}

// Nibble of element j (the first element of a byte is the high nibble).
__device__ __forceinline__ int nf4_nibble(unsigned char byte, int64_t j) { return (j & 1) ? (byte & 15) : (byte >> 4); }

// Element j (flat row-major index) of W, dequantized.
__device__ __forceinline__ float nf4_element(const Nf4Dev& w, const float* lut, int64_t j) {
  const unsigned char byte = __ldg(w.packed + (j >> 1));
  return lut[nf4_nibble(byte, j)] * nf4_block_scale(w, lut, j >> w.log2_bs);
}

}  // namespace qlora::cuda
