// Portable NF4 block kernels (the "scalar" and "generic" levels; plain loops the compiler may
// vectorize for the baseline ISA). Rules: see nf4_kernels.hpp.
#include <cfloat>
#include <cmath>
#include <cstring>

#include "nf4/nf4_kernels.hpp"

namespace qlora::nf4::kernels {

namespace {

float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
  uint32_t bits;
  if (exp == 0) {
    float f = static_cast<float>(man) * 0x1p-24f;  // zero or subnormal: exact
    std::memcpy(&bits, &f, 4);
    bits |= sign;
  } else if (exp == 31) {
    bits = sign | 0x7F800000u | (man << 13);  // inf / NaN
  } else {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  }
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

float bf16_to_float(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

// Converts x[start, start+len) to float32 into buf[len].
void load_block(const void* x, int kind, int64_t start, int64_t len, float* buf) {
  if (kind == kSrcF32) {
    std::memcpy(buf, static_cast<const float*>(x) + start, static_cast<size_t>(len) * 4);
  } else {
    const uint16_t* h = static_cast<const uint16_t*>(x) + start;
    if (kind == kSrcF16)
      for (int64_t i = 0; i < len; ++i) buf[i] = half_to_float(h[i]);
    else
      for (int64_t i = 0; i < len; ++i) buf[i] = bf16_to_float(h[i]);
  }
}

inline uint8_t nf4_code(float y, const float* thr) {
  int q = 0;
  for (int k = 0; k < 15; ++k) q += y > thr[k];
  return static_cast<uint8_t>(q);
}

}  // namespace

int64_t quantize_blocks_generic(const void* x, int kind, int64_t n, int64_t bs, int64_t b0, int64_t b1,
                                const float* thr, uint8_t* packed, float* absmax) {
  float buf[4096];  // [bs] one block as float32
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = b * bs, len = n - start < bs ? n - start : bs;
    load_block(x, kind, start, len, buf);
    float m = 0.0f;
    bool bad = false;
    for (int64_t i = 0; i < len; ++i) {
      float a = std::fabs(buf[i]);
      bad |= !(a <= FLT_MAX);  // NaN or inf
      m = a > m ? a : m;
    }
    if (bad) return b;
    absmax[b] = m;
    uint8_t* out = packed + start / 2;
    if (m == 0.0f) {  // all zero: nibble 7 (exact 0.0), not 1/0
      for (int64_t i = 0; i < len; ++i) buf[i] = 0.0f;
    } else {
      float pre = 1.0f, r = 1.0f / m;
      if (r > FLT_MAX) {  // subnormal absmax: scale both sides by 2^64 so the reciprocal is finite
        pre = 0x1p64f;
        r = 1.0f / (m * pre);
      }
      for (int64_t i = 0; i < len; ++i) buf[i] = (buf[i] * pre) * r;
    }
    for (int64_t i = 0; i + 1 < len; i += 2)
      out[i / 2] = static_cast<uint8_t>((nf4_code(buf[i], thr) << 4) | nf4_code(buf[i + 1], thr));
    if (len % 2) out[len / 2] = static_cast<uint8_t>((nf4_code(buf[len - 1], thr) << 4) | 7);
  }
  return -1;
}

void dequantize_blocks_generic(const uint8_t* packed, const float* absmax, int64_t n, int64_t bs, int64_t b0,
                               int64_t b1, const float* codes, float* out) {
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = b * bs, len = n - start < bs ? n - start : bs;
    const float a = absmax[b];
    const uint8_t* p = packed + start / 2;
    float* o = out + start;
    for (int64_t i = 0; i + 1 < len; i += 2) {
      o[i] = codes[p[i / 2] >> 4] * a;
      o[i + 1] = codes[p[i / 2] & 0x0F] * a;
    }
    if (len % 2) o[len - 1] = codes[p[len / 2] >> 4] * a;
  }
}

}  // namespace qlora::nf4::kernels
