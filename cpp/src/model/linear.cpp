#include "model/linear.hpp"

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "common/error.hpp"
#include "model/lora.hpp"
#include "nf4/nf4_codec.hpp"

namespace qlora::model {

namespace {

float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: renormalize
      exp = 127 - 15 + 1;
      while (!(mant & 0x400)) mant <<= 1, --exp;
      bits = sign | (exp << 23) | ((mant & 0x3ff) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Host fp32 conversion of x[n]; returns x itself when it already is fp32.
const float* as_f32(const void* x, DType dtype, int64_t n, std::vector<float>& tmp) {
  if (dtype == DType::F32) return static_cast<const float*>(x);
  tmp.resize(n);
  const uint16_t* h = static_cast<const uint16_t*>(x);
  if (dtype == DType::BF16) {
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t bits = static_cast<uint32_t>(h[i]) << 16;
      std::memcpy(&tmp[i], &bits, 4);
    }
  } else if (dtype == DType::F16) {
    for (int64_t i = 0; i < n; ++i) tmp[i] = half_to_float(h[i]);
  } else {
    throw ValueError(std::string("weights must be F32, F16 or BF16, got ") + dtype_name(dtype));
  }
  return tmp.data();
}

DeviceBuffer upload_copy(Backend& be, const void* src, size_t bytes) {
  DeviceBuffer b(be, bytes);
  be.upload(b.data(), src, bytes);
  return b;
}

}  // namespace

DeviceBuffer to_device_f32(Backend& be, const void* x, DType dtype, int64_t n) {
  std::vector<float> tmp;
  const float* f = as_f32(x, dtype, n, tmp);
  for (int64_t i = 0; i < n; ++i)
    check_arg(std::isfinite(f[i]), "weights contain NaN or inf (element " + std::to_string(i) + ")");
  return upload_copy(be, f, sizeof(float) * n);
}

void Linear::set_weight(Backend& be, const void* x, DType dtype, const QuantSpec& spec) {
  const int64_t n = out * in;
  if (!spec.nf4) {
    weight = to_device_f32(be, x, dtype, n);
    is_nf4 = false;
    return;
  }
  check_arg(dtype == DType::F32 || dtype == DType::F16 || dtype == DType::BF16,
            std::string("weights must be F32, F16 or BF16, got ") + dtype_name(dtype));
  const nf4::Sizes sz = nf4::sizes(n, spec.blocksize, spec.double_quant);
  const size_t absmax_bytes = spec.double_quant ? sz.n_blocks : sizeof(float) * sz.n_blocks;
  // Quantize on the host straight from the source view (no fp32 copy), then upload if needed.
  std::vector<uint8_t> h_packed(sz.packed_bytes), h_absmax(absmax_bytes);
  std::vector<float> h_nested(sz.n_nested);
  float offset = 0.0f;
  nf4::quantize(x, dtype, n, spec.blocksize, spec.double_quant, h_packed.data(), h_absmax.data(),
                spec.double_quant ? h_nested.data() : nullptr, spec.double_quant ? &offset : nullptr);
  Nf4Ref ref;
  ref.packed = h_packed.data();
  ref.absmax = h_absmax.data();
  ref.nested_absmax = spec.double_quant ? h_nested.data() : nullptr;
  ref.nested_map = spec.double_quant ? nf4::kDynamicMap : nullptr;
  ref.offset = offset;
  ref.rows = out, ref.cols = in;
  ref.blocksize = spec.blocksize;
  ref.double_quant = spec.double_quant;
  set_nf4(be, ref);
}

void Linear::set_nf4(Backend& be, const Nf4Ref& h) {
  check_arg(h.rows == out && h.cols == in, "NF4 weight shape mismatch");
  const nf4::Sizes sz = nf4::sizes(h.numel(), h.blocksize, h.double_quant);
  packed = upload_copy(be, h.packed, sz.packed_bytes);
  absmax = upload_copy(be, h.absmax, h.double_quant ? sz.n_blocks : sizeof(float) * sz.n_blocks);
  nf4 = Nf4Ref{};
  nf4.packed = packed.data<uint8_t>();
  nf4.absmax = absmax.data();
  if (h.double_quant) {
    nested_absmax = upload_copy(be, h.nested_absmax, sizeof(float) * sz.n_nested);
    nested_map = upload_copy(be, h.nested_map ? h.nested_map : nf4::kDynamicMap, sizeof(float) * 256);
    nf4.nested_absmax = nested_absmax.f32();
    nf4.nested_map = nested_map.f32();
    nf4.offset = h.offset;
  }
  nf4.rows = out, nf4.cols = in;
  nf4.blocksize = h.blocksize;
  nf4.double_quant = h.double_quant;
  weight.reset();
  is_nf4 = true;
}

void Linear::set_bias(Backend& be, const void* x, DType dtype) { bias = to_device_f32(be, x, dtype, out); }

void Linear::forward(Backend& be, int64_t M, const float* x, int64_t ldx, float* y, int64_t ldy,
                     const LoraModule* lora, const float* x_lora, int64_t ld_lora, float* t, float lora_scale,
                     bool bf16) const {
  if (is_nf4 && bf16)
    be.nf4_gemm_nt_bf16(M, 1.0f, x, ldx, nf4, 0.0f, y, ldy);
  else if (bf16)
    be.gemm_nt_bf16(M, out, in, 1.0f, x, ldx, weight.f32(), in, 0.0f, y, ldy);
  else if (is_nf4)
    be.nf4_gemm_nt(M, 1.0f, x, ldx, nf4, 0.0f, y, ldy);
  else
    be.gemm_nt(M, out, in, 1.0f, x, ldx, weight.f32(), in, 0.0f, y, ldy);
  if (!bias.empty()) be.add_bias(M, out, bias.f32(), y, ldy);
  if (lora) {
    if (!x_lora) x_lora = x, ld_lora = ldx;
    lora_forward(be, *lora, M, x_lora, ld_lora, y, ldy, t, lora_scale);
  }
}

void Linear::forward_many(Backend& be, int64_t M, const float* x, int64_t ldx, int n, const Linear* const* lin,
                          float* const* y, const int64_t* ldy, const LoraModule* const* lora, float lora_scale,
                          bool bf16) {
  bool nf4 = !bf16;  // bf16: no grouped bf16 op, one *_bf16 GEMM per projection
  for (int i = 0; i < n; ++i) nf4 = nf4 && lin[i]->is_nf4 && lin[i]->in == lin[0]->in;
  if (!nf4) {
    for (int i = 0; i < n; ++i)
      lin[i]->forward(be, M, x, ldx, y[i], ldy[i], lora ? lora[i] : nullptr, nullptr, 0, nullptr, lora_scale, bf16);
    return;
  }
  std::vector<const Nf4Ref*> w(n);  // [n]
  for (int i = 0; i < n; ++i) w[i] = &lin[i]->nf4;
  be.nf4_gemm_nt_many(M, x, ldx, n, w.data(), y, ldy);
  for (int i = 0; i < n; ++i) {
    const Linear& L = *lin[i];
    if (!L.bias.empty()) be.add_bias(M, L.out, L.bias.f32(), y[i], ldy[i]);
    if (lora && lora[i]) lora_forward(be, *lora[i], M, x, ldx, y[i], ldy[i], nullptr, lora_scale);
  }
}

void Linear::forward_many_lora(Backend& be, int64_t M, const float* x, int64_t ldx, int n, const Linear* const* lin,
                               float* const* y, const int64_t* ldy, const Backend::LoraProblem* lora, float* t,
                               bool bf16) {
  bool fused = true;  // a bias goes between the base and the LoRA terms: not fused
  for (int i = 0; i < n; ++i) fused = fused && lin[i]->is_nf4 && lin[i]->in == lin[0]->in && lin[i]->bias.empty();
  if (fused && n <= 8) {
    const Nf4Ref* w[8];  // no allocation per decode-step call
    for (int i = 0; i < n; ++i) w[i] = &lin[i]->nf4;
    if (bf16)
      be.nf4_gemm_nt_many_lora_bf16(M, x, ldx, n, w, y, ldy, lora, t);
    else
      be.nf4_gemm_nt_many_lora(M, x, ldx, n, w, y, ldy, lora, t);
    return;
  }
  forward_many(be, M, x, ldx, n, lin, y, ldy, nullptr, 1.0f, bf16);
  be.lora_segments_many(n, lora, t);
}

void Linear::backward_input(Backend& be, int64_t M, const float* dy, int64_t lddy, float* dx, int64_t lddx,
                            float beta, bool bf16) const {
  if (is_nf4 && bf16)
    be.nf4_gemm_nn_bf16(M, 1.0f, dy, lddy, nf4, beta, dx, lddx);
  else if (bf16)
    be.gemm_nn_bf16(M, in, out, 1.0f, dy, lddy, weight.f32(), in, beta, dx, lddx);
  else if (is_nf4)
    be.nf4_gemm_nn(M, 1.0f, dy, lddy, nf4, beta, dx, lddx);
  else
    be.gemm_nn(M, in, out, 1.0f, dy, lddy, weight.f32(), in, beta, dx, lddx);
}

size_t Linear::weight_bytes() const { return is_nf4 ? packed.bytes() : weight.bytes(); }
size_t Linear::quant_bytes() const { return absmax.bytes() + nested_absmax.bytes() + nested_map.bytes(); }

}  // namespace qlora::model
