// NF4 + double quantization codec: sizes, level dispatch, threading and the double-quant pass.
// The per-element work is in the level kernels (nf4_kernels*.cpp).
#include "nf4/nf4_codec.hpp"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "common/error.hpp"
#include "cpu/gemm_scalar.hpp"
#include "cpu/threads.hpp"
#include "nf4/nf4_kernels.hpp"

namespace qlora::nf4 {

namespace {

using QuantizeFn = int64_t (*)(const void*, int, int64_t, int64_t, int64_t, int64_t, const float*, uint8_t*, float*);
using DequantizeFn = void (*)(const uint8_t*, const float*, int64_t, int64_t, int64_t, int64_t, const float*, float*);

QuantizeFn quantize_kernel(cpu::SimdLevel level) {
#ifdef QLORA_X86
  if (level == cpu::SimdLevel::AVX512) return kernels::quantize_blocks_avx512;
  if (level == cpu::SimdLevel::AVX2) return kernels::quantize_blocks_avx2;
#endif
  return kernels::quantize_blocks_generic;
}

DequantizeFn dequantize_kernel(cpu::SimdLevel level) {
#ifdef QLORA_X86
  if (level == cpu::SimdLevel::AVX512) return kernels::dequantize_blocks_avx512;
  if (level == cpu::SimdLevel::AVX2) return kernels::dequantize_blocks_avx2;
#endif
  return kernels::dequantize_blocks_generic;
}

void check_level(cpu::SimdLevel level) {
  check_arg(cpu::simd_level_supported(level),
            std::string("nf4: SIMD level '") + cpu::simd_level_name(level) + "' is not supported on this CPU/build");
}

// NF4 decision thresholds: float32 midpoints of neighbouring codes, as bitsandbytes computes them.
struct Nf4Thresholds {
  float t[16];
  Nf4Thresholds() {
    for (int k = 0; k < 15; ++k) t[k] = (kNf4Codes[k] + kNf4Codes[k + 1]) / 2.0f;
    t[15] = INFINITY;
  }
};
const Nf4Thresholds kThresholds;

// Exact midpoints of the dynamic map (a sum of two floats and a halving are exact in double).
struct MapMidpoints {
  double m[255];
  MapMidpoints() {
    for (int k = 0; k < 255; ++k) m[k] = (static_cast<double>(kDynamicMap[k]) + kDynamicMap[k + 1]) / 2.0;
  }
};
const MapMidpoints kMapMid;

// Nearest dynamic-map entry to y, ties to the lower code: #{midpoints < y}.
uint8_t nearest_map_code(float y) {
  return static_cast<uint8_t>(std::lower_bound(kMapMid.m, kMapMid.m + 255, static_cast<double>(y)) - kMapMid.m);
}

// Neumaier-compensated sum: accurate to about one double ulp whatever the order.
struct Neumaier {
  double s = 0.0, c = 0.0;
  void add(double x) {
    double t = s + x;
    c += std::fabs(s) >= std::fabs(x) ? (s - t) + x : (x - t) + s;
    s = t;
  }
  double value() const { return s + c; }
};

// Double quantization of am[nb] (float32 absmax) into codes[nb], nested[ceil(nb/256)], *offset.
void double_quantize(const float* am, int64_t nb, uint8_t* codes, float* nested, float* offset) {
  const int64_t nn = (nb + kNestedBlocksize - 1) / kNestedBlocksize;
  // offset = mean(absmax): per-nested-block partial sums combined in a fixed order, so the
  // result does not depend on the thread count.
  std::vector<double> part(static_cast<size_t>(nn));  // [nn]
  cpu::parallel_range(nn, 64, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      Neumaier s;
      for (int64_t i = k * kNestedBlocksize, e = std::min(nb, i + kNestedBlocksize); i < e; ++i) s.add(am[i]);
      part[k] = s.value();
    }
  });
  Neumaier total;
  for (double p : part) total.add(p);
  const float off = static_cast<float>(total.value() / static_cast<double>(nb));
  *offset = off;
  cpu::parallel_range(nn, 16, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t i0 = k * kNestedBlocksize, i1 = std::min(nb, i0 + kNestedBlocksize);
      float m = 0.0f;
      for (int64_t i = i0; i < i1; ++i) m = std::max(m, std::fabs(am[i] - off));
      nested[k] = m;
      float pre = 1.0f, r = m == 0.0f ? 0.0f : 1.0f / m;  // m == 0: every v is 0 -> code 127
      if (std::isinf(r)) {  // subnormal nested absmax: same 2^64 rescale as level 1
        pre = 0x1p64f;
        r = 1.0f / (m * pre);
      }
      for (int64_t i = i0; i < i1; ++i) codes[i] = nearest_map_code(((am[i] - off) * pre) * r);
    }
  });
}

