// The C API (cpp/include/qlora/qlora.h) over the engine: hf_loader for loading, LlamaModel for
// forward / KV-cache generation, Sampler for token choice (the same steps as
// python/qlora_native/model.py's generate with one row).
#include <climits>
#include <cmath>
#include <map>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <unordered_set>
#include <vector>

#include "api/capi_error.hpp"
#include "api/capi_handles.hpp"
#include "api/capi_internal.hpp"
#include "backend.hpp"
#include "common/error.hpp"
#include "cpu/threads.hpp"
#include "model/sampler.hpp"

namespace {
using qlora::check_arg;
using qlora::capi::guard;
using qlora::capi::set_error;

int32_t to_i32(int64_t v) { return v > INT32_MAX ? INT32_MAX : static_cast<int32_t>(v); }

// Live model handles: a call on a freed model (or a double free) is an error, not a crash
qlora::capi::LiveHandles<qlora_model> g_models;

void check_ids(const int32_t* ids, int64_t n, int64_t V, const char* what) {
  for (int64_t i = 0; i < n; ++i)
    check_arg(ids[i] >= 0 && ids[i] < V, std::string(what) + ": token id " + std::to_string(ids[i]) + " at index " +
                                             std::to_string(i) + " is out of range [0, " + std::to_string(V) + ")");
}
}  // namespace

namespace qlora::capi {

bool is_live_model(const qlora_model* model) {
  return g_models.live(model);
}

void check_model(const qlora_model* model, const char* fn) {
  check_arg(model != nullptr, std::string(fn) + ": model is NULL");
  check_arg(is_live_model(model), std::string(fn) + ": model is not a live qlora_model (freed, or not made by qlora_model_load)");
}

int64_t model_n_ctx(const qlora_model* model) { return model->info.cfg.max_position_embeddings; }

void check_positions(const std::string& f, const std::string& what, int64_t n, int64_t n_ctx, bool context) {
  if (n_ctx <= 0 || n <= n_ctx) return;
  throw ValueError(f + ": " + what + " exceeds " +
                   (context ? "the context's n_ctx " + std::to_string(n_ctx)
                            : "the model's max_position_embeddings " + std::to_string(n_ctx) +
                                  " (a qlora_context with a larger n_ctx runs past it; quality degrades)"));
}

void forward(qlora_model* model, const qlora::model::AdapterSet* uses, int64_t n_ctx, const char* fn,
             const int32_t* ids, int64_t n_tokens, float* logits_out) {
  const std::string f(fn);
  check_arg(n_tokens >= 1 && n_tokens <= INT32_MAX, f + ": n_tokens must be in [1, 2^31), got " + std::to_string(n_tokens));
  check_arg(ids != nullptr && logits_out != nullptr, f + ": ids and logits_out must not be NULL");
  check_positions(f, "n_tokens " + std::to_string(n_tokens), n_tokens, n_ctx, uses != nullptr);
  check_ids(ids, n_tokens, model->info.cfg.vocab_size, fn);
  std::shared_lock<std::shared_mutex> lock(model->mu);
  if (uses)
    model->m->forward(*uses, ids, nullptr, 1, n_tokens, logits_out);  // logits_out [n_tokens, V]
  else
    model->m->forward(ids, nullptr, 1, n_tokens, logits_out);
}

void generate(qlora_model* model, const qlora::model::AdapterSet* uses, int64_t n_ctx, const char* fn,
              const int32_t* prompt, int64_t n_prompt, const qlora_sampling_params* params, int32_t* out_tokens,
              int64_t max_new_tokens, int64_t* n_out, qlora_token_callback cb, void* user) {
  const std::string f(fn);
  check_arg(prompt != nullptr && n_prompt >= 1, f + ": the prompt must hold at least one token");
  check_arg(max_new_tokens >= 0, f + ": max_new_tokens must be >= 0, got " + std::to_string(max_new_tokens));
  check_arg(max_new_tokens == 0 || out_tokens != nullptr, f + ": out_tokens is NULL");
  check_arg(n_prompt <= INT32_MAX && max_new_tokens <= INT32_MAX - n_prompt,
            f + ": prompt + max_new_tokens must stay below 2^31 tokens");
  check_positions(f, "prompt (" + std::to_string(n_prompt) + ") + max_new_tokens (" + std::to_string(max_new_tokens) + ")",
                  n_prompt + max_new_tokens, n_ctx, uses != nullptr);
  const qlora_sampling_params p = params ? *params : qlora_sampling_default_params();
  check_arg(p.n_stop_ids >= 0, f + ": n_stop_ids must be >= 0, got " + std::to_string(p.n_stop_ids));
  check_arg(p.n_stop_ids == 0 || p.stop_ids != nullptr, f + ": stop_ids is NULL but n_stop_ids > 0");
  const int64_t V = model->info.cfg.vocab_size;
  check_ids(prompt, n_prompt, V, (f + ": prompt").c_str());
  // a stop id outside the vocabulary can never be produced: a typo would silently never stop
  // (Python's generate refuses such an eos_token_id alike)
  check_ids(p.stop_ids, p.n_stop_ids, V, (f + ": stop_ids").c_str());
  qlora::model::SamplingParams sp;
  sp.temperature = p.temperature;
  sp.top_k = p.top_k;
  sp.top_p = p.top_p;
  sp.repetition_penalty = p.repetition_penalty;
  sp.validate();  // before any compute
  if (max_new_tokens == 0) return;

  std::shared_lock<std::shared_mutex> lock(model->mu);
  qlora::model::LlamaModel& m = *model->m;
  qlora::model::Sampler sampler(p.seed);
  // Model.generate (Python) validates with one sample of a 1-token row, which takes a draw
  // when sampling; doing the same keeps a seed's tokens identical in C and Python.
  float one = 0.0f;
  sampler.sample(&one, 1, nullptr, 0, sp);
  std::vector<int32_t> history(prompt, prompt + n_prompt);  // prompt + generated (repetition penalty)
  // This call's own context (freed on every exit path): calls from several threads run at once.
  const auto ctx = uses ? m.new_context(1, n_prompt + max_new_tokens, *uses) : m.new_context(1, n_prompt + max_new_tokens);
  // Feeds ids and picks the next token where the logits are (a GPU returns the id only).
  int32_t tok = 0;
  auto feed_sample = [&](const int32_t* ids, int64_t T) {
    const int32_t row = 0;
    const int32_t* h = history.data();
    const int64_t nh = static_cast<int64_t>(history.size());
    ctx->feed_sample(ids, nullptr, T, sampler, sp, &row, 1, &h, &nh, &tok);
  };
  feed_sample(prompt, n_prompt);
  for (int64_t step = 0; step < max_new_tokens; ++step) {
    out_tokens[step] = tok;
    history.push_back(tok);
    if (n_out) *n_out = step + 1;
    bool done = cb != nullptr && cb(tok, user) != 0;
    for (int64_t i = 0; i < p.n_stop_ids && !done; ++i) done = p.stop_ids[i] == tok;
    if (done || step == max_new_tokens - 1) break;
    const int32_t fed = tok;
    feed_sample(&fed, 1);
  }
}

}  // namespace qlora::capi

