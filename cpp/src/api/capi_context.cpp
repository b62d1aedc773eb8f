// The C API's loaded adapters and contexts (qlora.h, "Contexts and loaded adapters"): an adapter
// handle holds a shared reference to an engine LoraAdapter read from a PEFT directory; a context
// holds an adapter set (AdapterUse: adapter + scale), copied into each call's engine
// GenerationContext when the call starts, so a later set_adapters or adapter_free never reaches a
// running call. A registry of live handles turns a freed or foreign pointer into an error.
#include <atomic>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_set>
#include <utility>
#include <vector>

#include "api/capi_error.hpp"
#include "api/capi_handles.hpp"
#include "api/capi_internal.hpp"
#include "api/peft_adapter.hpp"
#include "common/error.hpp"
#include "model/lora_check.hpp"

struct qlora_adapter {
  qlora_model* model = nullptr;
  std::shared_ptr<qlora::model::LoraAdapter> ad;
};

struct qlora_context {
  qlora_model* model = nullptr;
  int64_t n_ctx = 0;  // resolved (> 0)
  std::mutex mu;      // guards uses
  qlora::model::AdapterSet uses{qlora::model::AdapterUse{}};  // one entry for the one row; null ad = base
  std::atomic<bool> busy{false};                            // a generate / forward runs on it
};

namespace {
using qlora::check_arg;
using qlora::capi::guard;
using qlora::model::AdapterSet;
using qlora::model::AdapterUse;
using qlora::model::LoraAdapter;
using qlora::model::LoraModule;

// Live handles. g_mu makes a check of a handle and of the state tied to it (its model's handles, a
// context's busy flag) one step. Lock order: g_mu, then a model's handles_mu, then a context's mu.
std::mutex g_mu;
qlora::capi::LiveHandles<qlora_adapter> g_adapters;
qlora::capi::LiveHandles<qlora_context> g_contexts;

// Marks ctx busy for one call (checks that it is live and that its model was not freed).
class Call {
 public:
  Call(qlora_context* ctx, const char* fn) : c_(ctx) {
    const std::string f(fn);
    check_arg(ctx != nullptr, f + ": ctx is NULL");
    std::lock_guard<std::mutex> g(g_mu);
    check_arg(g_contexts.live(ctx), f + ": ctx is not a live qlora_context (freed, or not made by qlora_context_new)");
    {
      std::lock_guard<std::mutex> h(ctx->model->handles_mu);
      check_arg(!ctx->model->freed, f + ": the context's model was freed (free contexts before their model)");
    }
    check_arg(!ctx->busy.exchange(true), f + ": the context is already running a call (one call at a time per "
                                             "context; use one context per thread)");
  }
  ~Call() { c_->busy.store(false); }
  Call(const Call&) = delete;
  Call& operator=(const Call&) = delete;

 private:
  qlora_context* c_;
};

AdapterSet snapshot(qlora_context* ctx) {
  std::lock_guard<std::mutex> g(ctx->mu);
  return ctx->uses;
}

// One adapter applying sum_i s_i * delta_i: per projection, A = [A_1; A_2; ...] (ranks stacked)
// and B = [s_1 scaling_1 B_1, s_2 scaling_2 B_2, ...] with scaling 1.
std::shared_ptr<LoraAdapter> combine(qlora::Backend& be, const std::vector<AdapterUse>& parts) {
  auto out = std::make_shared<LoraAdapter>();
  const size_t n_mod = parts[0].ad->modules.size();
  out->modules.resize(n_mod);
  for (size_t k = 0; k < n_mod; ++k) {
    int64_t r_tot = 0, in = 0, o = 0;
    for (const AdapterUse& u : parts)
      if (const LoraModule* m = u.ad->modules[k].get()) r_tot += m->r, in = m->in, o = m->out;
    if (r_tot == 0) continue;
    std::vector<float> A(static_cast<size_t>(r_tot * in)), B(static_cast<size_t>(o * r_tot));
    int64_t r0 = 0;
    for (const AdapterUse& u : parts) {
      const LoraModule* m = u.ad->modules[k].get();
      if (!m) continue;
      std::vector<float> b(static_cast<size_t>(m->out * m->r));
      be.download(A.data() + r0 * in, m->A.data(), sizeof(float) * m->r * in);
      be.download(b.data(), m->B.data(), sizeof(float) * b.size());
      const float s = u.scale * m->scaling;
      for (int64_t row = 0; row < o; ++row)
        for (int64_t j = 0; j < m->r; ++j) B[row * r_tot + r0 + j] = s * b[row * m->r + j];
      r0 += m->r;
    }
    out->modules[k] = qlora::model::make_lora_module(be, r_tot, in, o, 1.0f, A.data(), B.data());
  }
  return out;
}
}  // namespace

