// The Llama-family decoder (Llama, Mistral, Qwen2, SmolLM): forward passes over a KV cache.
// Every op goes through the Backend; buffers live in its memory.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "model/kv_cache.hpp"
#include "model/lora.hpp"
#include "model/weights.hpp"

namespace qlora::model {

class LlamaModel {
 public:
  LlamaModel(Backend& be, const LlamaConfig& cfg, const QuantSpec& quant);

  LlamaWeights& weights() { return *w_; }
  const LlamaConfig& config() const { return w_->cfg; }
  Backend& backend() { return be_; }
  // Throws ValueError listing missing tensors; call once loading is done.
  void check_complete() const;

  // Logits for every position: ids[B, T], mask[B, T] (host, int32; mask may be null = all ones)
  // -> logits[B, T, V] (host). Uses a temporary cache; the generation cache is untouched.
  void forward(const int32_t* ids, const int32_t* mask, int64_t B, int64_t T, float* logits);

  // Generation: start a cache for B rows and `capacity` slots, then feed chunks of T tokens per
  // row (prefill: the left-padded prompts; decode: T = 1). Returns the logits of each row's last
  // slot, logits[B, V] (host).
  void start(int64_t B, int64_t capacity);
  void feed(const int32_t* ids, const int32_t* mask, int64_t T, float* logits);
  void stop() { cache_.reset(); }
  const KvCache* cache() const { return cache_.get(); }

  // ---- LoRA adapters and training (llama_train.cpp)
  void add_adapter(const std::string& name, std::unique_ptr<LoraAdapter> a);  // ValueError on a duplicate
  LoraAdapter& adapter(const std::string& name);                              // ValueError when unknown
  void set_active_adapter(const std::string& name);                           // "" = none
  const std::string& active_adapter_name() const { return active_; }
  void delete_adapter(const std::string& name);
  std::vector<std::string> adapter_names() const;

  struct LossResult {
    double loss_sum = 0.0;        // Σ -log p(label) over counted tokens
    int64_t count = 0;            // tokens with label != -100
    size_t peak_train_bytes = 0;  // peak bytes of the pass's activation / scratch buffers
  };
  // ids/mask/labels [B, T] host int32; labels already shifted (labels[b, t] is the target of
  // position t; -100 = ignored). Accumulates into the active adapter's dA/dB the gradient of
  // grad_scale * loss_sum. training: LoRA dropout on. checkpointing: keep only each layer's
  // input and recompute the layer in the backward.
  LossResult forward_backward(const int32_t* ids, const int32_t* mask, const int32_t* labels, int64_t B, int64_t T,
                              float grad_scale, bool training, bool checkpointing);
  // Loss without gradients or dropout.
  LossResult eval_loss(const int32_t* ids, const int32_t* mask, const int32_t* labels, int64_t B, int64_t T);

  // Bytes by category: "nf4_weights", "quant_constants", "other_weights", "kv_cache".
  std::map<std::string, size_t> memory_footprint() const;

 private:
  // Runs the decoder over T new tokens per row into `cache`; writes logits of all rows
  // (logits[B*T, V]) or of each row's last token only (logits[B, V]).
  void run(KvCache& cache, const int32_t* ids, const int32_t* mask, int64_t T, bool all_rows, float* logits);

  LossResult train_pass(const int32_t* ids, const int32_t* mask, const int32_t* labels, int64_t B, int64_t T,
                        float grad_scale, bool training, bool checkpointing, bool backward);

  Backend& be_;
  std::unique_ptr<LlamaWeights> w_;
  DeviceBuffer inv_freq_;  // [head_dim / 2]
  std::unique_ptr<KvCache> cache_;
  std::map<std::string, std::unique_ptr<LoraAdapter>> adapters_;
  std::string active_;  // "" = none
};

}  // namespace qlora::model