#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("fp-contract=off")))  // bitsandbytes rounds the product, then adds
#endif
void decode_absmax_range(const Nf4Ref& W, int64_t b0, int64_t b1, float* out) {
  if (!W.double_quant) {
    std::copy(static_cast<const float*>(W.absmax) + b0, static_cast<const float*>(W.absmax) + b1, out + b0);
    return;
  }
  const uint8_t* codes = static_cast<const uint8_t*>(W.absmax);
  for (int64_t b = b0; b < b1; ++b) {
    float p = W.nested_map[codes[b]] * W.nested_absmax[b / kNestedBlocksize];
    out[b] = p + W.offset;
  }
}

}  // namespace

Sizes sizes(int64_t n, int blocksize, bool double_quant) {
  check_arg(blocksize >= 32 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0,
            "nf4: blocksize must be a power of two in [32, 4096], got " + std::to_string(blocksize));
  check_arg(n >= 1, "nf4: cannot quantize an empty tensor (n = " + std::to_string(n) + ")");
  Sizes s;
  s.packed_bytes = (n + 1) / 2;
  s.n_blocks = (n + blocksize - 1) / blocksize;
  s.n_nested = double_quant ? (s.n_blocks + kNestedBlocksize - 1) / kNestedBlocksize : 0;
  return s;
}

void quantize(const void* x, DType dtype, int64_t n, int blocksize, bool double_quant, uint8_t* packed,
              void* absmax, float* nested_absmax, float* offset) {
  quantize(cpu::active_simd_level(), x, dtype, n, blocksize, double_quant, packed, absmax, nested_absmax, offset);
}

void quantize(cpu::SimdLevel level, const void* x, DType dtype, int64_t n, int blocksize, bool double_quant,
              uint8_t* packed, void* absmax, float* nested_absmax, float* offset) {
  check_level(level);
  const Sizes s = sizes(n, blocksize, double_quant);
  int kind;
  switch (dtype) {
    case DType::F32: kind = kernels::kSrcF32; break;
    case DType::F16: kind = kernels::kSrcF16; break;
    case DType::BF16: kind = kernels::kSrcBF16; break;
    default: throw ValueError(std::string("nf4: cannot quantize dtype ") + dtype_name(dtype) + " (F32, F16 or BF16)");
  }
  check_arg(x && packed && absmax, "nf4: null buffer");
  check_arg(!double_quant || (nested_absmax && offset), "nf4: double quant needs nested_absmax and offset buffers");

  // Pass 1: per-block absmax (float32) and nibbles.
  std::vector<float> am_tmp(double_quant ? static_cast<size_t>(s.n_blocks) : 0);  // [n_blocks]
  float* am = double_quant ? am_tmp.data() : static_cast<float*>(absmax);
  const QuantizeFn fn = quantize_kernel(level);
  const int64_t bs = blocksize;
  auto run = [&](int64_t b0, int64_t b1) {
    int64_t bad = fn(x, kind, n, bs, b0, b1, kThresholds.t, packed, am);
    if (bad >= 0)
      throw ValueError("nf4: cannot quantize NaN or infinity (found in elements [" + std::to_string(bad * bs) +
                       ", " + std::to_string(std::min(n, (bad + 1) * bs)) + "))");
  };
  if (level == cpu::SimdLevel::Scalar)
    run(0, s.n_blocks);
  else
    cpu::parallel_range(s.n_blocks, std::max<int64_t>(1, 16384 / bs), run);

  // Pass 2: double quantization of absmax.
  if (double_quant) double_quantize(am, s.n_blocks, static_cast<uint8_t*>(absmax), nested_absmax, offset);
}

void decode_absmax(const Nf4Ref& W, float* out) { decode_absmax_range(W, 0, W.n_blocks(), out); }

void dequantize(cpu::SimdLevel level, const Nf4Ref& W, float* out) {
  check_level(level);
  sizes(W.numel(), W.blocksize, W.double_quant);
  check_arg(W.packed && W.absmax && (!W.double_quant || (W.nested_absmax && W.nested_map)), "nf4: null buffer");
  const int64_t n = W.numel();
  if (level == cpu::SimdLevel::Scalar) {  // the oracle: element by element
    for (int64_t j = 0; j < n; ++j) out[j] = cpu::scalar::nf4_element(W, j);
    return;
  }
  std::vector<float> am(static_cast<size_t>(W.n_blocks()));  // [n_blocks] decoded absmax
  const DequantizeFn fn = dequantize_kernel(level);
  cpu::parallel_range(W.n_blocks(), std::max<int64_t>(1, 16384 / W.blocksize), [&](int64_t b0, int64_t b1) {
    decode_absmax_range(W, b0, b1, am.data());
    fn(W.packed, am.data(), n, W.blocksize, b0, b1, kNf4Codes, out);
  });
}

}  // namespace qlora::nf4
