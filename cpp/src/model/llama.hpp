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
#include "model/sampler.hpp"
#include "model/weights.hpp"

namespace qlora::model {

class LlamaModel;

// What a request uses of one adapter: the adapter and its runtime scale (set_adapter_scale),
// taken together when the request starts and kept to its end, so a later scale change or
// reload never reaches a request already running (llama.cpp #10374). ad null: the base model.
struct AdapterUse {
  std::shared_ptr<LoraAdapter> ad;
  float scale = 1.0f;
};
// A request's adapters: one AdapterUse for every row, or one per batch row (a mixed batch: the
// base projections run once for all rows, the LoRA terms per group of rows sharing an adapter).
using AdapterSet = std::vector<AdapterUse>;

// One generation request: its own KV cache and the adapter (and scale) it started with (null: the
// base model), over a model's shared weights. Contexts of one model may be fed from different threads
// at once (the weights are read-only to them); one context is used by one thread at a time.
// While any context is open merge_adapter is refused. A context must be destroyed before its
// model; destroying it frees its cache. Its work runs on its cache's Backend::Exec (CUDA: its own
// stream and memory arena).
class GenerationContext {
 public:
  ~GenerationContext();
  GenerationContext(const GenerationContext&) = delete;
  GenerationContext& operator=(const GenerationContext&) = delete;

  // Feeds T tokens per row (prefill: the left-padded prompts; decode: T = 1); logits[B, V] (host)
  // of each row's last slot.
  void feed(const int32_t* ids, const int32_t* mask, int64_t T, float* logits);
  // Feeds like feed() and picks the next token of rows rows[0, n) where the logits are (the
  // backend's sample_rows: a GPU returns token ids only) into out[n]: s draws one uniform per row
  // when p samples, in row order (the same tokens as feed() + Sampler::sample_rows for a seed).
  // hist[i][0, n_hist[i]): row rows[i]'s prompt + generated tokens (repetition penalty).
  void feed_sample(const int32_t* ids, const int32_t* mask, int64_t T, Sampler& s, const SamplingParams& p,
                   const int32_t* rows, int64_t n, const int32_t* const* hist, const int64_t* n_hist, int32_t* out);
  const KvCache& cache() const { return cache_; }
  int64_t batch() const { return cache_.batch(); }
  const AdapterSet& adapters() const { return uses_; }
  // Whether its passes use the adapters' bf16 inference copies (LlamaModel::adapter_dtype, fixed
  // when the context was created, like its cache dtype).
  bool adapter_bf16() const { return lora_bf16_; }

 private:
  friend class LlamaModel;
  GenerationContext(LlamaModel& m, int64_t B, int64_t capacity, AdapterSet uses);
  LlamaModel& m_;
  KvCache cache_;
  AdapterSet uses_;  // taken at creation, kept to the end
  size_t bytes_ = 0;
  bool lora_bf16_ = false;
};

class LlamaModel {
 public:
  LlamaModel(Backend& be, const LlamaConfig& cfg, const QuantSpec& quant);

  LlamaWeights& weights() { return *w_; }
  const LlamaConfig& config() const { return w_->cfg; }
  Backend& backend() { return be_; }
  // Throws ValueError listing missing tensors; call once loading is done.
  void check_complete() const;

  // A request's adapter set (today: at most one adapter with its scale; null = the base model).
  // A request takes it when it starts and keeps it to its end: set_active_adapter and
  // set_adapter_scale change only what later requests get, and delete_adapter only drops the
  // model's reference (the memory goes when the last request holding it ends). The weights are
  // never modified by adapters.
  using AdapterRef = std::shared_ptr<LoraAdapter>;

  // Logits for every position: ids[B, T], mask[B, T] (host, int32; mask may be null = all ones)
  // -> logits[B, T, V] (host). Uses a temporary cache; the generation cache is untouched. Runs
  // with the adapter active when it is called. Safe to call from several threads at once.
  void forward(const int32_t* ids, const int32_t* mask, int64_t B, int64_t T, float* logits);
  // The same with an explicit adapter and scale (ad null: the base model).
  void forward(const AdapterUse& use, const int32_t* ids, const int32_t* mask, int64_t B, int64_t T, float* logits) {
    forward(AdapterSet{use}, ids, mask, B, T, logits);
  }
  // The same with one adapter per row (uses.size() == B) or one for all (size 1).
  void forward(const AdapterSet& uses, const int32_t* ids, const int32_t* mask, int64_t B, int64_t T, float* logits);