namespace qlora::capi {

bool release_model_handles(qlora_model* model) {
  std::vector<qlora_adapter*> dead;
  bool now;
  {
    std::lock_guard<std::mutex> g(g_mu);
    std::lock_guard<std::mutex> h(model->handles_mu);
    for (qlora_adapter* a : model->adapters) g_adapters.remove(a), dead.push_back(a);
    model->adapters.clear();
    model->freed = true;
    now = model->n_contexts == 0;
  }
  for (qlora_adapter* a : dead) delete a;  // contexts keep their snapshots of these adapters
  return now;
}

}  // namespace qlora::capi

extern "C" {

QLORA_API qlora_context_params qlora_context_default_params(void) {
  qlora_context_params p;
  p.n_ctx = 0;
  return p;
}

QLORA_API qlora_adapter* qlora_adapter_load(qlora_model* model, const char* dir) {
  qlora_adapter* out = nullptr;
  guard([&] {
    qlora::capi::check_model(model, "qlora_adapter_load");
    check_arg(dir != nullptr && *dir, "qlora_adapter_load: dir is NULL or empty");
    auto h = std::make_unique<qlora_adapter>();
    h->model = model;
    h->ad = qlora::capi::load_peft_adapter(*model->m, dir);  // reads the model's shapes only
    std::lock_guard<std::mutex> g(g_mu);
    std::lock_guard<std::mutex> hm(model->handles_mu);
    check_arg(!model->freed, "qlora_adapter_load: the model was freed");
    model->adapters.insert(h.get());
    g_adapters.add(h.get());
    out = h.release();
    return QLORA_OK;
  });
  return out;
}

QLORA_API void qlora_adapter_free(qlora_adapter* adapter) {
  if (!adapter) return;
  {
    std::lock_guard<std::mutex> g(g_mu);
    if (!g_adapters.remove(adapter)) {
      qlora::capi::set_error(QLORA_ERR_INVALID_ARGUMENT,
                             "qlora_adapter_free: not a live qlora_adapter (already freed, or freed with its model)");
      return;
    }
    std::lock_guard<std::mutex> h(adapter->model->handles_mu);
    adapter->model->adapters.erase(adapter);
  }
  delete adapter;  // the weights stay while a context's snapshot holds them
}

QLORA_API qlora_context* qlora_context_new(qlora_model* model, qlora_context_params params) {
  qlora_context* out = nullptr;
  guard([&] {
    qlora::capi::check_model(model, "qlora_context_new");
    check_arg(params.n_ctx >= 0, "qlora_context_new: n_ctx must be >= 0 (0: max_position_embeddings), got " +
                                     std::to_string(params.n_ctx));
    auto c = std::make_unique<qlora_context>();
    c->model = model;
    c->n_ctx = params.n_ctx > 0 ? params.n_ctx : model->info.cfg.max_position_embeddings;
    std::lock_guard<std::mutex> g(g_mu);
    std::lock_guard<std::mutex> h(model->handles_mu);
    check_arg(!model->freed, "qlora_context_new: the model was freed");
    ++model->n_contexts;
    g_contexts.add(c.get());
    out = c.release();
    return QLORA_OK;
  });
  return out;
}

QLORA_API void qlora_context_free(qlora_context* ctx) {
  if (!ctx) return;
  bool delete_model = false;
  {
    std::lock_guard<std::mutex> g(g_mu);
    if (!g_contexts.live(ctx)) {
      qlora::capi::set_error(QLORA_ERR_INVALID_ARGUMENT, "qlora_context_free: not a live qlora_context (already freed)");
      return;
    }
    if (ctx->busy.load()) {  // freeing it would pull the context from under the running call
      qlora::capi::set_error(QLORA_ERR_INVALID_ARGUMENT,
                             "qlora_context_free: a call on this context is still running; the context was not freed");
      return;
    }
    g_contexts.remove(ctx);
    std::lock_guard<std::mutex> h(ctx->model->handles_mu);
    delete_model = --ctx->model->n_contexts == 0 && ctx->model->freed;
  }
  qlora_model* m = ctx->model;
  delete ctx;
  if (delete_model) delete m;  // qlora_model_free ran while this context was open
}

QLORA_API int qlora_context_set_adapters(qlora_context* ctx, qlora_adapter* const* adapters, const float* scales,
                                         int32_t n) {
  return guard([&] {
    check_arg(ctx != nullptr, "qlora_context_set_adapters: ctx is NULL");
    check_arg(n >= 0, "qlora_context_set_adapters: n must be >= 0, got " + std::to_string(n));
    check_arg(n == 0 || adapters != nullptr, "qlora_context_set_adapters: adapters is NULL but n > 0");
    std::vector<AdapterUse> parts;  // the adapters that contribute (scale != 0)
    qlora_model* model;
    {
      std::lock_guard<std::mutex> g(g_mu);  // the adapters cannot be freed while they are read
      check_arg(g_contexts.live(ctx), "qlora_context_set_adapters: ctx is not a live qlora_context");
      model = ctx->model;
      {
        std::lock_guard<std::mutex> h(model->handles_mu);
        check_arg(!model->freed, "qlora_context_set_adapters: the context's model was freed");
      }
      for (int32_t i = 0; i < n; ++i) {
        const std::string at = "qlora_context_set_adapters: adapters[" + std::to_string(i) + "]";
        const qlora_adapter* a = adapters[i];
        check_arg(a != nullptr, at + " is NULL");
        check_arg(g_adapters.live(a), at + " is not a live qlora_adapter (freed, or freed with its model)");
        check_arg(a->model == model, at + " was loaded for another model than the context's");
        const float s = scales ? scales[i] : 1.0f;
        qlora::model::check_lora_scale(model->m->backend(), *a->ad, s, at);  // finite, the load bound
        if (s != 0.0f) parts.push_back({a->ad, s});
      }
    }
    AdapterUse use;  // none: the base model
    if (parts.size() == 1)
      use = parts[0];  // as Python's adapter_name= with set_adapter_scale: the same engine path
    else if (parts.size() > 1)
      use = {combine(model->m->backend(), parts), 1.0f};
    AdapterSet next{std::move(use)};
    {
      std::lock_guard<std::mutex> g(ctx->mu);
      std::swap(ctx->uses, next);
    }
    return QLORA_OK;  // `next` (the old set) is released here, outside the lock
  });
}

QLORA_API int qlora_context_generate(qlora_context* ctx, const int32_t* prompt, int64_t n_prompt,
                                     const qlora_sampling_params* params, int32_t* out_tokens,
                                     int64_t max_new_tokens, int64_t* n_out, qlora_token_callback cb, void* user) {
  if (n_out) *n_out = 0;
  return guard([&] {
    Call call(ctx, "qlora_context_generate");
    const AdapterSet uses = snapshot(ctx);  // kept to the last token
    qlora::capi::generate(ctx->model, &uses, ctx->n_ctx, "qlora_context_generate", prompt, n_prompt, params,
                          out_tokens, max_new_tokens, n_out, cb, user);
    return QLORA_OK;
  });
}

QLORA_API int qlora_context_forward(qlora_context* ctx, const int32_t* ids, int64_t n_tokens, float* logits_out) {
  return guard([&] {
    Call call(ctx, "qlora_context_forward");
    const AdapterSet uses = snapshot(ctx);
    qlora::capi::forward(ctx->model, &uses, ctx->n_ctx, "qlora_context_forward", ids, n_tokens, logits_out);
    return QLORA_OK;
  });
}

}  // extern "C"
