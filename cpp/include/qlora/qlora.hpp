// Thin header-only C++ wrapper over the C API (qlora.h): RAII ownership of models, adapters and
// contexts, and errors as exceptions (qlora::api::Error carrying the qlora_status and the message).
//
//   auto m = qlora::api::Model::load("path/to/hf_dir");            // NF4 by default
//   std::vector<int32_t> out = m.generate({1, 15043, 29871}, 32);   // greedy
//
//   qlora::api::Adapter sql = m.load_adapter("adapters/sql");        // PEFT directory
//   qlora::api::Context ctx = m.new_context();                       // one per serving thread
//   ctx.set_adapters({{&sql, 1.0f}});                                // {}: the base model
//   std::vector<int32_t> toks = ctx.generate({1, 15043}, 32);
//
//   qlora::api::Tokenizer tok = m.tokenizer();                       // or Tokenizer::load(path)
//   std::string text = tok.detokenize(ctx.generate(tok.tokenize("Hello"), 32));
//
// Destroy adapters and contexts before their model (declare them after it): the C API frees
// adapters left with the model, and a context must not outlive its model (qlora.h).
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "qlora/qlora.h"

namespace qlora::api {

struct Error : std::runtime_error {
  Error(int c, const std::string& msg) : std::runtime_error(msg), code(c) {}
  int code;  // a qlora_status
};

namespace detail {
inline void check(int rc) {
  if (rc != QLORA_OK) throw Error(rc, qlora_last_error());
}
// Runs call(out, &n, cb, user) with on_token behind a C callback; returns the tokens made.
template <class Call>
std::vector<int32_t> generate(Call&& call, int64_t max_new_tokens, const std::function<bool(int32_t)>& on_token) {
  std::vector<int32_t> out(static_cast<size_t>(max_new_tokens > 0 ? max_new_tokens : 0));
  int64_t n = 0;
  qlora_token_callback cb = nullptr;
  void* user = nullptr;
  if (on_token) {
    cb = [](int32_t t, void* u) -> int {
      try {
        return (*static_cast<const std::function<bool(int32_t)>*>(u))(t) ? 0 : 1;
      } catch (...) {
        return 1;  // an exception must not unwind through C frames
      }
    };
    user = const_cast<std::function<bool(int32_t)>*>(&on_token);
  }
  check(call(out.data(), &n, cb, user));
  out.resize(static_cast<size_t>(n));
  return out;
}
}  // namespace detail

class Adapter;
class Tokenizer;
class Context;

class Model {
 public:
  // Throws Error when loading fails. params: qlora_model_default_params() when omitted.
  static Model load(const std::string& path, const qlora_model_params& params = qlora_model_default_params()) {
    qlora_model* m = qlora_model_load(path.c_str(), &params);
    if (!m) throw Error(qlora_last_status(), qlora_last_error());
    return Model(m);
  }

  int32_t n_vocab() const { return qlora_model_n_vocab(m_.get()); }
  int32_t n_embd() const { return qlora_model_n_embd(m_.get()); }
  int32_t n_layer() const { return qlora_model_n_layer(m_.get()); }
  int32_t n_ctx_train() const { return qlora_model_n_ctx_train(m_.get()); }
  int32_t bos_token() const { return qlora_model_bos_token(m_.get()); }
  std::vector<int32_t> eos_tokens() const {
    std::vector<int32_t> ids(static_cast<size_t>(qlora_model_eos_tokens(m_.get(), nullptr, 0)));
    qlora_model_eos_tokens(m_.get(), ids.data(), static_cast<int32_t>(ids.size()));
    return ids;
  }

  // How adapters are held for inference: "auto", "float32" or "bfloat16" (qlora.h). Throws Error
  // naming the three values on anything else.
  void set_adapter_dtype(const std::string& dtype) { check(qlora_model_set_adapter_dtype(m_.get(), dtype.c_str())); }
  std::string adapter_dtype() const { return qlora_model_adapter_dtype(m_.get()); }

  // Logits [ids.size(), n_vocab] row-major.
  std::vector<float> forward(const std::vector<int32_t>& ids) {
    std::vector<float> out(ids.size() * static_cast<size_t>(n_vocab()));
    check(qlora_model_forward(m_.get(), ids.data(), static_cast<int64_t>(ids.size()), out.data()));
    return out;
  }

  // New tokens after `prompt`. on_token(token) returning false stops generation.
  std::vector<int32_t> generate(const std::vector<int32_t>& prompt, int64_t max_new_tokens,
                                const qlora_sampling_params& params = qlora_sampling_default_params(),
                                const std::function<bool(int32_t)>& on_token = nullptr) {
    return detail::generate(
        [&](int32_t* out, int64_t* n, qlora_token_callback cb, void* user) {
          return qlora_generate(m_.get(), prompt.data(), static_cast<int64_t>(prompt.size()), &params, out,
                                max_new_tokens, n, cb, user);
        },
        max_new_tokens, on_token);
  }

  // A LoRA adapter from a PEFT directory (see qlora_adapter_load); throws Error on failure.
  Adapter load_adapter(const std::string& dir);
  // A new context (base model until set_adapters); throws Error on failure.
  Context new_context(const qlora_context_params& params = qlora_context_default_params());