  // A new generation context for B rows and `capacity` slots using adapter `ad` (null: the base
  // model); the overload without it takes the adapter active now. Thread-safe.
  std::unique_ptr<GenerationContext> new_context(int64_t B, int64_t capacity, AdapterUse use) {
    return new_context(B, capacity, AdapterSet{std::move(use)});
  }
  // One adapter per row (uses.size() == B) or one for all (size 1); ValueError otherwise.
  std::unique_ptr<GenerationContext> new_context(int64_t B, int64_t capacity, AdapterSet uses);
  std::unique_ptr<GenerationContext> new_context(int64_t B, int64_t capacity) {
    return new_context(B, capacity, active_use());
  }
  int64_t open_contexts() const { return open_contexts_.load(); }

  // One default context owned by the model (start = new_context, stop = free it), for callers
  // that generate one request at a time; not thread-safe (callers serialize start..stop).
  void start(int64_t B, int64_t capacity);
  void feed(const int32_t* ids, const int32_t* mask, int64_t T, float* logits);
  void stop() { gen_.reset(); }
  const KvCache* cache() const { return gen_ ? &gen_->cache() : nullptr; }

  // ---- LoRA adapters and training (llama_train.cpp). Thread-safe among themselves and with
  // running requests.
  void add_adapter(const std::string& name, std::unique_ptr<LoraAdapter> a);  // ValueError on a duplicate
  AdapterRef adapter(const std::string& name) const;                          // ValueError when unknown
  void set_active_adapter(const std::string& name);                           // "" = none
  std::string active_adapter_name() const;
  AdapterRef active_adapter() const;  // the adapter a request starting now gets (null: none)
  // The adapter and scale a request starting now gets (active_use) or that adapter `name` gets
  // (use; ValueError when unknown), read together under one lock.
  AdapterUse active_use() const;
  AdapterUse use(const std::string& name) const;
  // One AdapterUse per name ("__base__": none), all read under one lock (a mixed batch's snapshot).
  AdapterSet uses(const std::vector<std::string>& names) const;
  // Runtime scale of adapter `name` (default 1; 0: contributes nothing): multiplies its LoRA term
  // in every later request, training passes included (PEFT's set_scale). Not saved with the
  // adapter; merge_adapter merges the scaled term (PEFT). ValueError for an unknown name, a scale
  // that is not a finite float, or one that takes the update past the factor bound (lora_check.hpp).
  void set_adapter_scale(const std::string& name, double scale);
  float adapter_scale(const std::string& name) const;
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
  // input and recompute the layer in the backward. activation_budget (activation_memory_budget,
  // 0..1, with checkpointing): the last layers that keep their intermediates instead
  // (train_memory.hpp TrainShape); same bits at every budget.
  LossResult forward_backward(const int32_t* ids, const int32_t* mask, const int32_t* labels, int64_t B, int64_t T,
                              float grad_scale, bool training, bool checkpointing, double activation_budget = 0.0);
  // Loss without gradients or dropout.
  LossResult eval_loss(const int32_t* ids, const int32_t* mask, const int32_t* labels, int64_t B, int64_t T);

  // Merges adapter `name` into every projection it adapts (merge.hpp; opt.subtract: unmerges it),
  // all or nothing: the new projections are built first and swapped in at the end. Projections
  // the adapter does not touch are dequantized / rounded too unless they would stay as they are
  // (so an unquantized merge leaves no NF4 projection behind). Merging deactivates the adapter.
  // Refused (ValueError) while a forward or training pass runs (they hold weights_mu_ shared for
  // their duration) or any generation context is open (open_contexts_, counted under weights_mu_
  // shared; checked here under the exclusive lock). progress(layer + 1) after each layer.
  void merge_adapter(const std::string& name, const MergeOptions& opt,
                     const std::function<void(int64_t)>& progress = {});

  // compute_dtype of every pass (forward, generation, forward_backward, eval_loss): false = float32
  // (the parity mode; the default on the CPU); true = bfloat16 (the default where
  // Backend::default_compute_bf16, CUDA sm_80+): base projections and the lm_head in bf16 compute
  // (operands rounded to bf16, fp32 accumulation; LoRA factors, gradients and optimizer state stay
  // fp32) and, for forward and generation, the KV cache in bf16. Backends without bf16 units keep
  // computing in fp32: compute_bf16() is then false. Passes already running, and generation
  // contexts already open, keep the mode (and cache dtype) they started with.
  void set_compute_bf16(bool on) { want_bf16_.store(on); }
  bool compute_bf16_requested() const { return want_bf16_.load(); }
  bool compute_bf16() const { return want_bf16_.load() && be_.has_bf16_compute(); }

