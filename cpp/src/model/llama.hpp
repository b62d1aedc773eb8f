// The Llama-family decoder (Llama, Mistral, Qwen2, SmolLM): forward passes over a KV cache.
// Every op goes through the Backend; buffers live in its memory.
#pragma once
#include <cstdint>
#include <atomic>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <vector>

#include "model/kv_cache.hpp"
#include "model/lora.hpp"
#include "model/merge.hpp"
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

  // A request's adapter set (today: at most one adapter; null = the base model). A request takes
  // it when it starts and keeps it to its end: set_active_adapter changes only what later
  // requests get, and delete_adapter only drops the model's reference (the memory goes when the
  // last request holding it ends). The weights are never modified by adapters.
  using AdapterRef = std::shared_ptr<LoraAdapter>;

  // Logits for every position: ids[B, T], mask[B, T] (host, int32; mask may be null = all ones)
  // -> logits[B, T, V] (host). Uses a temporary cache; the generation cache is untouched. Runs
  // with the adapter active when it is called.
  void forward(const int32_t* ids, const int32_t* mask, int64_t B, int64_t T, float* logits);

  // Generation: start a cache for B rows and `capacity` slots, then feed chunks of T tokens per
  // row (prefill: the left-padded prompts; decode: T = 1). Returns the logits of each row's last
  // slot, logits[B, V] (host). The adapter active at start() is used until stop(). One
  // generation at a time per model (callers serialize start..stop).
  void start(int64_t B, int64_t capacity);
  void feed(const int32_t* ids, const int32_t* mask, int64_t T, float* logits);
  void stop() {
    gen_ = Generation{};
    gen_bytes_ = 0;
  }
  const KvCache* cache() const { return gen_.cache.get(); }

  // ---- LoRA adapters and training (llama_train.cpp). Thread-safe among themselves and with
  // running requests.
  void add_adapter(const std::string& name, std::unique_ptr<LoraAdapter> a);  // ValueError on a duplicate
  AdapterRef adapter(const std::string& name) const;                          // ValueError when unknown
  void set_active_adapter(const std::string& name);                           // "" = none
  std::string active_adapter_name() const;
  AdapterRef active_adapter() const;  // the adapter a request starting now gets (null: none)
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

  // Merges adapter `name` into every projection it adapts (merge.hpp; opt.subtract: unmerges it),
  // all or nothing: the new projections are built first and swapped in at the end. Projections
  // the adapter does not touch are dequantized / rounded too unless they would stay as they are
  // (so an unquantized merge leaves no NF4 projection behind). Merging deactivates the adapter.
  // Refused (ValueError) while a forward, training pass or generation (start..stop) runs: those
  // hold weights_mu_ shared for their duration. progress(layer + 1) after each layer.
  void merge_adapter(const std::string& name, const MergeOptions& opt,
                     const std::function<void(int64_t)>& progress = {});

  // Bytes by category: "nf4_weights", "quant_constants", "other_weights", "kv_cache".
  std::map<std::string, size_t> memory_footprint() const;

 private:
  // Runs the decoder over T new tokens per row into `cache` with adapter `ad` (null: none);
  // writes logits of all rows (logits[B*T, V]) or of each row's last token only (logits[B, V]).
  void run(KvCache& cache, const LoraAdapter* ad, const int32_t* ids, const int32_t* mask, int64_t T, bool all_rows,
           float* logits);

  LossResult train_pass(LoraAdapter* ad, const int32_t* ids, const int32_t* mask, const int32_t* labels, int64_t B,
                        int64_t T, float grad_scale, bool training, bool checkpointing, bool backward);

  struct Generation {
    std::unique_ptr<KvCache> cache;
    AdapterRef adapter;  // taken at start(), kept until stop()
  };

  Backend& be_;
  std::unique_ptr<LlamaWeights> w_;
  DeviceBuffer inv_freq_;  // [head_dim / 2]
  Generation gen_;
  std::atomic<size_t> gen_bytes_{0};  // the generation cache's bytes, for memory_footprint from any thread
  std::shared_mutex weights_mu_;  // shared: a pass reading the weights; unique: merge_adapter
  mutable std::mutex adapters_mu_;  // guards adapters_, active_name_, active_
  std::map<std::string, AdapterRef> adapters_;
  std::string active_name_;  // "" = none
  AdapterRef active_;
};

}  // namespace qlora::model