extern "C" {

QLORA_API qlora_model_params qlora_model_default_params(void) {
  qlora_model_params p;
  p.quantize = QLORA_QUANT_NF4;
  p.blocksize = 64;
  p.double_quant = 1;
  p.backend = "cpu";
  p.n_threads = 0;
  return p;
}

QLORA_API qlora_sampling_params qlora_sampling_default_params(void) {
  qlora_sampling_params p;
  p.temperature = 0.0f;
  p.top_k = 0;
  p.top_p = 1.0f;
  p.repetition_penalty = 1.0f;
  p.seed = 0;
  p.stop_ids = nullptr;
  p.n_stop_ids = 0;
  return p;
}

QLORA_API qlora_model* qlora_model_load(const char* path, const qlora_model_params* params) {
  qlora_model* out = nullptr;
  guard([&] {
    check_arg(path != nullptr && *path, "qlora_model_load: path is NULL or empty");
    const qlora_model_params p = params ? *params : qlora_model_default_params();
    check_arg(p.quantize == QLORA_QUANT_NONE || p.quantize == QLORA_QUANT_NF4,
              "qlora_model_load: quantize must be QLORA_QUANT_NONE or QLORA_QUANT_NF4, got " +
                  std::to_string(p.quantize));
    check_arg(p.n_threads >= 0, "qlora_model_load: n_threads must be >= 0, got " + std::to_string(p.n_threads));
    if (p.n_threads > 0) qlora::cpu::set_num_threads(p.n_threads);
    qlora::Backend& be = qlora::get_backend(p.backend ? p.backend : "cpu");
    qlora::model::QuantSpec q{p.quantize == QLORA_QUANT_NF4, p.blocksize, p.double_quant != 0};
    auto h = std::make_unique<qlora_model>();
    h->source = path;  // for qlora_model_get_tokenizer
    h->m = qlora::model::load_model_from_path(path, be, q, &h->info);  // HF directory or GGUF file
    g_models.add(h.get());
    out = h.release();
    return QLORA_OK;
  });
  return out;
}

QLORA_API void qlora_model_free(qlora_model* model) {
  // Frees the adapters not freed yet; with contexts still open the model itself is deleted by
  // the last qlora_context_free (they fail every call meanwhile).
  if (!model) return;
  if (!g_models.remove(model)) {
    set_error(QLORA_ERR_INVALID_ARGUMENT, "qlora_model_free: not a live qlora_model (already freed)");
    return;
  }
  if (qlora::capi::release_model_handles(model)) delete model;
}

using qlora::capi::is_live_model;
QLORA_API int32_t qlora_model_n_vocab(const qlora_model* m) { return is_live_model(m) ? to_i32(m->info.cfg.vocab_size) : -1; }
QLORA_API int32_t qlora_model_n_embd(const qlora_model* m) { return is_live_model(m) ? to_i32(m->info.cfg.hidden_size) : -1; }
QLORA_API int32_t qlora_model_n_layer(const qlora_model* m) { return is_live_model(m) ? to_i32(m->info.cfg.num_layers) : -1; }
QLORA_API int32_t qlora_model_n_ctx_train(const qlora_model* m) {
  return is_live_model(m) ? to_i32(m->info.cfg.max_position_embeddings) : -1;
}
QLORA_API int32_t qlora_model_bos_token(const qlora_model* m) {
  return is_live_model(m) && m->info.bos_token_id >= 0 ? to_i32(m->info.bos_token_id) : -1;
}
QLORA_API int32_t qlora_model_eos_tokens(const qlora_model* m, int32_t* ids, int32_t cap) {
  if (!is_live_model(m)) return -1;
  const auto& e = m->info.eos_token_ids;
  for (int32_t i = 0; i < cap && ids && i < static_cast<int32_t>(e.size()); ++i) ids[i] = to_i32(e[i]);
  return static_cast<int32_t>(e.size());
}

QLORA_API int qlora_model_set_adapter_dtype(qlora_model* model, const char* dtype) {
  return guard([&] {
    using D = qlora::model::LlamaModel::AdapterDtype;
    qlora::capi::check_model(model, "qlora_model_set_adapter_dtype");
    check_arg(dtype != nullptr, "qlora_model_set_adapter_dtype: dtype is NULL (use \"auto\", \"float32\" or \"bfloat16\")");
    const std::string v(dtype);
    D d;
    if (v == "auto") d = D::Auto;
    else if (v == "float32") d = D::F32;
    else if (v == "bfloat16") d = D::BF16;
    else
      throw qlora::ValueError("qlora_model_set_adapter_dtype: dtype must be \"auto\", \"float32\" or \"bfloat16\", got \"" +
                              v.substr(0, 64) + "\"");
    model->m->set_adapter_dtype(d);  // atomic; a running call keeps the dtype it started with
    return QLORA_OK;
  });
}

QLORA_API const char* qlora_model_adapter_dtype(const qlora_model* model) {
  if (!is_live_model(model)) return nullptr;
  switch (model->m->adapter_dtype()) {
    case qlora::model::LlamaModel::AdapterDtype::F32: return "float32";
    case qlora::model::LlamaModel::AdapterDtype::BF16: return "bfloat16";
    default: return "auto";
  }
}

QLORA_API int qlora_model_forward(qlora_model* model, const int32_t* ids, int64_t n_tokens, float* logits_out) {
  return guard([&] {
    qlora::capi::check_model(model, "qlora_model_forward");
    qlora::capi::forward(model, nullptr, qlora::capi::model_n_ctx(model), "qlora_model_forward", ids, n_tokens,
                         logits_out);
    return QLORA_OK;
  });
}

QLORA_API int qlora_generate(qlora_model* model, const int32_t* prompt, int64_t n_prompt,
                             const qlora_sampling_params* params, int32_t* out_tokens, int64_t max_new_tokens,
                             int64_t* n_out, qlora_token_callback cb, void* user) {
  if (n_out) *n_out = 0;
  return guard([&] {
    qlora::capi::check_model(model, "qlora_generate");
    qlora::capi::generate(model, nullptr, qlora::capi::model_n_ctx(model), "qlora_generate", prompt, n_prompt, params,
                          out_tokens, max_new_tokens, n_out, cb, user);
    return QLORA_OK;
  });
}

QLORA_API qlora_lora_params qlora_lora_default_params(void) {
  qlora_lora_params p;
  p.r = 16;
  p.alpha = 32.0f;
  p.dropout = 0.0f;
  p.use_rslora = 0;
  p.target_mask = QLORA_LORA_ALL;
  p.seed = 0;
  return p;
}

QLORA_API int qlora_adapter_add(qlora_model* model, const char* name, const qlora_lora_params* params) {
  return guard([&] {
    qlora::capi::check_model(model, "qlora_adapter_add");
    check_arg(name != nullptr && *name, "qlora_adapter_add: name is NULL or empty");
    const qlora_lora_params p = params ? *params : qlora_lora_default_params();
    qlora::model::LoraInitSpec s;
    s.r = p.r, s.alpha = p.alpha, s.dropout = p.dropout, s.use_rslora = p.use_rslora != 0;
    s.target_mask = p.target_mask, s.seed = p.seed;
    std::unique_lock<std::shared_mutex> lock(model->mu);
    model->m->add_adapter(name, qlora::model::new_lora_adapter(*model->m, s));
    model->m->set_active_adapter(name);
    model->lora_specs[name] = s;
    return QLORA_OK;
  });
}

QLORA_API int qlora_train_configure(qlora_model* model, float lr, float weight_decay) {
  return guard([&] {
    qlora::capi::check_model(model, "qlora_train_configure");
    check_arg(std::isfinite(lr) && lr >= 0.0f, "qlora_train_configure: lr must be finite and >= 0");
    check_arg(std::isfinite(weight_decay) && weight_decay >= 0.0f,
              "qlora_train_configure: weight_decay must be finite and >= 0");
    std::unique_lock<std::shared_mutex> lock(model->mu);
    qlora::model::LlamaModel& m = *model->m;
    check_arg(!m.active_adapter_name().empty(), "qlora_train_configure: no active adapter (qlora_adapter_add first)");
    const auto ap = m.adapter(m.active_adapter_name());
    qlora::train::AdamWConfig c;  // torch defaults but weight_decay
    c.weight_decay = weight_decay;
    qlora::model::configure_lora_optimizer(m.backend(), *ap, c);  // on the model's backend (CUDA: on the GPU)
    model->train_lr = lr;
    return QLORA_OK;
  });
}

QLORA_API int qlora_train_step(qlora_model* model, const int32_t* ids, const int32_t* labels, int64_t batch,
                               int64_t seq, float lr, float max_grad_norm, float* loss_out) {
  return guard([&] {
    qlora::capi::check_model(model, "qlora_train_step");
    check_arg(ids != nullptr && labels != nullptr, "qlora_train_step: ids and labels must not be NULL");
    check_arg(batch >= 1 && seq >= 2 && batch <= INT32_MAX / seq,
              "qlora_train_step: need batch >= 1, seq >= 2 and batch * seq < 2^31");
    qlora::capi::check_positions("qlora_train_step", "seq " + std::to_string(seq), seq, qlora::capi::model_n_ctx(model),
                                 false);
    check_arg(!std::isnan(lr) && !std::isnan(max_grad_norm), "qlora_train_step: lr / max_grad_norm is NaN");
    check_ids(ids, batch * seq, model->info.cfg.vocab_size, "qlora_train_step");
    std::unique_lock<std::shared_mutex> lock(model->mu);
    const double step_lr = lr < 0.0f ? model->train_lr : lr;
    const double loss = qlora::model::lora_train_step(*model->m, ids, labels, batch, seq, step_lr, max_grad_norm);
    if (loss_out) *loss_out = static_cast<float>(loss);
    return QLORA_OK;
  });
}

QLORA_API int qlora_adapter_save(qlora_model* model, const char* dir) {
  return guard([&] {
    qlora::capi::check_model(model, "qlora_adapter_save");
    check_arg(dir != nullptr && *dir, "qlora_adapter_save: dir is NULL or empty");
    std::unique_lock<std::shared_mutex> lock(model->mu);
    const std::string name = model->m->active_adapter_name();
    check_arg(!name.empty() && model->lora_specs.count(name), "qlora_adapter_save: no active adapter");
    qlora::model::save_lora_adapter(*model->m, *model->m->adapter(name), model->lora_specs.at(name), dir);
    return QLORA_OK;
  });
}

}  // extern "C"