  // The model's own tokenizer (from the path it was loaded from; borrowed: valid while the model
  // lives); throws Error when its source has none.
  Tokenizer tokenizer() const;

  // ---- LoRA training (qlora.h): the model's own active adapter
  // Adds adapter `name` and makes it active. params: qlora_lora_default_params() when omitted.
  void add_adapter(const std::string& name, const qlora_lora_params& params = qlora_lora_default_params()) {
    check(qlora_adapter_add(m_.get(), name.c_str(), &params));
  }
  void train_configure(float lr, float weight_decay = 0.0f) {
    check(qlora_train_configure(m_.get(), lr, weight_decay));
  }
  // One AdamW step on ids/labels [batch * seq] (labels unshifted, -100 ignored); returns the loss
  // before the step. lr < 0: train_configure's; max_grad_norm <= 0: no clipping.
  float train_step(const std::vector<int32_t>& ids, const std::vector<int32_t>& labels, int64_t batch, int64_t seq,
                   float lr = -1.0f, float max_grad_norm = 1.0f) {
    if (ids.size() != static_cast<size_t>(batch * seq) || labels.size() != ids.size())
      throw Error(QLORA_ERR_INVALID_ARGUMENT, "train_step: ids and labels must both hold batch * seq values");
    float loss = 0.0f;
    check(qlora_train_step(m_.get(), ids.data(), labels.data(), batch, seq, lr, max_grad_norm, &loss));
    return loss;
  }
  // Saves the active adapter as a PEFT directory.
  void save_adapter(const std::string& dir) { check(qlora_adapter_save(m_.get(), dir.c_str())); }

  qlora_model* get() const { return m_.get(); }  // still owned by this object

 private:
  struct Free {
    void operator()(qlora_model* m) const { qlora_model_free(m); }
  };
  explicit Model(qlora_model* m) : m_(m) {}
  static void check(int rc) { detail::check(rc); }
  std::unique_ptr<qlora_model, Free> m_;
};

// A loaded adapter (qlora_adapter_free on destruction).
class Adapter {
 public:
  qlora_adapter* get() const { return a_.get(); }  // still owned by this object

 private:
  friend class Model;
  struct Free {
    void operator()(qlora_adapter* a) const { qlora_adapter_free(a); }
  };
  explicit Adapter(qlora_adapter* a) : a_(a) {}
  std::unique_ptr<qlora_adapter, Free> a_;
};

// A context (qlora_context_free on destruction): one call at a time; one per thread.
class Context {
 public:
  // Replaces the adapter set: {adapter, scale} pairs; {} = the base model. The adapters may be
  // destroyed afterwards (the context keeps its snapshot).
  void set_adapters(const std::vector<std::pair<const Adapter*, float>>& set) {
    std::vector<qlora_adapter*> ads;
    std::vector<float> scales;
    for (const auto& [a, s] : set) ads.push_back(a ? a->get() : nullptr), scales.push_back(s);
    detail::check(qlora_context_set_adapters(c_.get(), ads.data(), scales.data(), static_cast<int32_t>(ads.size())));
  }

  // Logits [ids.size(), n_vocab] row-major with the context's adapters.
  std::vector<float> forward(const std::vector<int32_t>& ids) {
    std::vector<float> out(ids.size() * static_cast<size_t>(n_vocab_));
    detail::check(qlora_context_forward(c_.get(), ids.data(), static_cast<int64_t>(ids.size()), out.data()));
    return out;
  }

  // New tokens after `prompt` with the context's adapters (as they are when the call starts).
  std::vector<int32_t> generate(const std::vector<int32_t>& prompt, int64_t max_new_tokens,
                                const qlora_sampling_params& params = qlora_sampling_default_params(),
                                const std::function<bool(int32_t)>& on_token = nullptr) {
    return detail::generate(
        [&](int32_t* out, int64_t* n, qlora_token_callback cb, void* user) {
          return qlora_context_generate(c_.get(), prompt.data(), static_cast<int64_t>(prompt.size()), &params, out,
                                        max_new_tokens, n, cb, user);
        },
        max_new_tokens, on_token);
  }

  qlora_context* get() const { return c_.get(); }  // still owned by this object

 private:
  friend class Model;
  struct Free {
    void operator()(qlora_context* c) const { qlora_context_free(c); }
  };
  Context(qlora_context* c, int32_t n_vocab) : c_(c), n_vocab_(n_vocab) {}
  std::unique_ptr<qlora_context, Free> c_;
  int32_t n_vocab_;
};

// A tokenizer: loaded (owned: qlora_tokenizer_free on destruction) or a model's (borrowed: valid
// while the model lives); its calls may run from several threads at once. Defaults follow the Python Tokenizer (encode(add_special_tokens=True)
// matches special-token strings; decode keeps special tokens).
class Tokenizer {
 public:
  // From a `.gguf` file or an HF directory with tokenizer.json; throws Error on failure.
  static Tokenizer load(const std::string& path) {
    qlora_tokenizer* t = qlora_tokenizer_load(path.c_str());
    if (!t) throw Error(qlora_last_status(), qlora_last_error());
    return Tokenizer(t, true);
  }

