// Thin header-only C++ wrapper over the C API (qlora.h): RAII ownership of the model and
// errors as exceptions (qlora::api::Error carrying the qlora_status and the message).
//
//   auto m = qlora::api::Model::load("path/to/hf_dir");            // NF4 by default
//   std::vector<int32_t> out = m.generate({1, 15043, 29871}, 32);   // greedy
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "qlora/qlora.h"

namespace qlora::api {

struct Error : std::runtime_error {
  Error(int c, const std::string& msg) : std::runtime_error(msg), code(c) {}
  int code;  // a qlora_status
};

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
  int32_t bos_token() const { return qlora_model_bos_token(m_.get()); }
  std::vector<int32_t> eos_tokens() const {
    std::vector<int32_t> ids(static_cast<size_t>(qlora_model_eos_tokens(m_.get(), nullptr, 0)));
    qlora_model_eos_tokens(m_.get(), ids.data(), static_cast<int32_t>(ids.size()));
    return ids;
  }

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
    check(qlora_generate(m_.get(), prompt.data(), static_cast<int64_t>(prompt.size()), &params, out.data(),
                         max_new_tokens, &n, cb, user));
    out.resize(static_cast<size_t>(n));
    return out;
  }

  qlora_model* get() const { return m_.get(); }  // still owned by this object

 private:
  struct Free {
    void operator()(qlora_model* m) const { qlora_model_free(m); }
  };
  explicit Model(qlora_model* m) : m_(m) {}
  static void check(int rc) {
    if (rc != QLORA_OK) throw Error(rc, qlora_last_error());
  }
  std::unique_ptr<qlora_model, Free> m_;
};

}  // namespace qlora::api