  // adapter_dtype of the inference passes (forward, generation; training never): Auto (default)
  // holds LoRA factors for them in bf16 when the pass computes in bf16 (compute_bf16), F32 never,
  // BF16 always. bf16 = the adapters' bf16 inference copies (lora_infer.hpp; the fp32 factors stay
  // the masters), used only where the backend has bf16 LoRA kernels (CPU: AVX512-BF16), else fp32.
  // Contexts already open keep what they started with.
  enum class AdapterDtype : int { Auto = 0, F32 = 1, BF16 = 2 };
  void set_adapter_dtype(AdapterDtype d) { adapter_dtype_.store(static_cast<int>(d)); }
  AdapterDtype adapter_dtype() const { return static_cast<AdapterDtype>(adapter_dtype_.load()); }
  // Whether a pass computing in bf16 (or not) that starts now uses the bf16 copies.
  bool adapter_bf16(bool compute_bf16) const;

  // Gradient checkpointing with the checkpointed layer inputs offloaded to host memory (Unsloth's
  // long-context trick): the forward copies each layer's input out (CUDA: to pinned memory,
  // queued on the stream) and the backward copies it back before recomputing the layer, so the
  // device holds two [tokens, hidden] inputs instead of one per layer. Results are bit-identical
  // to plain checkpointing (exact copies). Off by default; no effect without checkpointing.
  void set_offload_checkpoints(bool on) { offload_ckpt_.store(on); }
  bool offload_checkpoints() const { return offload_ckpt_.load(); }

  // head_format "q8_0" (LlamaWeights::set_head_q8_0): embedding and lm_head kept and read as Q8_0.
  // Refused (ValueError) while a generation context is open; waits for running passes.
  void set_head_q8_0();
  // head_format "f16" / "bf16" (LlamaWeights::set_head_half): embedding and lm_head kept as 16-bit rows.
  void set_head_half(Backend::HalfType t);

  // Bytes by category: "nf4_weights", "quant_constants", "other_weights", "kv_cache".
  std::map<std::string, size_t> memory_footprint() const;

 private:
  // Runs the decoder over T new tokens per row into `cache` with adapter `ad` (null: none);
  // writes logits of all rows (logits[B*T, V]) or of each row's last token only (logits[B, V]).
  // With `sample` the last slot's logits stay in backend memory and are sampled there instead.
  struct SampleRequest {
    const SamplingParams* p;
    const int32_t* rows;
    int64_t n;
    const int32_t* const* hist;
    const int64_t* n_hist;
    const double* u;
    int32_t* out;
  };
  // lora_bf16: the LoRA terms from the adapters' bf16 inference copies (adapter_bf16).
  void run(KvCache& cache, const AdapterSet& uses, const int32_t* ids, const int32_t* mask, int64_t T, bool all_rows,
           float* logits, const SampleRequest* sample = nullptr, bool lora_bf16 = false);

  LossResult train_pass(LoraAdapter* ad, float scale, const int32_t* ids, const int32_t* mask, const int32_t* labels, int64_t B,
                        int64_t T, float grad_scale, bool training, bool checkpointing, bool backward,
                        double activation_budget = 0.0);

  friend class GenerationContext;
  Backend& be_;
  std::unique_ptr<LlamaWeights> w_;
  DeviceBuffer inv_freq_;  // [head_dim / 2]
  std::unique_ptr<GenerationContext> gen_;  // the default context of start/feed/stop
  std::atomic<int64_t> open_contexts_{0};  // contexts alive (merge is refused while > 0)
  std::atomic<bool> want_bf16_{false};  // set_compute_bf16
  std::atomic<int> adapter_dtype_{0};   // set_adapter_dtype (AdapterDtype)
  std::atomic<bool> offload_ckpt_{false};  // set_offload_checkpoints
  // The offload staging (Backend::host_alloc: pinned on CUDA, slow to allocate) kept between
  // passes; a pass takes it under offload_mu_ and puts it back (concurrent passes get their own).
  // Not redundant with HostStagingPool: the plain CPU backend's host_alloc is malloc with no pool,
  // so without this each pass would allocate (and page-fault in) the whole staging again.
  class OffloadStage;  // llama_train.cpp
  std::mutex offload_mu_;
  std::shared_ptr<void> offload_host_;
  size_t offload_host_bytes_ = 0;
  float merged_scale_ = 1.0f;  // runtime scale the merged adapter was merged with (unmerge subtracts it)
  std::atomic<size_t> ctx_bytes_{0};       // their KV caches' bytes, for memory_footprint from any thread
  std::shared_mutex weights_mu_;  // shared: a pass reading the weights; unique: merge_adapter
  mutable std::mutex adapters_mu_;  // guards adapters_, scales_, active_name_, active_
  std::map<std::string, AdapterRef> adapters_;
  std::map<std::string, float> scales_;  // runtime scale per loaded adapter
  std::string active_name_;  // "" = none
  AdapterRef active_;
};

}  // namespace qlora::model
