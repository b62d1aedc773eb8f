// One frozen projection y = x·Wᵀ (+ b) of a transformer layer: W[out, in] is either NF4
// (bitsandbytes layout, dequantized inside the GEMM) or fp32. The weights are immutable and
// shared by every request: a LoRA module is passed to each call (the request's adapter), never
// stored here, so switching or deleting an adapter cannot change a pass already running.
#pragma once
#include <cstdint>
#include <string>

#include "model/buffer.hpp"
#include "tensor_types.hpp"

namespace qlora::model {

// head_format at construction (LlamaWeights applies it before any tensor loads, so the embedding /
// lm_head never exist in fp32 on the device; a loader may hand over matching 16-bit bytes as stored).
enum class HeadFormat { F32, Q8_0, F16, BF16 };

struct QuantSpec {
  bool nf4 = false;  // false: keep fp32
  int blocksize = 64;
  bool double_quant = true;
  HeadFormat head = HeadFormat::F32;
};

struct LoraModule;

struct Linear {
  int64_t out = 0, in = 0;
  bool is_nf4 = false;
  // NF4: owned storage, viewed by `nf4` (pointers into the backend's memory).
  DeviceBuffer packed;         // uint8 [(out*in+1)/2]
  DeviceBuffer absmax;         // uint8 [n_blocks] (double quant) or float [n_blocks]
  DeviceBuffer nested_absmax;  // float [ceil(n_blocks/256)] (double quant)
  DeviceBuffer nested_map;     // float [256] (double quant)
  Nf4Ref nf4;
  DeviceBuffer weight;  // fp32 [out, in] when !is_nf4
  DeviceBuffer bias;    // fp32 [out], optional

  bool loaded() const { return is_nf4 ? !packed.empty() : !weight.empty(); }

  // Sets W from host data x[out*in] of dtype F32/F16/BF16, quantizing to NF4 if spec.nf4.
  void set_weight(Backend& be, const void* x, DType dtype, const QuantSpec& spec);
  // Sets W from an already-quantized NF4 weight (host pointers; copied). For pre-quantized checkpoints.
  void set_nf4(Backend& be, const Nf4Ref& host);
  void set_bias(Backend& be, const void* x, DType dtype);

  // y[M, out] (row stride ldy) = x[M, in] (row stride ldx) · Wᵀ (+ bias) (+ the LoRA branch of
  // `lora` (null: none), fed x_lora[M, in] (row stride ld_lora; null: x) with t[M, r] scratch
  // (null: allocated)), times the request's adapter scale lora_scale). bf16: the base GEMM in bf16
  // compute (Backend::*_bf16; the LoRA branch stays fp32).
  void forward(Backend& be, int64_t M, const float* x, int64_t ldx, float* y, int64_t ldy,
               const LoraModule* lora = nullptr, const float* x_lora = nullptr, int64_t ld_lora = 0,
               float* t = nullptr, float lora_scale = 1.0f, bool bf16 = false) const;
  // forward() of n projections sharing the input x (q/k/v, gate/up): NF4 bases run as one
  // nf4_gemm_nt_many (one job at decode), then each adds its bias and LoRA branch lora[i]
  // (lora null, or lora[i] null: none) times lora_scale. bf16: each base in bf16 compute (one
  // *_bf16 GEMM per projection).
  static void forward_many(Backend& be, int64_t M, const float* x, int64_t ldx, int n, const Linear* const* lin,
                           float* const* y, const int64_t* ldy, const LoraModule* const* lora = nullptr,
                           float lora_scale = 1.0f, bool bf16 = false);
  // The inference form of forward_many: base outputs, then the LoRA terms lora[i] of output i
  // (Backend::LoraProblem over x and y[i]; lora[i].n == 0: none), as one
  // Backend::nf4_gemm_nt_many_lora call (bf16: nf4_gemm_nt_many_lora_bf16) when the bases are NF4
  // without bias (the CPU runs a decode step's as one thread-pool job), else forward_many +
  // lora_segments_many. t: their scratch. bf16: the bases in bf16 compute, the LoRA terms as
  // lora_segments_many computes them (fp32 factors or the segments' bf16 copies).
  static void forward_many_lora(Backend& be, int64_t M, const float* x, int64_t ldx, int n, const Linear* const* lin,
                                float* const* y, const int64_t* ldy, const Backend::LoraProblem* lora, float* t,
                                bool bf16 = false);
  // Base part of the input gradient: dx[M, in] = dy[M, out]·W + beta * dx (W frozen, never fp32 for NF4).
  void backward_input(Backend& be, int64_t M, const float* dy, int64_t lddy, float* dx, int64_t lddx,
                      float beta, bool bf16 = false) const;

  size_t weight_bytes() const;  // packed nibbles (NF4) or fp32 weight
  size_t quant_bytes() const;   // absmax + nested + map
  size_t bias_bytes() const { return bias.bytes(); }
};

// Copies host x[n] of dtype F32/F16/BF16 into a new fp32 buffer of the backend.
DeviceBuffer to_device_f32(Backend& be, const void* x, DType dtype, int64_t n);

}  // namespace qlora::model
