// GGUF dequantization, one block at a time. Each formula follows the layout of ggml's block
// structs (ggml-common.h) and the evaluation order of the gguf package's dequantize_blocks, so
// results are bit-identical: e.g. Q4_K computes (d * sc) * q - (dmin * m), rounding each product.
#include "gguf/dequant.hpp"

#include <cstring>
#include <string>

#include "common/error.hpp"
#include "io/gguf_read.hpp"

// a * b + c must round the product before the sum, as numpy does: no FMA contraction.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace qlora::gguf {

float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  const uint32_t exp = (h >> 10) & 0x1F;
  uint32_t mant = h & 0x3FF;
  uint32_t bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (mant << 13);  // inf, or NaN with its payload
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;
  } else {  // subnormal half: normalize
    int e = -1;
    do {
      ++e;
      mant <<= 1;
    } while (!(mant & 0x400));
    bits = sign | (static_cast<uint32_t>(112 - e) << 23) | ((mant & 0x3FF) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

namespace {

inline float f16_at(const uint8_t* p) { return half_to_float(static_cast<uint16_t>(p[0] | (p[1] << 8))); }

// Q4_K / Q5_K: 8 six-bit scales and mins packed in 12 bytes (gguf Q4_K.get_scale_min).
inline void scale_min_k4(const uint8_t* s, uint8_t sc[8], uint8_t mn[8]) {
  for (int j = 0; j < 4; ++j) {
    sc[j] = s[j] & 0x3F;
    mn[j] = s[4 + j] & 0x3F;
    sc[4 + j] = (s[8 + j] & 0x0F) | ((s[j] >> 2) & 0x30);
    mn[4 + j] = (s[8 + j] >> 4) | ((s[4 + j] >> 2) & 0x30);
  }
}

void q4_0(const uint8_t* b, float* y) {  // d f16, qs[16]
  const float d = f16_at(b);
  for (int j = 0; j < 16; ++j) {
    y[j] = d * static_cast<float>((b[2 + j] & 0x0F) - 8);
    y[j + 16] = d * static_cast<float>((b[2 + j] >> 4) - 8);
  }
}

void q4_1(const uint8_t* b, float* y) {  // d f16, m f16, qs[16]
  const float d = f16_at(b), m = f16_at(b + 2);
  for (int j = 0; j < 16; ++j) {
    y[j] = d * static_cast<float>(b[4 + j] & 0x0F) + m;
    y[j + 16] = d * static_cast<float>(b[4 + j] >> 4) + m;
  }
}

void q5_0(const uint8_t* b, float* y) {  // d f16, qh u32, qs[16]
  const float d = f16_at(b);
  const uint32_t qh = uint32_t(b[2]) | uint32_t(b[3]) << 8 | uint32_t(b[4]) << 16 | uint32_t(b[5]) << 24;
  for (int j = 0; j < 16; ++j) {
    const int lo = (b[6 + j] & 0x0F) | (((qh >> j) & 1) << 4);
    const int hi = (b[6 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
    y[j] = d * static_cast<float>(lo - 16);
    y[j + 16] = d * static_cast<float>(hi - 16);
  }
}

void q5_1(const uint8_t* b, float* y) {  // d f16, m f16, qh u32, qs[16]
  const float d = f16_at(b), m = f16_at(b + 2);
  const uint32_t qh = uint32_t(b[4]) | uint32_t(b[5]) << 8 | uint32_t(b[6]) << 16 | uint32_t(b[7]) << 24;
  for (int j = 0; j < 16; ++j) {
    const int lo = (b[8 + j] & 0x0F) | (((qh >> j) & 1) << 4);
    const int hi = (b[8 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
    y[j] = d * static_cast<float>(lo) + m;
    y[j + 16] = d * static_cast<float>(hi) + m;
  }
}

void q8_0(const uint8_t* b, float* y) {  // d f16, qs[32] int8
  const float d = f16_at(b);
  for (int j = 0; j < 32; ++j) y[j] = static_cast<float>(static_cast<int8_t>(b[2 + j])) * d;
}

void q4_k(const uint8_t* b, float* y) {  // d, dmin f16, scales[12], qs[128]
  const float d = f16_at(b), dmin = f16_at(b + 2);
  uint8_t sc[8], mn[8];
  scale_min_k4(b + 4, sc, mn);
  const uint8_t* qs = b + 16;
  for (int j = 0; j < 8; ++j) {  // sub-block j: nibble j % 2 of bytes [32 * (j / 2), +32)
    const float dl = d * static_cast<float>(sc[j]), ml = dmin * static_cast<float>(mn[j]);
    const uint8_t* q = qs + 32 * (j / 2);
    const int shift = 4 * (j % 2);
    for (int l = 0; l < 32; ++l) y[32 * j + l] = dl * static_cast<float>((q[l] >> shift) & 0x0F) - ml;
  }
}

void q5_k(const uint8_t* b, float* y) {  // d, dmin f16, scales[12], qh[32], qs[128]
  const float d = f16_at(b), dmin = f16_at(b + 2);
  uint8_t sc[8], mn[8];
  scale_min_k4(b + 4, sc, mn);
  const uint8_t* qh = b + 16;
  const uint8_t* qs = b + 48;
  for (int j = 0; j < 8; ++j) {  // high bit of sub-block j: bit j of qh[l]
    const float dl = d * static_cast<float>(sc[j]), ml = dmin * static_cast<float>(mn[j]);
    const uint8_t* q = qs + 32 * (j / 2);
    const int shift = 4 * (j % 2);
    for (int l = 0; l < 32; ++l) {
      const int v = ((q[l] >> shift) & 0x0F) | (((qh[l] >> j) & 1) << 4);
      y[32 * j + l] = dl * static_cast<float>(v) - ml;
    }
  }
}

void q6_k(const uint8_t* b, float* y) {  // ql[128], qh[64], scales[16] int8, d f16
  const uint8_t* ql = b;
  const uint8_t* qh = b + 128;
  const int8_t* scales = reinterpret_cast<const int8_t*>(b + 192);
  const float d = f16_at(b + 208);
  float ds[16];
  for (int k = 0; k < 16; ++k) ds[k] = d * static_cast<float>(scales[k]);
  for (int e = 0; e < 256; ++e) {
    const int half = e / 128, r = e % 128;
    const int lo = (ql[64 * half + r % 64] >> (4 * (r / 64))) & 0x0F;
    const int hi = (qh[32 * half + r % 32] >> (2 * (r / 32))) & 0x03;
    y[e] = ds[e / 16] * static_cast<float>(static_cast<int8_t>(lo | (hi << 4)) - 32);
  }
}

}  // namespace

bool dequant_supported(uint32_t type) {
  switch (static_cast<GType>(type)) {
    case GType::F32: case GType::F16: case GType::BF16: case GType::Q4_0: case GType::Q4_1: case GType::Q5_0:
    case GType::Q5_1: case GType::Q8_0: case GType::Q4_K: case GType::Q5_K: case GType::Q6_K: return true;
    default: return false;
  }
}

void dequantize(uint32_t type, const uint8_t* src, float* dst, int64_t n) {
  int64_t block = 0, size = 0;
  check_arg(dequant_supported(type) && gtype_traits(type, &block, &size),
            "cannot dequantize GGUF type " + gtype_name(type));
  check_arg(n >= 0 && n % block == 0, "dequantize: " + std::to_string(n) + " values are not whole " +
                                          gtype_name(type) + " blocks of " + std::to_string(block));
  void (*fn)(const uint8_t*, float*) = nullptr;
  switch (static_cast<GType>(type)) {
    case GType::F32: std::memcpy(dst, src, sizeof(float) * static_cast<size_t>(n)); return;
    case GType::F16:
      for (int64_t i = 0; i < n; ++i) dst[i] = f16_at(src + 2 * i);
      return;
    case GType::BF16:
      for (int64_t i = 0; i < n; ++i) {
        const uint32_t bits = static_cast<uint32_t>(src[2 * i] | (src[2 * i + 1] << 8)) << 16;
        std::memcpy(dst + i, &bits, 4);
      }
      return;
    case GType::Q4_0: fn = q4_0; break;
    case GType::Q4_1: fn = q4_1; break;
    case GType::Q5_0: fn = q5_0; break;
    case GType::Q5_1: fn = q5_1; break;
    case GType::Q8_0: fn = q8_0; break;
    case GType::Q4_K: fn = q4_k; break;
    case GType::Q5_K: fn = q5_k; break;
    case GType::Q6_K: fn = q6_k; break;
    default: return;
  }
  for (int64_t k = 0; k < n / block; ++k) fn(src + k * size, dst + k * block);
}

}  // namespace qlora::gguf
