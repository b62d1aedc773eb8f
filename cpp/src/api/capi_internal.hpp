// What the C API's translation units share: the model handle and the generate / forward bodies
// that qlora_generate and qlora_context_generate (capi_context.cpp) both run.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <unordered_set>

#include "model/hf_loader.hpp"
#include "model/llama.hpp"
#include "model/lora_setup.hpp"
#include "qlora/qlora.h"

namespace qlora::capi {
// The deleter of a model's own tokenizer (capi_tokenizer.cpp): drops it from the live set first.
void free_model_tokenizer(qlora_tokenizer* tok);
}  // namespace qlora::capi

struct qlora_model {
  std::unique_ptr<qlora::model::LlamaModel> m;
  qlora::model::HfConfig info;
  // Generation and forward run in their own context and take this shared (several threads at
  // once); adapter and training calls, which change adapters and lora_specs, take it exclusive.
  std::shared_mutex mu;
  double train_lr = 0.0;  // qlora_train_configure's default lr
  std::map<std::string, qlora::model::LoraInitSpec> lora_specs;  // adapter name -> its spec (for saving)

  // Handles tied to this model (capi_context.cpp), guarded by handles_mu: the loaded adapters not
  // yet freed (freed with the model), the open contexts (the model's memory waits for them) and
  // whether qlora_model_free has been called.
  std::mutex handles_mu;
  std::unordered_set<qlora_adapter*> adapters;
  int64_t n_contexts = 0;
  bool freed = false;

  // The model's tokenizer (capi_tokenizer.cpp): loaded from `source`, the path given to
  // qlora_model_load, on the first qlora_model_get_tokenizer; freed with the model.
  std::string source;
  std::mutex tokenizer_mu;
  std::unique_ptr<qlora_tokenizer, void (*)(qlora_tokenizer*)> tokenizer{nullptr, qlora::capi::free_model_tokenizer};
};

namespace qlora::capi {

// Live model handles (capi.cpp): made by qlora_model_load and not yet passed to qlora_model_free.
// check_model throws ValueError naming `fn` for NULL or a handle not in the set (a freed or
// foreign pointer would otherwise be dereferenced); is_live_model is the getters' quiet form.
void check_model(const qlora_model* model, const char* fn);
bool is_live_model(const qlora_model* model);

// qlora_model_free's part for the handles: frees the model's adapters, marks it freed and returns
// whether it can be deleted now (no context open; else the last qlora_context_free deletes it).
bool release_model_handles(qlora_model* model);

// The one length rule of the calls that run the model on token positions: `n` positions (`what`,
// e.g. "n_tokens 9") must not exceed n_ctx (<= 0: no bound), else ValueError naming the call and both
// numbers. context: a qlora_context's n_ctx; else the model-level calls' bound model_n_ctx(model),
// max_position_embeddings (Python's default, allow_long_context False; a context runs past it).
void check_positions(const std::string& f, const std::string& what, int64_t n, int64_t n_ctx, bool context);
int64_t model_n_ctx(const qlora_model* model);

// The body of qlora_generate (`uses` null: the model's active adapter) after the caller's checks
// of its handle; `n_ctx` > 0 bounds prompt + max_new_tokens (check_positions; `uses` null: the
// model-level call, n_ctx = model_n_ctx). *n_out counts the tokens produced.
void generate(qlora_model* model, const qlora::model::AdapterSet* uses, int64_t n_ctx, const char* fn,
              const int32_t* prompt, int64_t n_prompt, const qlora_sampling_params* params, int32_t* out_tokens,
              int64_t max_new_tokens, int64_t* n_out, qlora_token_callback cb, void* user);
// The body of qlora_model_forward (`uses` null: the active adapter); n_ctx > 0 bounds n_tokens as above.
void forward(qlora_model* model, const qlora::model::AdapterSet* uses, int64_t n_ctx, const char* fn,
             const int32_t* ids, int64_t n_tokens, float* logits_out);

}  // namespace qlora::capi
