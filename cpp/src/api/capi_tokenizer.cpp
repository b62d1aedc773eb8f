// The tokenizer part of the C API (cpp/include/qlora/qlora.h, "Tokenizers") over
// cpp/src/tokenizer: the handle owns one qlora::tok::Tokenizer.
#include <climits>
#include <cstring>
#include <memory>
#include <shared_mutex>
#include <string>
#include <optional>
#include <vector>

#include "api/capi_error.hpp"
#include "api/capi_handles.hpp"
#include "common/error.hpp"
#include "tokenizer/tokenizer.hpp"

struct qlora_tokenizer {
  std::unique_ptr<qlora::tok::Tokenizer> t;
};

namespace {
using qlora::check_arg;
using qlora::capi::guard;

// Live tokenizer handles -> whether a model owns it (freed with the model, never by the caller):
// a call on a freed tokenizer, a double free or freeing a model's tokenizer is an error, not a crash
qlora::capi::LiveHandles<qlora_tokenizer, bool> g_toks;

bool live(const qlora_tokenizer* tok) { return g_toks.live(tok); }

void check_tok(const qlora_tokenizer* tok, const char* fn) {
  check_arg(tok != nullptr, std::string(fn) + ": tokenizer is NULL");
  check_arg(live(tok), std::string(fn) + ": tokenizer is not a live qlora_tokenizer (freed, or freed with its model)");
}

// Runs fn (setting `out`) under guard(); INT32_MIN when it failed.
template <class F>
int32_t run(F&& fn) {
  int32_t out = 0;
  int st = guard([&] {
    out = fn();
    return 0;
  });
  return st == 0 ? out : INT32_MIN;
}

// Copies bytes into buf[cap]: the length, or -(length) when cap is too small.
int32_t copy_out(const std::string& s, char* buf, int32_t cap, const char* fn) {
  check_arg(s.size() <= static_cast<size_t>(INT32_MAX), std::string(fn) + ": the output is longer than INT32_MAX bytes");
  check_arg(cap >= 0, std::string(fn) + ": negative buffer length");
  const auto n = static_cast<int32_t>(s.size());
  if (n > cap) return -n;
  check_arg(buf != nullptr || n == 0, std::string(fn) + ": buffer is NULL");
  if (n) std::memcpy(buf, s.data(), s.size());
  return n;
}

int32_t fact(const qlora_tokenizer* tok, int32_t qlora::tok::TokenizerDesc::*field) {
  return live(tok) ? tok->t->desc().*field : -1;
}
}  // namespace