  std::vector<int32_t> tokenize(const std::string& text, bool add_special = true, bool parse_special = true) const {
    const int32_t len = text_len(text);
    std::vector<int32_t> ids(text.size() + 8);  // usually enough: about one id per byte at most, plus BOS/EOS
    int32_t n = qlora_tokenize(t_.get(), text.data(), len, ids.data(), cap(ids.size()), add_special, parse_special);
    if (n < 0 && n != INT32_MIN) {  // -(ids needed)
      ids.resize(static_cast<size_t>(-static_cast<int64_t>(n)));
      n = qlora_tokenize(t_.get(), text.data(), len, ids.data(), cap(ids.size()), add_special, parse_special);
    }
    if (n < 0) throw Error(status_or_invalid(), qlora_last_error());
    ids.resize(static_cast<size_t>(n));
    return ids;
  }

  std::string detokenize(const std::vector<int32_t>& ids, bool skip_special = false) const {
    if (ids.size() > static_cast<size_t>(INT32_MAX)) throw Error(QLORA_ERR_INVALID_ARGUMENT, "detokenize: too many ids");
    return fill([&](char* buf, int32_t n) {
      return qlora_detokenize(t_.get(), ids.data(), static_cast<int32_t>(ids.size()), buf, n, skip_special);
    });
  }

  // The bytes of one token (may be part of a UTF-8 character: join pieces before showing them).
  std::string token_to_piece(int32_t token) const {
    return fill([&](char* buf, int32_t n) { return qlora_token_to_piece(t_.get(), token, buf, n); });
  }

  int32_t n_vocab() const { return qlora_tokenizer_n_vocab(t_.get()); }
  int32_t bos() const { return qlora_token_bos(t_.get()); }  // -1: none
  int32_t eos() const { return qlora_token_eos(t_.get()); }
  int32_t pad() const { return qlora_token_pad(t_.get()); }
  int32_t unk() const { return qlora_token_unk(t_.get()); }
  bool is_special(int32_t token) const { return qlora_token_is_special(t_.get(), token) != 0; }
  // Every id that ends a turn (use as qlora_sampling_params.stop_ids).
  std::vector<int32_t> eos_tokens() const {
    std::vector<int32_t> ids(static_cast<size_t>(qlora_tokenizer_eos_tokens(t_.get(), nullptr, 0)));
    qlora_tokenizer_eos_tokens(t_.get(), ids.data(), static_cast<int32_t>(ids.size()));
    return ids;
  }

  const qlora_tokenizer* get() const { return t_.get(); }  // still owned by this object (or the model)

 private:
  friend class Model;
  struct Free {
    bool owned = true;
    void operator()(const qlora_tokenizer* t) const {
      if (owned) qlora_tokenizer_free(const_cast<qlora_tokenizer*>(t));
    }
  };
  Tokenizer(const qlora_tokenizer* t, bool owned) : t_(t, Free{owned}) {}
  static int32_t cap(size_t n) { return n > static_cast<size_t>(INT32_MAX) ? INT32_MAX : static_cast<int32_t>(n); }
  static int32_t text_len(const std::string& text) {
    if (text.size() > static_cast<size_t>(INT32_MAX)) throw Error(QLORA_ERR_INVALID_ARGUMENT, "tokenize: text too long");
    return static_cast<int32_t>(text.size());
  }
  static int status_or_invalid() {
    const int s = qlora_last_status();
    return s != QLORA_OK ? s : QLORA_ERR_INVALID_ARGUMENT;
  }
  // Runs call(buf, cap) -> length, or -(length needed), or INT32_MIN on an error.
  template <class Call>
  static std::string fill(Call&& call) {
    std::string out(64, '\0');
    int32_t n = call(out.data(), cap(out.size()));
    if (n < 0 && n != INT32_MIN) {
      out.resize(static_cast<size_t>(-static_cast<int64_t>(n)));
      n = call(out.data(), cap(out.size()));
    }
    if (n < 0) throw Error(status_or_invalid(), qlora_last_error());
    out.resize(static_cast<size_t>(n));
    return out;
  }
  std::unique_ptr<const qlora_tokenizer, Free> t_;
};

inline Adapter Model::load_adapter(const std::string& dir) {
  qlora_adapter* a = qlora_adapter_load(m_.get(), dir.c_str());
  if (!a) throw Error(qlora_last_status(), qlora_last_error());
  return Adapter(a);
}

inline Tokenizer Model::tokenizer() const {
  const qlora_tokenizer* t = qlora_model_get_tokenizer(m_.get());
  if (!t) throw Error(qlora_last_status(), qlora_last_error());
  return Tokenizer(t, false);
}

inline Context Model::new_context(const qlora_context_params& params) {
  qlora_context* c = qlora_context_new(m_.get(), params);
  if (!c) throw Error(qlora_last_status(), qlora_last_error());
  return Context(c, n_vocab());
}

}  // namespace qlora::api
