// The parameters of a Llama-family decoder and the HF tensor names they load from. A tensor
// source (safetensors today; GGUF and pre-quantized bitsandbytes later) hands tensors over one at
// a time by name through load(); the model never sees files.
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "model/config.hpp"
#include "model/linear.hpp"

namespace qlora::model {

struct LayerWeights {
  DeviceBuffer input_norm;  // [D]
  DeviceBuffer post_norm;   // [D]
  Linear q, k, v, o;        // [Hq*hd, D], [Hkv*hd, D], [Hkv*hd, D], [D, Hq*hd]
  Linear gate, up, down;    // [I, D], [I, D], [D, I]
};

struct TensorSpec {
  std::string name;
  std::vector<int64_t> shape;
};

class LlamaWeights {
 public:
  LlamaWeights(Backend& be, const LlamaConfig& cfg, const QuantSpec& quant);
  LlamaWeights(const LlamaWeights&) = delete;  // slots point into this object
  LlamaWeights& operator=(const LlamaWeights&) = delete;

  // Every tensor the model needs, with its HF name and shape (biases included when configured).
  const std::vector<TensorSpec>& expected() const { return expected_; }
  // HF tensors that are accepted and ignored (e.g. lm_head.weight when embeddings are tied).
  bool ignorable(const std::string& name) const;

  // Loads one tensor from host memory. Throws ValueError naming the tensor when the name is
  // unknown, the shape differs, the dtype is unsupported or the data is not finite.
  void load(const std::string& name, const void* data, DType dtype, const std::vector<int64_t>& shape);
  // Loads a pre-quantized NF4 projection weight (host pointers, copied).
  void load_nf4(const std::string& name, const Nf4Ref& host);
  // Loads an fp32 embedding / lm_head in consecutive row slabs data[nrows, cols] starting at row
  // 0, so a loader never holds the whole fp32 tensor next to the engine's copy (peak memory).
  void load_rows(const std::string& name, int64_t row0, int64_t nrows, int64_t ncols, const float* data);
  // Loads the embedding as GGUF Q8_0 rows (Backend::q8_0_gemm_nt layout; host bytes, copied) and
  // keeps it so: a GGUF's token_embd is stored 8-bit (decode streams half the bytes of fp32 as
  // the tied lm_head; the values are the same as their fp32 dequantization).
  void load_embed_q8_0(const uint8_t* data, size_t bytes);
  bool embed_is_q8_0() const { return !embed_q8.empty(); }
  // head_format float32 over a GGUF's tied Q8_0 token_embd whose fp32 table is not made: a training
  // pass reads the Q8_0 rows where it can (LlamaModel::train_pass, TrainShape::f32_from_q8_0).
  bool tied_q8_0_unwidened() const {
    return !head_q8_ && !head_half_ && cfg.tie_word_embeddings && !embed_q8.empty() && embed.empty();
  }
  // fp32 embedding / lm_head for the paths that need it whole (export; a training pass that cannot
  // read the Q8_0 rows: model/lm_loss.hpp lm_cross_entropy_q8_0_as_f32): a Q8_0 embedding is
  // dequantized into `embed` on first use and kept (likewise a Q8_0 lm_head).
  const float* embed_f32();
  const float* lm_head_f32();

  // head_format "q8_0": the embedding and the lm_head are kept on the device as Q8_0 rows
  // (GGUF's 8-bit format, 34 bytes per 32 weights: 3.8x smaller than fp32) and every pass reads
  // them so (embedding gather q8_0_rows, lm_head q8_0_gemm_nt, its backward q8_0_gemm_nn); the fp32
  // copies are freed. Tensors loaded already are converted now (slab by slab through host
  // memory), later loads are quantized on arrival (load_rows: per slab, no fp32 tensor on the
  // device). Irreversible. Off by default (fp32, or a GGUF's Q8_0 embedding dequantized for
  // training as before). ValueError unless hidden_size % 32 == 0 and the backend has the ops.
  void set_head_q8_0();
  bool head_q8_0() const { return head_q8_; }
  // The Q8_0 lm_head rows (tied: the embedding's) or null when the lm_head is not Q8_0.
  const void* lm_head_q8_0() const {
    if (cfg.tie_word_embeddings) return embed_q8.empty() ? nullptr : embed_q8.data();
    return lm_head_q8.empty() ? nullptr : lm_head_q8.data();
  }
  // head_format "f16" / "bf16": the embedding and the lm_head kept on the device as 16-bit rows
  // (IEEE fp16 or bf16, half the bytes of fp32) and read so by every pass (gather half_rows, lm_head
  // half_gemm_nt, its backward half_gemm_nn; fp32 accumulation); the fp32 copies are freed. As
  // set_head_q8_0: tensors loaded already are converted now (through host memory, slab by slab),
  // later loads are rounded on the host on arrival (a matching F16 / BF16 checkpoint tensor is kept
  // as stored). Rounding is to nearest even; a weight beyond fp16's range is a ValueError.
  // Irreversible; ValueError when another head format is set or the backend lacks the ops.
  void set_head_half(Backend::HalfType t);
  bool head_half() const { return head_half_; }
  Backend::HalfType half_type() const { return half_t_; }
  // The 16-bit lm_head rows (tied: the embedding's) or null when the head is not 16-bit.
  const void* lm_head_half() const {
    if (!head_half_) return nullptr;
    return cfg.tie_word_embeddings ? embed_h.data() : lm_head_h.data();
  }
  // Names of expected tensors not loaded yet.
  std::vector<std::string> missing() const;