extern "C" {

QLORA_API qlora_tokenizer* qlora_tokenizer_load(const char* path) {
  qlora_tokenizer* out = nullptr;
  guard([&] {
    check_arg(path != nullptr && *path, "qlora_tokenizer_load: path is NULL or empty");
    auto h = std::make_unique<qlora_tokenizer>();
    h->t = qlora::tok::Tokenizer::load(path);
    g_toks.add(h.get(), false);
    out = h.release();
    return 0;
  });
  return out;
}

QLORA_API void qlora_tokenizer_free(qlora_tokenizer* tok) {
  if (!tok) return;
  const std::optional<bool> owned = g_toks.remove_unless(tok, [](bool model_owns) { return model_owns; });
  if (!owned) {
    qlora::capi::set_error(QLORA_ERR_INVALID_ARGUMENT, "qlora_tokenizer_free: not a live qlora_tokenizer (already freed)");
    return;
  }
  if (*owned) {
    qlora::capi::set_error(QLORA_ERR_INVALID_ARGUMENT,
                           "qlora_tokenizer_free: this tokenizer belongs to its model (qlora_model_get_tokenizer) "
                           "and is freed with it");
    return;
  }
  delete tok;
}

QLORA_API int32_t qlora_tokenize(const qlora_tokenizer* tok, const char* text, int32_t text_len, int32_t* tokens,
                                 int32_t n_tokens_max, int32_t add_special, int32_t parse_special) {
  return run([&]() -> int32_t {
    check_tok(tok, "qlora_tokenize");
    check_arg(text != nullptr, "qlora_tokenize: text is NULL");
    check_arg(n_tokens_max >= 0, "qlora_tokenize: n_tokens_max is negative");
    size_t len = text_len < 0 ? std::strlen(text) : static_cast<size_t>(text_len);
    std::vector<int32_t> ids;
    tok->t->encode(std::string_view(text, len), add_special != 0, parse_special != 0, ids);
    check_arg(ids.size() <= static_cast<size_t>(INT32_MAX), "qlora_tokenize: more than INT32_MAX tokens");
    const auto n = static_cast<int32_t>(ids.size());
    if (n > n_tokens_max) return -n;
    check_arg(tokens != nullptr || n == 0, "qlora_tokenize: tokens is NULL");
    if (n) std::memcpy(tokens, ids.data(), ids.size() * sizeof(int32_t));
    return n;
  });
}

QLORA_API int32_t qlora_detokenize(const qlora_tokenizer* tok, const int32_t* tokens, int32_t n_tokens, char* text,
                                   int32_t text_len_max, int32_t skip_special) {
  return run([&]() -> int32_t {
    check_tok(tok, "qlora_detokenize");
    check_arg(n_tokens >= 0, "qlora_detokenize: n_tokens is negative");
    check_arg(tokens != nullptr || n_tokens == 0, "qlora_detokenize: tokens is NULL");
    std::string s = tok->t->decode(tokens, static_cast<size_t>(n_tokens), skip_special != 0);
    return copy_out(s, text, text_len_max, "qlora_detokenize");
  });
}

QLORA_API int32_t qlora_token_to_piece(const qlora_tokenizer* tok, int32_t token, char* buf, int32_t length) {
  return run([&]() -> int32_t {
    check_tok(tok, "qlora_token_to_piece");
    check_arg(token >= 0 && token < tok->t->n_vocab(), "qlora_token_to_piece: token id " + std::to_string(token) +
                                                           " is out of range [0, " + std::to_string(tok->t->n_vocab()) + ")");
    return copy_out(tok->t->piece(token), buf, length, "qlora_token_to_piece");
  });
}

QLORA_API int32_t qlora_tokenizer_n_vocab(const qlora_tokenizer* tok) { return live(tok) ? tok->t->n_vocab() : -1; }
QLORA_API int32_t qlora_token_bos(const qlora_tokenizer* tok) { return fact(tok, &qlora::tok::TokenizerDesc::bos_id); }
QLORA_API int32_t qlora_token_eos(const qlora_tokenizer* tok) { return fact(tok, &qlora::tok::TokenizerDesc::eos_id); }
QLORA_API int32_t qlora_token_pad(const qlora_tokenizer* tok) { return fact(tok, &qlora::tok::TokenizerDesc::pad_id); }
QLORA_API int32_t qlora_token_unk(const qlora_tokenizer* tok) { return fact(tok, &qlora::tok::TokenizerDesc::unk_id); }

QLORA_API int32_t qlora_tokenizer_eos_tokens(const qlora_tokenizer* tok, int32_t* ids, int32_t cap) {
  if (!live(tok)) return -1;
  const auto& v = tok->t->desc().eos_ids;
  for (size_t i = 0; i < v.size() && static_cast<int64_t>(i) < cap && ids; ++i) ids[i] = v[i];
  return static_cast<int32_t>(v.size());
}

QLORA_API int32_t qlora_token_is_special(const qlora_tokenizer* tok, int32_t token) {
  if (!live(tok) || token < 0 || token >= tok->t->n_vocab()) return 0;
  return tok->t->is_special(token) ? 1 : 0;
}

}  // extern "C"

#include "api/capi_internal.hpp"

extern "C" QLORA_API const qlora_tokenizer* qlora_model_get_tokenizer(qlora_model* model) {
  const qlora_tokenizer* out = nullptr;
  guard([&] {
    qlora::capi::check_model(model, "qlora_model_get_tokenizer");
    std::lock_guard<std::mutex> lk(model->tokenizer_mu);
    if (!model->tokenizer) {
      auto h = std::make_unique<qlora_tokenizer>();
      h->t = qlora::tok::Tokenizer::load(model->source);
      g_toks.add(h.get(), true);
      model->tokenizer.reset(h.release());
    }
    out = model->tokenizer.get();
    return 0;
  });
  return out;
}

namespace qlora::capi {
void free_model_tokenizer(qlora_tokenizer* tok) {
  if (!tok) return;
  g_toks.remove(tok);
  delete tok;
}
}  // namespace qlora::capi