  // Projection by HF weight name prefix, e.g. "model.layers.0.self_attn.q_proj"; null if none.
  Linear* linear(const std::string& prefix);

  Backend& be;
  LlamaConfig cfg;
  QuantSpec quant;
  DeviceBuffer embed;     // [V, D] (empty while a Q8_0 embedding is not dequantized)
  DeviceBuffer embed_q8;  // Q8_0 [V, D/32 blocks of 34 bytes], or empty
  DeviceBuffer norm;     // [D]
  DeviceBuffer lm_head;  // [V, D] (empty when tied: embed is used, or while a Q8_0 lm_head is not dequantized)
  DeviceBuffer lm_head_q8;  // Q8_0 [V, D/32 blocks of 34 bytes] (head_format q8_0, untied), or empty
  DeviceBuffer embed_h;    // [V, D] fp16 / bf16 (head_format f16 / bf16), or empty
  DeviceBuffer lm_head_h;  // [V, D] fp16 / bf16 (head_format f16 / bf16, untied), or empty
  std::vector<LayerWeights> layers;

  // fp32 lm_head; null when tied to a Q8_0 embedding not dequantized (use lm_head_f32()).
  const float* lm_head_weight() const { return cfg.tie_word_embeddings ? embed.f32() : lm_head.f32(); }

 private:
  enum class Kind { Embed, Norm, LmHead, InNorm, PostNorm, Weight, Bias };
  struct Slot {
    Kind kind;
    int64_t layer;
    Linear* lin;
    std::vector<int64_t> shape;
  };
  std::vector<TensorSpec> expected_;
  std::map<std::string, Slot> slots_;
  std::map<std::string, bool> loaded_;
  std::map<std::string, int64_t> rows_loaded_;  // load_rows progress
  bool head_q8_ = false;                          // set_head_q8_0
  bool head_half_ = false;                        // set_head_half
  Backend::HalfType half_t_ = Backend::HalfType::F16;
  // 16-bit rows of an fp32 [rows, D] buffer (slabs through host memory); fp32 rows of 16-bit ones.
  DeviceBuffer to_half(const DeviceBuffer& f32, int64_t rows, const std::string& name);
  DeviceBuffer widen_half(const DeviceBuffer& h, int64_t rows);
  DeviceBuffer widen_q8_0(const DeviceBuffer& q8, int64_t rows);  // fp32 rows of Q8_0 ones
  // fp32 [rows, D] from `gather` (a row op given ids 0..rows-1), the ids freed after the backend is done.
  DeviceBuffer widen_rows(int64_t rows, const std::function<void(const int32_t* ids, float* out)>& gather);
  // A host tensor [n] of any loadable dtype as this head format's 16-bit values (ValueError naming
  // `name` when a value is not finite or not representable).
  std::vector<uint16_t> host_half(const void* data, DType dtype, int64_t n, int64_t row0, int64_t cols,
                                  const std::string& name) const;
  // Q8_0 rows of an fp32 [rows, D] buffer (slabs through host memory).
  DeviceBuffer quantize_q8_0(const DeviceBuffer& f32, int64_t rows);
  void add(const std::string& name, Kind k, int64_t layer, Linear* lin, std::vector<int64_t> shape);
};

}  // namespace qlora::model
